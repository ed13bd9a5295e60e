# DarkRank (arXiv 1707.01220), TFace's listwise Plackett-Luce loss on the
# teacher's 3 nearest neighbours in the batch (alpha 3, beta 3).
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_darkrank=dict(type='DarkRankLoss', alpha=3.0, beta=3.0,
                       permute_len=3, loss_weight=1.0,
                       inputs=dict(s_emb='student.embedding',
                                   t_emb='teacher_fr.embedding'))))
