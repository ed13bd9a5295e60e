# Real faces, sized for a CPU: train on CelebA-299 (299 identities, 6246
# aligned 112x112 JPEGs, one folder per identity; horizontal flip the only
# augmentation), test on LFW (6000 pairs) and CFP-FF (7000 pairs) from
# InsightFace .bin files, 10-fold protocol. Images are resized to
# `image_size` (64 on CPU; 112 is the native size, for GPUs).
# Paths are config options (defaults: the development data in ../shared):
#   --cfg-options train_dataloader.dataset.data_root=DIR
#                 test_dataloader.dataset.ann_files="['a.bin','b.bin']"
image_size = 64
num_classes = 299
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='ImageFolderFaces',
        data_root='../shared/data/train/celeba299/images',
        image_size=image_size,
        pipeline=[dict(type='RandomHorizontalFlip', prob=0.5),
                  dict(type='PackFaceInputs')]))
test_dataloader = dict(
    batch_size=256,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='InsightFaceBinSets',
        ann_files=['../shared/data/verification/lfw.bin',
                   '../shared/data/verification/cfp_ff.bin'],
        image_size=image_size,
        pipeline=[dict(type='PackFaceInputs')]))
test_evaluator = [dict(type='FaceVerificationMetric')]
test_cfg = dict(type='TestLoop')
