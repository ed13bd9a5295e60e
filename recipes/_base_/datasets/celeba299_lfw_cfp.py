# Real faces: train on CelebA-299 (299 identities, 6246 aligned 112x112
# JPEGs, one folder per identity; horizontal flip the only augmentation),
# test on LFW (6000 pairs) and CFP-FF (7000 pairs) from InsightFace .bin
# files: 10-fold accuracy on the official pair lists, and TAR@FAR over all
# pairs of their images (BLUFR-style) with identity-bootstrap intervals,
# from the identity labels in ./labels (written by `kdzoo pack labels` from
# LFW's pairs.txt and the CFP protocol). Images at their native 112 px.
# Paths are config options (defaults: the development data in ../shared):
#   --cfg-options train_dataloader.dataset.data_root=DIR
#                 test_dataloader.dataset.ann_files="['a.bin','b.bin']"
#                 test_dataloader.dataset.labels_files="['a.tsv','b.tsv']"
image_size = 112
num_classes = 299
train_dataloader = dict(
    batch_size=128,
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
        labels_files=['recipes/_base_/datasets/labels/lfw.labels.tsv',
                      'recipes/_base_/datasets/labels/cfp_ff.labels.tsv'],
        image_size=image_size,
        pipeline=[dict(type='PackFaceInputs')]))
test_evaluator = [dict(type='FaceVerificationMetric')]
test_cfg = dict(type='TestLoop')
