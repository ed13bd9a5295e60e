# Correlation congruence (arXiv 1904.01802), TFace's Taylor-expanded Gaussian
# kernel (gamma 0.4, orders 0-1) on the embeddings. The reference gives no
# face weight; 1.0 is not tuned.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_cc=dict(type='CCLoss', gamma=0.4, p_order=2, loss_weight=1.0,
                 inputs=dict(s_emb='student.embedding',
                             t_emb='teacher_fr.embedding'))))
