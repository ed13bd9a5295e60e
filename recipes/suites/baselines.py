# Every baseline KD recipe (recipes/baselines/) next to the student alone,
# angular KD and the LIAAD recipes (recipes/liaad/), on the same student, FR
# teacher, SynthFaceAge data and protocol. LIAAD's second teacher is trained
# here too (recipes/teachers/iresnet_age_invariant_synthface_age.py).
# `kdzoo compare recipes/suites/baselines.py` trains what is missing and
# tabulates; one seed (seed 0).
work_dir = 'work_dirs/baselines'
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
