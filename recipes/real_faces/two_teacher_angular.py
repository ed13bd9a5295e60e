# Real data, two teachers, final angular KD from both: the sirius ONNX
# teacher (192-d, compared with the student's 192-d embedding directly) and
# the faceplugin ONNX teacher (512-d, through a training-only Linear+BN
# projector 192 -> 512), both embeddings cached (image and mirror),
# no identity loss. 128 each: the best validation mean of the suite's
# search over 2, 8, 32, 128 (128 was added when 32 came out best at the
# grid's end; the two are not distinguishable, as angular_kd's 64 and 256).
_base_ = ['./angular_kd_no_id.py']
model = dict(
    teachers=dict(
        teacher_fr2=dict(type='OnnxTeacher',
                         file='../shared/teachers/faceplugin_fr_feature.onnx',
                         input_size=(112, 112))),
    teacher_cache=dict(teachers=['teacher_fr', 'teacher_fr2']),
    connectors=dict(
        proj_fr2=dict(type='LinearProjector', out_features=512)),
    distill_losses=dict(
        loss_ang=dict(loss_weight=128.0),
        loss_ang2=dict(
            type='AngularDistillationLoss', p=2, loss_weight=128.0,
            inputs=dict(s_emb=dict(tap='student.embedding',
                                   connector='proj_fr2'),
                        t_emb='teacher_fr2.embedding'))))
