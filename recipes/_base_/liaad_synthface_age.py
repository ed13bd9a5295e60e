# The two frozen teachers of LIAAD-style recipes on the CPU demo, next to the
# quick-start student: teacher_fr (general FR teacher, identity labels only:
# teachers/iresnet_synthface_age.py) and teacher_age (age-invariant teacher,
# identity and age labels: teachers/iresnet_age_invariant_synthface_age.py).
# Both are IResNet (stages 16/32/64/128 channels at 16/8/4/2 px for 32 px
# input); the student's MobileFaceNet stages have the same spatial sizes.
# Suites set the checkpoints with model.teachers.<name>.checkpoint.
_base_ = ['./kd_synthface_age.py']
model = dict(
    teachers=dict(
        teacher_age=dict(
            type='CheckpointTeacher',
            backbone={{_base_.teacher_backbone}},
            checkpoint='work_dirs/liaad/teacher_age/backbone.pth')))
