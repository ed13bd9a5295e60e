# LIAAD ablation: the age teacher's attention maps only (stages 3 and 4,
# reconstructed transfer term), no FR teacher. See liaad.py.
_base_ = ['../_base_/liaad_synthface_age.py']
model = dict(
    teachers=dict(teacher_fr=None),
    distill_losses=dict(
        loss_att3=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=1000.0,
            inputs=dict(s_feat='student.stage3',
                        t_feat='teacher_age.stage3')),
        loss_att4=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=1000.0,
            inputs=dict(s_feat='student.stage4',
                        t_feat='teacher_age.stage4'))))
