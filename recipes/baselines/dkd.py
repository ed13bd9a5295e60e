# Decoupled KD (arXiv 2203.08679, mdistiller): alpha*TCKD + beta*NCKD on the
# heads' margin-free logits; mdistiller's CIFAR alpha=1, beta=8, tau=4; the
# linear warm-up is scaled to this 20-epoch schedule (5 epochs instead of 20
# of 240).
_base_ = ['../_base_/kd_synthface_age_teacher_head.py']
model = dict(distill_losses=dict(
    loss_dkd=dict(type='DKDLoss', alpha=1.0, beta=8.0, tau=4.0, warmup=5,
                  inputs=dict(s_logits='student.logits',
                              t_logits='teacher_fr.logits',
                              labels='data.label'))))
