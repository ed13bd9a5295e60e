# AdaDistill (arXiv 2407.01332): ArcFace against class centres that are an
# EMA of the teacher's embeddings, with the adaptive weight alpha' (the
# paper's best); replaces the student's own head. m=0.45 as the paper's best
# ArcFace setting, s=32 for this small setup; projector 64 -> 128.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    student=dict(head=None),
    connectors=dict(proj_fr=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_ada=dict(type='AdaDistillLoss', num_classes=400,
                      embedding_size=128, s=32.0, m=0.45, margin='arcface',
                      alpha='weighted',
                      inputs=dict(s_emb=dict(tap='student.embedding',
                                             connector='proj_fr'),
                                  t_emb='teacher_fr.embedding',
                                  labels='data.label'))))
