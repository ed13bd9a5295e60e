# Shared by the real-data recipes (recipes/real_faces/): CelebA-299 train,
# LFW + CFP-FF test (datasets/celeba299_lfw_cfp.py), all at the native
# 112x112; a MobileFaceNet student of 0.295 M parameters (width 0.35,
# 192-d: the teacher's embedding width, so angular KD compares the
# student's own embedding with the teacher's, no projector in between) with
# a CosFace identity head weighted by `model.cls_loss_weight`
# (a recipe option; 0 trains on the distillation terms alone); batch
# 128, SGD with a one-epoch warm-up and cosine decay over `max_epochs`
# (12); and the pretrained ONNX FR teacher from ../shared/teachers
# (MobileFaceNet/ArcFace on MS1M, 192-d, LFW 99.45 %). The teacher's
# embeddings of every image and its mirror come from the teacher-output
# cache (computed once per teacher and data, shared by every run).
_base_ = [
    './default_runtime.py',
    './datasets/celeba299_lfw_cfp.py',
]
max_epochs = 12
student_backbone = dict(type='MobileFaceNet', width_mult=0.35,
                        embedding_size=192, input_size=(112, 112))
model = dict(
    type='FaceDistiller',
    data_preprocessor=dict(type='FaceDataPreprocessor'),
    cls_loss_weight=1.0,
    student=dict(
        backbone=student_backbone,
        head=dict(type='CosFace', num_classes={{_base_.num_classes}},
                  embedding_size=192, s=32.0, m=0.35)),
    teachers=dict(
        teacher_fr=dict(type='OnnxTeacher',
                        file='../shared/teachers/mobilefacenet_sirius.onnx',
                        input_size=(112, 112))),
    teacher_cache=dict(teachers=['teacher_fr']))
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='TrainableOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=1, end=max_epochs,
         eta_min=1e-4, convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs)
