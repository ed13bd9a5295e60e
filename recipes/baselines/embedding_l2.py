# Embedding L2 ("vanilla KD", AdaDistill Eq. 2): mean over the batch of
# ||P(s) - t||^2 on raw embeddings, P a Linear+BN projector 64 -> 128.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    connectors=dict(proj_fr=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_l2=dict(type='EmbeddingL2Loss', normalize=False,
                     loss_weight=1.0,
                     inputs=dict(s_emb=dict(tap='student.embedding',
                                            connector='proj_fr'),
                                 t_emb='teacher_fr.embedding'))))
