# KD on margin-applied logits, as GKD (AAAI'23) and MarginDistillation's
# "margin-based KD with T" use them: both heads' target logits get the
# CosFace margin the heads trained with (s=32, m=0.35), then Hinton KD, tau=4.
_base_ = ['../_base_/kd_synthface_age_teacher_head.py']
model = dict(distill_losses=dict(
    loss_mkd=dict(type='MarginKDLoss', tau=4.0, s=32.0, m=0.35,
                  margin='cosface',
                  inputs=dict(s_logits='student.logits',
                              t_logits='teacher_fr.logits',
                              labels='data.label'))))
