# Hinton KD (arXiv 1503.02531) on the margin-free logits s*cos(theta) of the
# student's CosFace head and the FR teacher's trained CosFace head (same 400
# training identities). tau=4 as RepDistiller/mdistiller; KD weight 1 next to
# the identity loss (RepDistiller's CE 0.1 / KD 0.9 split is a CIFAR choice).
_base_ = ['../_base_/kd_synthface_age_teacher_head.py']
model = dict(distill_losses=dict(
    loss_kd=dict(type='KDLoss', tau=4.0, loss_weight=1.0,
                 inputs=dict(s_logits='student.logits',
                             t_logits='teacher_fr.logits'))))
