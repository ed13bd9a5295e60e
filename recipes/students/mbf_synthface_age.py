# Student trained alone (no teacher): the baseline every KD recipe must beat.
#   what:    MobileFaceNet (width 0.125, blocks 1-1-1-1, 64-d), CosFace head.
#   data:    SynthFaceAge train split (same as the teacher), 32x32.
#   expect:  well below the teacher on cross-age TAR@FAR=1e-3.
_base_ = [
    '../_base_/default_runtime.py',
    '../_base_/datasets/synthface_age_cpu.py',
    '../_base_/schedules/sgd_cpu.py',
    '../_base_/models/synthface_cpu_models.py',
]
model = dict(
    type='FaceDistiller',
    data_preprocessor=dict(type='FaceDataPreprocessor'),
    student=dict(
        backbone={{_base_.student_backbone}},
        head=dict(type='CosFace', num_classes={{_base_.num_classes}},
                  embedding_size=64, s=32.0, m=0.35)))
