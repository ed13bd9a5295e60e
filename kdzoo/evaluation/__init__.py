"""Face verification and identification metrics (InsightFace protocols)."""
from .identification import cmc, rank1_identification
from .ijb import (IJBMeta, align_face, estimate_similarity, evaluate_ijb,
                  ijb_roc, ijb_tar_table, image_features, pair_scores,
                  read_ijb_meta, template_features)
from .metrics import FaceIdentificationMetric, FaceVerificationMetric
from .verification import (VerificationResult, far_key, kfold_indices,
                           l2_normalize, roc_auc, roc_curve, tar_at_far,
                           verification_accuracy)

__all__ = [
    'verification_accuracy', 'VerificationResult', 'kfold_indices',
    'l2_normalize', 'tar_at_far', 'roc_curve', 'roc_auc', 'far_key',
    'rank1_identification', 'cmc', 'FaceVerificationMetric',
    'FaceIdentificationMetric', 'IJBMeta', 'read_ijb_meta', 'align_face',
    'estimate_similarity', 'image_features', 'template_features',
    'pair_scores', 'ijb_tar_table', 'ijb_roc', 'evaluate_ijb'
]
