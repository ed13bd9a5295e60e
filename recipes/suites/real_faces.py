# Real faces at 112 px: how much of the gap between a small student trained
# alone and a pretrained teacher (LFW 99.45 %) each KD method closes, on
# CelebA-299 (train) and LFW + CFP-FF (test: 10-fold accuracy on the
# official pairs, TAR@FAR over all pairs of their images with identity-
# bootstrap intervals). Same student (MobileFaceNet, 0.28 M parameters),
# data, 12-epoch schedule, batch 128 and protocol for every student run
# (recipes/_base_/real_faces.py); teachers are the pretrained ONNX models
# in ../shared/teachers. Data paths: _base_/datasets/celeba299_lfw_cfp.py.
#   kdzoo compare recipes/suites/real_faces.py --jobs 2 --threads 1
# Results, wall time and device: docs/results/real_faces.md.
work_dir = 'work_dirs/real_faces'
runs = [
    # The teacher's own row (pretrained, no training) is optional: on a
    # 2-core CPU it takes several minutes for LFW + CFP-FF (kdzoo measured
    # LFW 99.45 %, see docs/speed.md). Enable it with
    #   dict(name='teacher_sirius', role='teacher',
    #        recipe='../real_faces/teacher_eval.py',
    #        cfg_options={'model.student.backbone.file':
    #                     '../shared/teachers/mobilefacenet_sirius.onnx'}),
    dict(name='student_alone', recipe='../real_faces/student_alone.py'),
    dict(name='angular_kd_no_id', recipe='../real_faces/angular_kd_no_id.py'),
    dict(name='liaad', recipe='../real_faces/liaad.py'),
    dict(name='two_teacher_angular',
         recipe='../real_faces/two_teacher_angular.py'),
    dict(name='angular_kd', recipe='../real_faces/angular_kd.py'),
    dict(name='rkd', recipe='../real_faces/rkd.py'),
    dict(name='ekd', recipe='../real_faces/ekd.py'),
]
baseline = 'student_alone'
reference = 'angular_kd_no_id'
columns = [('LFW acc %', 'lfw/accuracy'), ('LFW TAR@1e-3', 'lfw/TAR@FAR=1e-3'),
           ('CFP-FF acc %', 'cfp_ff/accuracy'),
           ('CFP-FF TAR@1e-3', 'cfp_ff/TAR@FAR=1e-3')]
compare_keys = ['lfw/accuracy', 'lfw/TAR@FAR=1e-3', 'cfp_ff/TAR@FAR=1e-3']
plot = dict(protocol='lfw', far=1e-3)
