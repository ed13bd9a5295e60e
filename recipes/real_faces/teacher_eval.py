# A pretrained ONNX teacher evaluated on LFW + CFP-FF at its native
# 112x112 (no training): the upper reference of the real-data suite.
#   kdzoo test recipes/real_faces/teacher_eval.py \
#       --cfg-options model.student.backbone.file=PATH.onnx
_base_ = ['../_base_/default_runtime.py',
          '../_base_/datasets/celeba299_lfw_cfp.py']
train_dataloader = None
model = dict(
    type='FaceDistiller',
    data_preprocessor=dict(type='FaceDataPreprocessor', mean=127.5,
                           std=128.0),
    student=dict(backbone=dict(
        type='OnnxBackbone',
        file='../shared/teachers/mobilefacenet_sirius.onnx')),
    test_cfg=dict(flip=True))
test_dataloader = dict(batch_size=128, dataset=dict(image_size=None))
