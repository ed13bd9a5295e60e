# Every baseline KD recipe (recipes/baselines/) next to the student alone,
# angular KD and the LIAAD recipes (recipes/liaad/), on the same student, FR
# teacher, SynthFaceAge data and protocol. LIAAD's second teacher is trained
# here too (recipes/teachers/iresnet_age_invariant_synthface_age.py).
# `kdzoo compare recipes/suites/baselines.py --seeds 3` trains what is
# missing (teachers once, every student at seeds 0, 1, 2) and marks each
# student's difference to the student alone and to KD (the best baseline of
# the default suite, recipes/suites/synthface_age.py) as better / worse /
# not distinguishable.
work_dir = 'work_dirs/baselines'
reference = 'kd'
contrasts = [
    ('liaad', 'liaad_fr_stagewise', "age teacher's attention terms"),
    ('liaad', 'liaad_age_attention', "FR teacher's angular terms"),
    ('liaad_fr_stagewise', 'angular_kd', "FR teacher's stage-wise terms"),
    ('liaad_teacher_attention', 'liaad',
     'earlier per-sample two-teacher reading vs the figure reading'),
    # against DKD, the baseline with the highest mean cross-age TAR@1e-3 in
    # the three-seed run (docs/results/baselines.md), and its closest rivals
    ('liaad', 'dkd', 'LIAAD vs the top baseline'),
    ('liaad_fr_stagewise', 'dkd',
     "LIAAD's FR-teacher part vs the top baseline"),
    ('dkd', 'margin_kd', 'top two baselines'),
    ('dkd', 'embedding_l2', 'top baseline vs the best feature baseline'),
]
_teacher = {'model.teachers.teacher_fr.checkpoint': '{teacher}/backbone.pth'}
_teacher_head = dict(
    _teacher,
    **{'model.teachers.teacher_fr.head_checkpoint': '{teacher}/head.pth'})

_age_teacher = {
    'model.teachers.teacher_age.checkpoint': '{age_teacher}/backbone.pth'}


def _kd(name, options=_teacher, **extra):
    return dict(name=name, recipe=f'../baselines/{name}.py',
                cfg_options=dict(options, **extra))


runs = [
    dict(name='teacher', role='teacher',
         recipe='../teachers/iresnet_synthface_age.py'),
    dict(name='student_alone', recipe='../students/mbf_synthface_age.py'),
    dict(name='angular_kd', recipe='../kd/angular_kd_synthface_age.py',
         cfg_options=_teacher),
    _kd('kd', _teacher_head),
    _kd('dkd', _teacher_head),
    _kd('dist', _teacher_head),
    _kd('margin_kd', _teacher_head),
    _kd('fitnet'),
    _kd('at'),
    _kd('pkt'),
    _kd('rkd'),
    _kd('sp'),
    _kd('cc'),
    _kd('darkrank'),
    _kd('crd'),
    _kd('embedding_l2'),
    _kd('cosine_embedding'),
    _kd('ekd'),
    _kd('ddl'),
    _kd('triplet_distillation'),
    _kd('margin_distillation', **{
        'model.distill_losses.loss_md.head_checkpoint': '{teacher}/head.pth'}),
    _kd('adadistill'),
    dict(name='age_teacher', role='teacher',
         recipe='../teachers/iresnet_age_invariant_synthface_age.py'),
    dict(name='liaad', recipe='../liaad/liaad.py',
         cfg_options=dict(_teacher, **_age_teacher)),
    dict(name='liaad_teacher_attention',
         recipe='../liaad/liaad_teacher_attention.py',
         cfg_options=dict(_teacher, **_age_teacher)),
    # ablations: each drops one teacher
    dict(name='liaad_fr_stagewise', recipe='../liaad/liaad_fr_stagewise.py',
         cfg_options=_teacher),
    dict(name='liaad_age_attention', recipe='../liaad/liaad_age_attention.py',
         cfg_options=_age_teacher),
]
