# General face-recognition teacher on SynthFaceAge (CPU demo size).
#   what:    IResNet (width 0.25, blocks 1-2-2-1, 128-d) trained with identity
#            labels only (no age labels): the "FR teacher" that later recipes
#            distil from.
#   data:    SynthFaceAge train split, 400 identities x 16 ages, 32x32.
#   output:  work_dir/backbone.pth (+ head.pth), test metrics in results.json.
#   expect:  clearly above the student trained alone on cross-age
#            TAR@FAR=1e-3 (docs/results/quickstart.md).
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
        backbone={{_base_.teacher_backbone}},
        head=dict(type='CosFace', num_classes={{_base_.num_classes}},
                  embedding_size=128, s=32.0, m=0.35)))
