# LIAAD ablation: the FR teacher's angular terms only (final + stage-wise,
# ShrinkTeaNet Eq. 4 + Eq. 6), no age teacher. See liaad.py.
_base_ = ['./liaad.py']
model = dict(
    teachers=dict(teacher_age=None),
    distill_losses=dict(loss_att3=None, loss_att4=None))
