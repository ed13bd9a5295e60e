# Real data, one teacher, two kinds of term: angular KD to the sirius
# teacher (angular_kd_no_id.py) plus attention transfer from the same
# teacher's stage-3 and stage-4 maps (14x14 and 7x7, the outputs of its
# last residual blocks there, found in its converted graph) to the
# student's stages 3 and 4 (channel mean of |F|^2, L2-normalised, as in
# liaad.py). Beside liaad.py, which takes attention maps and a second
# final angular term from the faceplugin teacher, it asks whether
# attention transfer helps without a second teacher (it is not LIAAD's
# term itself: the maps here are the sirius teacher's). The teacher's maps
# are cached with its embeddings (about 1.6 GB in float32 for
# CelebA-299), so no teacher runs during training; tapping stages makes
# the ONNX teacher run in PyTorch (onnx2torch) while the cache is built.
# Attention weights 10000: the best validation mean of the suite's search
# over 100, 1000, 10000 (none distinguishable from another).
_base_ = ['./angular_kd_no_id.py']
_sirius = 'MobileFaceNet/MobileFaceNet/'
model = dict(
    teachers=dict(
        teacher_fr=dict(
            # outputs at 56, 28, 14 and 7 px
            stage_paths=[_sirius + 'SeparableConv2d/add',
                         _sirius + 'Conv2d_2_InvResBlock_4/Add',
                         _sirius + 'Conv2d_4_InvResBlock_5/Add',
                         _sirius + 'Conv2d_6_InvResBlock_1/Add'])),
    distill_losses=dict(
        loss_att3=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=10000.0,
            inputs=dict(s_feat='student.stage3', t_feat='teacher_fr.stage3')),
        loss_att4=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=10000.0,
            inputs=dict(s_feat='student.stage4',
                        t_feat='teacher_fr.stage4'))))
