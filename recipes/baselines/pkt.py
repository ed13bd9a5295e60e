# Probabilistic knowledge transfer (arXiv 1803.10837), RepDistiller's form
# on the embeddings (dimensions may differ), weight 3e4 as RepDistiller.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_pkt=dict(type='PKTLoss', loss_weight=30000.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding'))))
