# Triplet distillation (arXiv 1905.04457): a triplet loss whose margin per
# triplet follows the teacher's distance gap (m in [0.2, 0.5]); batch-hard
# triplets from identity-balanced batches (16 identities x 4 images).
_base_ = ['../_base_/kd_synthface_age.py']
train_dataloader = dict(
    sampler=dict(_delete_=True, type='IdentityBalancedSampler',
                 num_identities=16, images_per_identity=4))
model = dict(distill_losses=dict(
    loss_triplet=dict(type='TripletDistillationLoss', m_max=0.5, m_min=0.2,
                      distance='l2', loss_weight=1.0,
                      inputs=dict(s_emb='student.embedding',
                                  t_emb='teacher_fr.embedding',
                                  labels='data.label'))))
