# Runtime shared by every kdzoo recipe: mmengine hooks, atomic checkpoints,
# rich progress, and the student export (backbone.pth / head.pth).
default_scope = 'kdzoo'
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
               dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0, deterministic=False)
log_level = 'INFO'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2,
                    backend_args=dict(backend='kdzoo_atomic')),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [dict(type='RichProgressHook'), dict(type='ExportStudentHook')]
log_processor = dict(window_size=20, by_epoch=True)
# TensorBoard event files beside vis_data/scalars.json when the tensorboard
# package is installed (pip install 'kdzoo[tensorboard]'); True requires it,
# False turns it off. kdzoo/engine/visualization.py says what is written.
tensorboard = 'auto'
load_from = None
resume = False
