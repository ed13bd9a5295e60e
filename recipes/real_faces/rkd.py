# Real data, RKD (Park et al., CVPR 2019: distance and angle relations of
# the batch's embeddings) from the pretrained ONNX teacher, cached; weights
# as recipes/baselines/rkd.py.
_base_ = ['../_base_/real_faces.py']
model = dict(distill_losses=dict(
    loss_rkd=dict(type='RKDLoss', w_dist=25.0, w_angle=50.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding'))))
