# Real faces: how much of the gap between a small student trained alone and
# a pretrained teacher each KD method closes, on CelebA-299 (train) and
# LFW + CFP-FF (test, 10-fold protocol). Same student, data, schedule and
# protocol for every student run; teachers are the pretrained ONNX models in
# ../shared/teachers (they see the 64 px batch resized to their 112x112;
# students see 64x64 on CPU). Data paths: _base_/datasets/celeba299_lfw_cfp.py.
#   kdzoo compare recipes/suites/real_faces.py
# On a GPU, train at full size with
#   --cfg-options train_dataloader.dataset.image_size=112 \
#     test_dataloader.dataset.image_size=112 \
#     model.student.backbone.input_size="(112, 112)" train_cfg.max_epochs=30
work_dir = 'work_dirs/real_faces'
runs = [
    # The teacher's own row (pretrained, no training) is optional: on a
    # 2-core CPU it takes several minutes for LFW + CFP-FF at 112 px
    # (kdzoo measured LFW 99.45 %, see docs/speed.md). Enable it with
    #   dict(name='teacher_sirius', role='teacher',
    #        recipe='../real_faces/teacher_eval.py',
    #        cfg_options={'model.student.backbone.file':
    #                     '../shared/teachers/mobilefacenet_sirius.onnx'}),
    dict(name='student_alone', recipe='../real_faces/student_alone.py'),
    dict(name='angular_kd', recipe='../real_faces/angular_kd.py'),
    dict(name='rkd', recipe='../real_faces/rkd.py'),
    dict(name='ekd', recipe='../real_faces/ekd.py'),
    dict(name='liaad', recipe='../real_faces/liaad.py'),
]
columns = [('LFW acc %', 'lfw/accuracy'), ('LFW TAR@1e-3', 'lfw/TAR@FAR=1e-3'),
           ('CFP-FF acc %', 'cfp_ff/accuracy'),
           ('CFP-FF TAR@1e-3', 'cfp_ff/TAR@FAR=1e-3')]
plot = dict(protocol='lfw', far=1e-3)
