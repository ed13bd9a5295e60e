# Relational KD (arXiv 1904.05068): distance (25) and angle (50) terms on the
# embeddings, RepDistiller/TFace weights.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_rkd=dict(type='RKDLoss', w_dist=25.0, w_angle=50.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding'))))
