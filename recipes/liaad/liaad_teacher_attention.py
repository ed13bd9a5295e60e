# LIAAD, the earlier (alternative) reading, kept as an ablation: per-sample
# learned weights over the two teachers' final embeddings (shared reference
# liaad.md §3.2, RECONSTRUCTED: gate g, floor alpha_min 0.1, entropy beta
# 0.1), one Linear+BN projector per teacher, no stage terms. See liaad.py
# for the figure reading, which is kdzoo's LIAAD.
_base_ = ['../_base_/liaad_synthface_age.py']
model = dict(
    connectors=dict(
        proj_fr=dict(type='LinearProjector', out_features=128),
        proj_age=dict(type='LinearProjector', out_features=128)),
    distill_losses=dict(
        loss_aad=dict(
            type='TeacherAttentionAngularLoss', p=2, tau=1.0, alpha_min=0.1,
            beta=0.1, loss_weight=16.0,
            inputs=dict(s_emb_1=dict(tap='student.embedding',
                                     connector='proj_fr'),
                        t_emb_1='teacher_fr.embedding',
                        s_emb_2=dict(tap='student.embedding',
                                     connector='proj_age'),
                        t_emb_2='teacher_age.embedding'))))
