# Contrastive representation distillation (arXiv 1910.10699), RepDistiller's
# NCE with two memory banks sized to the training set (400 ids x 16 = 6400
# samples) and weight 0.8; 4096 negatives (RepDistiller's 16384 exceeds this
# dataset). The loader returns dataset indices (data.index).
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_crd=dict(type='CRDLoss', num_data=6400, feat_dim=128, nce_k=4096,
                  nce_t=0.07, nce_m=0.5, loss_weight=0.8,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding',
                              indices='data.index'))))
