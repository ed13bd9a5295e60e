# Real data, angular KD (ShrinkTeaNet final-layer term, arXiv 1905.10620
# Eq. 4/5): (1 - cos(P(s), t))^2 to the pretrained ONNX teacher's 192-d
# embedding, P a training-only Linear+BN projector 128 -> 192, next to the
# student's CosFace identity loss (weight model.cls_loss_weight, 1 here).
# Teacher embeddings (image and mirror) from the teacher-output cache.
_base_ = ['../_base_/real_faces.py']
model = dict(
    connectors=dict(
        proj_fr=dict(type='LinearProjector', out_features=192)),
    distill_losses=dict(
        loss_ang=dict(
            type='AngularDistillationLoss', p=2, loss_weight=16.0,
            inputs=dict(s_emb=dict(tap='student.embedding',
                                   connector='proj_fr'),
                        t_emb='teacher_fr.embedding'))))
