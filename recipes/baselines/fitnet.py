# FitNets hint (arXiv 1412.6550), single stage as RepDistiller runs it: the
# student's stage-3 map (MobileFaceNet, 16 ch, 4x4) goes through a trainable
# ConvReg to the teacher's stage-3 shape (IResNet, 64 ch, 4x4); MSE with
# RepDistiller's weight 100.
_base_ = ['../_base_/kd_synthface_age.py']
model = dict(
    connectors=dict(reg3=dict(type='ConvReg', out_channels=64)),
    distill_losses=dict(
        loss_hint=dict(type='FitNetLoss', loss_weight=100.0,
                       inputs=dict(s_feat=dict(tap='student.stage3',
                                               connector='reg3'),
                                   t_feat='teacher_fr.stage3'))))
