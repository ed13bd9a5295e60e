# DIST (arXiv 2205.10536), torchdistill's form with tau: inter- and
# intra-class Pearson correlation of the softened class distributions;
# torchdistill's ImageNet setting beta=gamma=tau=1 with term weight 2.
_base_ = ['../_base_/kd_synthface_age_teacher_head.py']
model = dict(distill_losses=dict(
    loss_dist=dict(type='DISTLoss', beta=1.0, gamma=1.0, tau=1.0,
                   loss_weight=2.0,
                   inputs=dict(s_logits='student.logits',
                               t_logits='teacher_fr.logits'))))
