# Angular KD (ShrinkTeaNet final-layer term, arXiv 1905.10620 Eq. 4/5):
#   what:    the student of students/mbf_synthface_age.py plus
#            (1 - cos(P(s), t))^2 to the frozen FR teacher's embedding, where
#            P is a training-only Linear+BN projector 64 -> 128.
#   teacher: teacher_fr = the IResNet of teachers/iresnet_synthface_age.py;
#            its backbone.pth path is set by the suite (or --cfg-options
#            model.teachers.teacher_fr.checkpoint=PATH).
#   data:    SynthFaceAge, same as the student-alone baseline.
#   expect:  above the student alone on cross-age TAR@FAR=1e-3 (docs/results/quickstart.md).
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    connectors=dict(
        proj_fr=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_ang=dict(
            type='AngularDistillationLoss', p=2, loss_weight=16.0,
            inputs=dict(s_emb=dict(tap='student.embedding',
                                   connector='proj_fr'),
                        t_emb='teacher_fr.embedding'))))
