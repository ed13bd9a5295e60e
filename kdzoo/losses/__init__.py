"""Distillation loss plugins (see ``base.py`` for the contract).

One module per family or method: ``logit`` (KD, DKD, DIST, margin KD),
``angular`` (ShrinkTeaNet), ``feature`` (FitNets, AT, PKT, embedding L2 /
cosine), ``relational`` (RKD, SP, CC, DarkRank), ``crd``, ``ekd``, ``ddl``,
``triplet``, ``margin`` (MarginDistillation, AdaDistill), ``attentive``
(LIAAD's age-attention transfer and the two-teacher attention reading) and
``age`` (terms that train an age-invariant teacher: OE-CNN norm regression,
adversarial age classifier).
"""
from .age import (AgeAdversarialLoss, AgeNormRegressionLoss,
                  CrossAgeCompactnessLoss)
from .angular import AngularDistillationLoss
from .attentive import AgeAttentionLoss, TeacherAttentionAngularLoss
from .base import BaseDistillLoss
from .crd import CRDLoss
from .ddl import DDLLoss
from .ekd import EKDLoss
from .feature import (ATLoss, CosineEmbeddingLoss, EmbeddingL2Loss,
                      FitNetLoss, PKTLoss)
from .logit import DISTLoss, DKDLoss, KDLoss, MarginKDLoss
from .margin import AdaDistillLoss, MarginDistillationLoss
from .relational import CCLoss, DarkRankLoss, RKDLoss, SPLoss
from .triplet import TripletDistillationLoss

__all__ = [
    'BaseDistillLoss', 'KDLoss', 'DKDLoss', 'DISTLoss', 'MarginKDLoss',
    'AngularDistillationLoss', 'FitNetLoss', 'ATLoss', 'PKTLoss',
    'EmbeddingL2Loss', 'CosineEmbeddingLoss', 'RKDLoss', 'SPLoss', 'CCLoss',
    'DarkRankLoss', 'CRDLoss', 'EKDLoss', 'DDLLoss', 'TripletDistillationLoss',
    'MarginDistillationLoss', 'AdaDistillLoss', 'AgeAttentionLoss',
    'TeacherAttentionAngularLoss', 'AgeNormRegressionLoss',
    'CrossAgeCompactnessLoss',
    'AgeAdversarialLoss'
]
