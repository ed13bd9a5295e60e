# MarginDistillation (arXiv 2003.02586): the student is trained against the
# teacher's frozen class centres with a per-sample ArcFace margin in
# [0.2, 0.5] set by how close the teacher is to its centre. The loss replaces
# the student's own head (head=None); s=32 as the teacher's head was trained.
# A Linear+BN projector maps the 64-d student embedding to the teacher's 128.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    student=dict(head=None),
    connectors=dict(proj_fr=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_md=dict(type='MarginDistillationLoss',
                     head_checkpoint='work_dirs/quickstart/teacher/head.pth',
                     s=32.0, m_max=0.5, m_min=0.2,
                     inputs=dict(s_emb=dict(tap='student.embedding',
                                            connector='proj_fr'),
                                 t_emb='teacher_fr.embedding',
                                 labels='data.label'))))
