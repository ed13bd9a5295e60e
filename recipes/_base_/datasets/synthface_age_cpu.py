# SynthFaceAge sized for a 2-core CPU: 32x32 images, 400 training identities
# x 16 ages; test on 1000 unseen identities x 12 images (+10000 distractor
# identities) with standard, cross-age and identification protocols. The
# test split is sized so that a single run's cross-age TAR@FAR=1e-3 has a
# 95 % interval (bootstrap over test identities) about 0.04 wide, scored
# over all pairs (millions of negatives, not a few thousand).
image_size = 32
num_classes = 400
data_seed = 0
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='SynthFaceAge', split='train', num_identities=num_classes,
        images_per_identity=16, image_size=image_size, seed=data_seed,
        pipeline=[dict(type='RandomHorizontalFlip', prob=0.5),
                  dict(type='PackFaceInputs')]))
test_dataloader = dict(
    batch_size=256,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='SynthFaceAge', split='test', num_identities=1000,
        images_per_identity=12, num_distractors=10000,
        image_size=image_size, seed=data_seed,
        pipeline=[dict(type='PackFaceInputs')]))
test_evaluator = [dict(type='FaceVerificationMetric'),
                  dict(type='FaceIdentificationMetric')]
test_cfg = dict(type='TestLoop')
