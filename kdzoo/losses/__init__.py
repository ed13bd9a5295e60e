"""Distillation loss plugins (see ``base.py`` for the contract)."""
from .angular import AngularDistillationLoss
from .base import BaseDistillLoss
from .logit import KDLoss

__all__ = ['BaseDistillLoss', 'KDLoss', 'AngularDistillationLoss']
