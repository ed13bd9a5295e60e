# Real faces at 112 px: how much of the gap between a small student trained
# alone and a pretrained teacher (LFW 99.45 %) each KD method closes, on
# CelebA-299 (train) and LFW + CFP-FF (test: 10-fold accuracy on the
# official pairs, TAR@FAR over all pairs of their images with identity-
# bootstrap intervals). Same student (MobileFaceNet, 0.295 M parameters),
# data, 12-epoch schedule, batch 128 and protocol for every student run
# (recipes/_base_/real_faces.py); teachers are the pretrained ONNX models
# in ../shared/teachers. Data paths: _base_/datasets/celeba299_lfw_cfp.py.
#   kdzoo compare recipes/suites/real_faces.py --jobs 2 --threads 1
# Results, wall time and device: docs/results/real_faces.md; the runs'
# records (results.json, bootstrap.npz) are in docs/results/records/
# real_faces/: a copy of it as --work-dir trains only what is missing, and
#   --seeds 3 --export-records docs/results/records/real_faces
# adds the new runs' records there (docs/compare.md).
# Loss weights: every KD run gets the same 3-point search, trained on 249 of
# the 299 training identities for 6 epochs and chosen by TAR@FAR=1e-3 over
# all pairs of the 50 held out (never on LFW/CFP):
#   kdzoo compare recipes/suites/real_faces.py --grid --jobs 2 --threads 1
# writes work_dirs/real_faces/grid/grid.md (each point, its interval, its
# paired difference to the choice, the choice and what the runs below use).
# Every run starts from the same three values; a run whose choice lands at
# the grid's end and beats its neighbour (grid.md flags it) gets the next
# value beyond that end, as the angular runs did (a fourth value, 256 and
# 128 per teacher).
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
    dict(name='angular_attention',
         recipe='../real_faces/angular_attention.py'),
    dict(name='two_teacher_angular',
         recipe='../real_faces/two_teacher_angular.py'),
    dict(name='angular_kd', recipe='../real_faces/angular_kd.py'),
    dict(name='rkd', recipe='../real_faces/rkd.py'),
    dict(name='ekd', recipe='../real_faces/ekd.py'),
]
baseline = 'student_alone'
reference = 'angular_kd_no_id'
# What LIAAD's parts add, as paired differences (A - B); each run's
# difference to angular_kd_no_id (angular KD alone) is in the table anyway.
contrasts = [
    ('liaad', 'two_teacher_angular', "second teacher's attention terms"),
    ('liaad', 'angular_attention',
     "second teacher (final term and maps) vs the first's maps"),
]
columns = [('LFW acc %', 'lfw/accuracy'), ('LFW TAR@1e-3', 'lfw/TAR@FAR=1e-3'),
           ('CFP-FF acc %', 'cfp_ff/accuracy'),
           ('CFP-FF TAR@1e-3', 'cfp_ff/TAR@FAR=1e-3')]
compare_keys = ['lfw/accuracy', 'lfw/TAR@FAR=1e-3', 'cfp_ff/accuracy',
                'cfp_ff/TAR@FAR=1e-3']
plot = dict(protocol='lfw', far=1e-3)

_val = dict(data_root='../shared/data/train/celeba299/images',
            val_identities=50, split_seed=0)
_ang = 'model.distill_losses.loss_ang.loss_weight'
_ang2 = 'model.distill_losses.loss_ang2.loss_weight'
_att = 'model.distill_losses.loss_att{}.loss_weight'
_rkd = 'model.distill_losses.loss_rkd.'
grid = dict(
    select='val/TAR@FAR=1e-3',
    columns=['val/TAR@FAR=1e-3', 'val/accuracy'],
    cfg_options={
        'train_dataloader.dataset.split': 'train',
        'train_dataloader.dataset.val_identities': _val['val_identities'],
        'train_dataloader.dataset.split_seed': _val['split_seed'],
        'model.student.head.num_classes': 299 - _val['val_identities'],
        'train_cfg.max_epochs': 6,
        'test_dataloader.dataset': dict(
            _delete_=True, type='ImageFolderVerification', split='val',
            image_size=112, pipeline=[dict(type='PackFaceInputs')], **_val),
    },
    runs=dict(
        angular_kd={_ang: [4.0, 16.0, 64.0, 256.0]},
        angular_kd_no_id={_ang: [4.0, 16.0, 64.0, 256.0]},
        two_teacher_angular=[{_ang: w, _ang2: w}
                             for w in (2.0, 8.0, 32.0, 128.0)],
        liaad=[{_att.format(3): w, _att.format(4): w}
               for w in (100.0, 1000.0, 10000.0)],
        angular_attention=[{_att.format(3): w, _att.format(4): w}
                           for w in (100.0, 1000.0, 10000.0)],
        rkd=[{_rkd + 'w_dist': 25.0 * f, _rkd + 'w_angle': 50.0 * f}
             for f in (0.2, 1.0, 5.0)],
        ekd={'model.distill_losses.loss_ekd.loss_weight': [0.25, 1.0, 4.0]},
    ))
