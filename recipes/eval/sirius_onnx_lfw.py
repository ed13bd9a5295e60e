# Evaluate a pretrained ONNX face model on LFW with the InsightFace protocol
# (flip-sum embeddings, 10-fold accuracy, TAR@FAR), through the runner:
#   kdzoo test recipes/eval/sirius_onnx_lfw.py
#   model: ../shared/teachers/mobilefacenet_sirius.onnx (input (x-127.5)/128)
#   data:  ../shared/data/verification/lfw.bin
#   expect: 99.45 % accuracy (the figure published with the file).
# Change paths with --cfg-options model.student.backbone.file=... and
# test_dataloader.dataset.ann_file=...
_base_ = ['../_base_/default_runtime.py']
model = dict(
    type='FaceDistiller',
    data_preprocessor=dict(type='FaceDataPreprocessor', mean=127.5, std=128.0,
                           channels_last=True),
    student=dict(backbone=dict(
        type='OnnxBackbone', runtime='onnxruntime',  # inference only
        file='../shared/teachers/mobilefacenet_sirius.onnx')),
    test_cfg=dict(flip=True))
test_dataloader = dict(
    batch_size=64, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='InsightFaceBinDataset',
                 ann_file='../shared/data/verification/lfw.bin'))
test_evaluator = [dict(type='FaceVerificationMetric')]
test_cfg = dict(type='TestLoop')
