# Similarity-preserving KD (arXiv 1907.09682), RepDistiller's form on the
# last stage's maps (its feat[-2]) with weight 3000.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(distill_losses=dict(
    loss_sp=dict(type='SPLoss', loss_weight=3000.0,
                 inputs=dict(s_feat='student.stage4',
                             t_feat='teacher_fr.stage4'))))
