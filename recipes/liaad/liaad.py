# LIAAD as the authors' framework figure draws it (Truong et al., "LIAAD:
# Lightweight Attentive Angular Distillation for Large-scale Age-Invariant
# Face Recognition", Neurocomputing 543:126198, 2023, arXiv 2004.05085).
#   VERIFIED (figure + ShrinkTeaNet, arXiv 1905.10620): two frozen teachers;
#     stage-wise distillation FR teacher stage i -> student stage i (all
#     stages); attention maps from the age-attentive teacher's stages 3 and
#     4 into the student's stages 3 and 4; final embeddings meet on the
#     hypersphere (angular distillation, Eq. 4/5) next to a margin-softmax
#     identity loss. ShrinkTeaNet's angular terms (Eq. 4 final, Eq. 6
#     stage-wise, lambda_i = lambda_{i+1}/2) are verified.
#   RECONSTRUCTED by kdzoo (the paper's equations are not available):
#     attention maps = L2-normalised channel mean of |F|^2 (attention
#     transfer), matched by the student (attention_use='transfer'); all
#     loss weights.
#   teachers: teacher_fr (general FR), teacher_age (age-invariant), see
#     _base_/liaad_synthface_age.py; student, data, schedule as the
#     baselines.
_base_ = ['../_base_/liaad_synthface_age.py']
model = dict(
    connectors=dict(
        proj_fr=dict(type='LinearProjector', out_features=128),
        stage1=dict(type='ConvProjector', out_channels=16),
        stage2=dict(type='ConvProjector', out_channels=32),
        stage3=dict(type='ConvProjector', out_channels=64)),
    distill_losses=dict(
        # final layer: ShrinkTeaNet Eq. 4, as recipes/kd/angular_kd
        loss_ang=dict(
            type='AngularDistillationLoss', p=2, loss_weight=16.0,
            inputs=dict(s_emb=dict(tap='student.embedding',
                                   connector='proj_fr'),
                        t_emb='teacher_fr.embedding')),
        # stages 1-3 through the FR teacher's later stages: ShrinkTeaNet
        # Eq. 6 with weights 0.5/0.25/0.125 (times loss_weight)
        loss_stage=dict(
            type='StagewiseAngularLoss', teacher='teacher_fr',
            stages=(1, 2, 3), p=2, loss_weight=16.0,
            inputs=dict(s_feat1=dict(tap='student.stage1',
                                     connector='stage1'),
                        s_feat2=dict(tap='student.stage2',
                                     connector='stage2'),
                        s_feat3=dict(tap='student.stage3',
                                     connector='stage3'),
                        t_emb='teacher_fr.embedding')),
        # age-invariant attentive knowledge: stages 3 and 4 of teacher_age
        loss_att3=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=1000.0,
            inputs=dict(s_feat='student.stage3',
                        t_feat='teacher_age.stage3')),
        loss_att4=dict(
            type='AgeAttentionLoss', q=2, attention_use='transfer',
            loss_weight=1000.0,
            inputs=dict(s_feat='student.stage4',
                        t_feat='teacher_age.stage4'))))
