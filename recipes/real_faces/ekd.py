# Real data, EKD (Huang et al., CVPR 2022, evaluation-oriented KD: pairwise
# similarities near the verification thresholds) from the pretrained ONNX
# teacher, cached; P x K identity-balanced batches of 128 (32 identities x
# 4), as TFace trains it; settings as recipes/baselines/ekd.py.
_base_ = ['../_base_/real_faces.py']
train_dataloader = dict(
    sampler=dict(_delete_=True, type='IdentityBalancedSampler',
                 num_identities=32, images_per_identity=4))
model = dict(distill_losses=dict(
    loss_ekd=dict(type='EKDLoss', topk=2000, tau=0.01, loss_weight=1.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding',
                              labels='data.label'))))
