"""Trainable adapters between student taps and teacher-shaped targets."""
from .projectors import BaseConnector, ConvProjector, LinearProjector

__all__ = ['BaseConnector', 'LinearProjector', 'ConvProjector']
