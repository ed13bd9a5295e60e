# Cosine embedding distillation (TFace's cosine_distance, ShrinkTeaNet with
# p=1): mean (1 - cos(P(s), t)), P a Linear+BN projector 64 -> 128, weight
# 16 as the angular-KD recipe.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    connectors=dict(proj_fr=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_cos=dict(type='CosineEmbeddingLoss', loss_weight=16.0,
                      inputs=dict(s_emb=dict(tap='student.embedding',
                                             connector='proj_fr'),
                                  t_emb='teacher_fr.embedding'))))
