# Shared by every distillation recipe on the CPU demo: the student of
# students/mbf_synthface_age.py plus the frozen FR teacher trained by
# teachers/iresnet_synthface_age.py (backbone and, for logit losses, its
# CosFace head). Suites set the checkpoint paths with
# model.teachers.teacher_fr.checkpoint / .head_checkpoint; standalone runs
# read them from the quick-start work dir.
_base_ = ['../students/mbf_synthface_age.py']
model = dict(
    teachers=dict(
        teacher_fr=dict(
            type='CheckpointTeacher',
            backbone={{_base_.teacher_backbone}},
            checkpoint='work_dirs/quickstart/teacher/backbone.pth')))
