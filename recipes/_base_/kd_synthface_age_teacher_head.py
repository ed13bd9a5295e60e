# As kd_synthface_age.py, with the teacher's trained CosFace head loaded, for
# losses that read teacher_fr.logits or the teacher's class centres.
_base_ = ['./kd_synthface_age.py']
model = dict(
    teachers=dict(
        teacher_fr=dict(
            head=dict(type='CosFace', num_classes={{_base_.num_classes}},
                      embedding_size=128, s=32.0, m=0.35),
            head_checkpoint='work_dirs/quickstart/teacher/head.pth')))
