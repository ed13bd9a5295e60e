# Attention transfer (arXiv 1612.03928), RepDistiller's form (mode='code',
# p=2, weight 1000) on the last two stages; channel counts may differ, the
# spatial attention maps are compared.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_at3=dict(type='ATLoss', p=2.0, mode='code', loss_weight=1000.0,
                  inputs=dict(s_feat='student.stage3',
                              t_feat='teacher_fr.stage3')),
    loss_at4=dict(type='ATLoss', p=2.0, mode='code', loss_weight=1000.0,
                  inputs=dict(s_feat='student.stage4',
                              t_feat='teacher_fr.stage4'))))
