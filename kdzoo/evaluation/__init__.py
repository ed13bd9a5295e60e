"""Face verification and identification metrics (InsightFace protocols)."""
from .identification import cmc, rank1_identification
from .metrics import FaceIdentificationMetric, FaceVerificationMetric
from .verification import (VerificationResult, far_key, kfold_indices,
                           l2_normalize, roc_auc, roc_curve, tar_at_far,
                           verification_accuracy)

__all__ = [
    'verification_accuracy', 'VerificationResult', 'kfold_indices',
    'l2_normalize', 'tar_at_far', 'roc_curve', 'roc_auc', 'far_key',
    'rank1_identification', 'cmc', 'FaceVerificationMetric',
    'FaceIdentificationMetric'
]
