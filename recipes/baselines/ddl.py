# Distribution distillation (DDL, arXiv 2002.03662) adapted by kdzoo from
# easy/hard branches of one network to teacher/student networks: the
# student's positive and hardest-negative similarity histograms follow the
# teacher's (TFace weights 0.1 / 0.02 / order 0.5). Identity-balanced batches
# supply positive pairs.
_base_ = ['../_base_/kd_synthface_age.py']
train_dataloader = dict(
    sampler=dict(_delete_=True, type='IdentityBalancedSampler',
                 num_identities=16, images_per_identity=4))
model = dict(distill_losses=dict(
    loss_ddl=dict(type='DDLLoss', loss_weight=1.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding',
                              labels='data.label'))))
