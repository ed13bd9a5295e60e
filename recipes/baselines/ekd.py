# Evaluation-oriented KD (EKD, arXiv 2206.02325), TFace's defaults (top-2000
# hard negatives, tau 0.01, weights 0.02/0.01, EMA 0.01 on six FAR
# thresholds) on the embeddings. Positive pairs come from an
# identity-balanced batch: 16 identities x 4 images (TFace mixes 32 random
# and 32 balanced samples; kdzoo uses the balanced batch for both terms).
_base_ = ['../_base_/kd_synthface_age.py']
train_dataloader = dict(
    sampler=dict(_delete_=True, type='IdentityBalancedSampler',
                 num_identities=16, images_per_identity=4))
model = dict(distill_losses=dict(
    loss_ekd=dict(type='EKDLoss', topk=2000, tau=0.01, loss_weight=1.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding',
                              labels='data.label'))))
