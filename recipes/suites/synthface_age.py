# The default LIAAD-vs-baselines comparison on the embedded data, sized to
# finish within 30 minutes on a 2-core CPU (one seed): both teachers (the
# general FR teacher and LIAAD's age-invariant one), the student alone,
# angular KD, KD, RKD and EKD (one logit, one relational and one
# face-evaluation baseline; recipes/suites/baselines.py has all of them),
# LIAAD and its ablations. Same student, data, schedule and
# protocol for every student run.
#   kdzoo compare recipes/suites/synthface_age.py [--seeds 3]
# Reconstructed parts of LIAAD: see recipes/liaad/liaad.py and docs/liaad.md.
work_dir = 'work_dirs/synthface_age'
# Paired differences (better / worse / not distinguishable, 95 % interval
# over seeds and test identities) against the student alone and against KD,
# the strongest baseline of this suite in earlier measurements.
reference = 'kd'
# LIAAD's parts, each as a paired difference (A - B):
contrasts = [
    ('liaad', 'liaad_fr_stagewise', "age teacher's attention terms"),
    ('liaad', 'liaad_age_attention', "FR teacher's angular terms"),
    ('liaad_fr_stagewise', 'angular_kd', "FR teacher's stage-wise terms"),
]
_teacher = {'model.teachers.teacher_fr.checkpoint': '{teacher}/backbone.pth'}
_teacher_head = dict(
    _teacher,
    **{'model.teachers.teacher_fr.head_checkpoint': '{teacher}/head.pth'})
_age_teacher = {
    'model.teachers.teacher_age.checkpoint': '{age_teacher}/backbone.pth'}

runs = [
    dict(name='teacher', role='teacher',
         recipe='../teachers/iresnet_synthface_age.py'),
    dict(name='age_teacher', role='teacher',
         recipe='../teachers/iresnet_age_invariant_synthface_age.py'),
    dict(name='student_alone', recipe='../students/mbf_synthface_age.py'),
    # LIAAD ablation "FR teacher, final angular only" = ShrinkTeaNet Eq. 4
    dict(name='angular_kd', recipe='../kd/angular_kd_synthface_age.py',
         cfg_options=_teacher),
    dict(name='kd', recipe='../baselines/kd.py', cfg_options=_teacher_head),
    dict(name='rkd', recipe='../baselines/rkd.py', cfg_options=_teacher),
    dict(name='ekd', recipe='../baselines/ekd.py', cfg_options=_teacher),
    dict(name='liaad', recipe='../liaad/liaad.py',
         cfg_options=dict(_teacher, **_age_teacher)),
    dict(name='liaad_fr_stagewise', recipe='../liaad/liaad_fr_stagewise.py',
         cfg_options=_teacher),
    dict(name='liaad_age_attention', recipe='../liaad/liaad_age_attention.py',
         cfg_options=_age_teacher),
]
