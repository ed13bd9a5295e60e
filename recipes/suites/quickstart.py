# The main job (README): on SynthFaceAge at CPU size, train the FR teacher,
# the student alone and the angular-KD student, evaluate all three on unseen
# identities and tabulate. About 5 minutes on a 2-core CPU (measured: docs/results/quickstart.md).
work_dir = 'work_dirs/quickstart'
runs = [
    dict(name='teacher', role='teacher',
         recipe='../teachers/iresnet_synthface_age.py'),
    dict(name='student_alone', recipe='../students/mbf_synthface_age.py'),
    dict(name='angular_kd', recipe='../kd/angular_kd_synthface_age.py',
         cfg_options={'model.teachers.teacher_fr.checkpoint':
                      '{teacher}/backbone.pth'}),
]
