# What the field does for small students on little data, tried on the
# real-faces suite (recipes/suites/real_faces.py, whose runs, data,
# protocol, reference and weight-search set-up this file takes over):
#   - a longer schedule: angular KD alone, LIAAD and angular_attention at
#     24 epochs instead of 12 (the same weights; the LR schedule stretches
#     with the epochs), and angular KD alone and LIAAD at 48;
#   - a wider student within the 0.5 M budget: LIAAD at 24 and 48
#     epochs with MobileFaceNet width 0.45 (0.431 M parameters instead of
#     0.295 M; the training-only projector is not counted);
#   - mixing both teachers: their batch similarity matrices averaged
#     (angular_mixed_similarity) or their angular terms weighted per image
#     by a learned gate (two_teacher_gated), each with its own 3-point
#     weight search on the held-out CelebA-299 identities:
#       kdzoo compare recipes/suites/real_faces_ablations.py --grid \
#           --jobs 2 --threads 1
#   - then the runs themselves, beside the suite's own (same work dir, so
#     the suite's finished runs are reused, not retrained):
#       kdzoo compare recipes/suites/real_faces_ablations.py --jobs 2 \
#           --threads 1
# Results: docs/results/real_faces.md. Measured on a 2-core EPYC, one
# thread per run, two at a time: a run trains in about 20-36 min (12
# epochs), 40-50 min (24) or 75-80 min (48); the mixes' weight searches
# took 36-45 min of one core per method (teacher caches included).
from mmengine.config import read_base

with read_base():
    from .real_faces import *  # noqa: F401,F403

_long = {'train_cfg.max_epochs': 24}
_longer = {'train_cfg.max_epochs': 48}
_wide = {'model.student.backbone.width_mult': 0.45}
runs = runs + [  # noqa: F405
    dict(name='angular_mixed_similarity',
         recipe='../real_faces/angular_mixed_similarity.py'),
    dict(name='two_teacher_gated',
         recipe='../real_faces/two_teacher_gated.py'),
    dict(name='angular_kd_no_id_24ep',
         recipe='../real_faces/angular_kd_no_id.py', cfg_options=_long),
    dict(name='liaad_24ep', recipe='../real_faces/liaad.py',
         cfg_options=_long),
    dict(name='angular_attention_24ep',
         recipe='../real_faces/angular_attention.py', cfg_options=_long),
    dict(name='liaad_48ep', recipe='../real_faces/liaad.py',
         cfg_options=_longer),
    dict(name='angular_kd_no_id_48ep',
         recipe='../real_faces/angular_kd_no_id.py', cfg_options=_longer),
    dict(name='liaad_wide_24ep', recipe='../real_faces/liaad.py',
         cfg_options={**_long, **_wide}),
    dict(name='liaad_wide_48ep', recipe='../real_faces/liaad.py',
         cfg_options={**_longer, **_wide}),
]
contrasts = contrasts + [  # noqa: F405
    ('angular_mixed_similarity', 'angular_kd_no_id',
     "both teachers' similarities mixed"),
    ('two_teacher_gated', 'two_teacher_angular',
     'per-image gate vs fixed weights'),
    ('angular_kd_no_id_24ep', 'angular_kd_no_id', '24 vs 12 epochs'),
    ('liaad_24ep', 'liaad', '24 vs 12 epochs'),
    ('angular_attention_24ep', 'angular_attention', '24 vs 12 epochs'),
    ('liaad_24ep', 'angular_kd_no_id_24ep', "LIAAD's terms at 24 epochs"),
    ('liaad_24ep', 'angular_attention_24ep',
     "second teacher vs the first's maps at 24 epochs"),
    ('liaad_48ep', 'liaad_24ep', '48 vs 24 epochs'),
    ('liaad_48ep', 'liaad', '48 vs 12 epochs'),
    ('angular_kd_no_id_48ep', 'angular_kd_no_id_24ep', '48 vs 24 epochs'),
    ('liaad_48ep', 'angular_kd_no_id_48ep', "LIAAD's terms at 48 epochs"),
    ('liaad_wide_24ep', 'liaad_24ep', 'width 0.45 vs 0.35 student'),
    ('liaad_wide_48ep', 'liaad_wide_24ep', '48 vs 24 epochs, width 0.45'),
    ('liaad_wide_48ep', 'liaad_48ep', 'width 0.45 vs 0.35 at 48 epochs'),
]
# the search covers the added methods only (the suite's own weights are
# searched by recipes/suites/real_faces.py --grid)
grid = dict(grid, runs=dict(  # noqa: F405
    angular_mixed_similarity={
        'model.distill_losses.loss_mix.loss_weight': [100.0, 1000.0,
                                                      10000.0]},
    two_teacher_gated={
        'model.distill_losses.loss_gate.loss_weight': [64.0, 256.0,
                                                       1024.0]},
))
