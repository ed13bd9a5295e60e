"""Logit-based distillation losses."""
import torch
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from .base import BaseDistillLoss, require_ndim, require_same_shape


@LOSSES.register_module()
class KDLoss(BaseDistillLoss):
    """Hinton KD: batch-mean KL(softmax(t/tau) || softmax(s/tau)) * tau^2.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
    arXiv 1503.02531, Eq. (soft-target cross-entropy) as implemented by
    RepDistiller ``distiller_zoo/KD.py``: ``kl_div(log_softmax(s/T),
    softmax(t/T), 'sum') * T^2 / B``. The tau^2 factor keeps gradient
    magnitudes comparable across temperatures.

    For face recognition the logits need a shared identity set and the
    teacher's classifier (``teacher.logits`` comes from the teacher's head);
    kdzoo's ``*.logits`` taps are margin-free ``s*cos(theta)``.

    Args:
        tau: softmax temperature (RepDistiller default 4).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_logits`` (B×C), ``t_logits`` (B×C).
    """

    def __init__(self, tau: float = 4.0, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not tau > 0:
            raise ValueError(f'KDLoss: tau must be > 0, got {tau}')
        self.tau = float(tau)

    def check_shapes(self, shapes):
        require_ndim('s_logits', shapes['s_logits'], 2, 'B×C logits')
        require_same_shape('s_logits', shapes['s_logits'], 't_logits',
                           shapes['t_logits'],
                           'Student and teacher heads need the same classes.')

    def forward(self, s_logits: torch.Tensor,
                t_logits: torch.Tensor) -> torch.Tensor:
        self.check_shapes(dict(s_logits=s_logits.shape,
                               t_logits=t_logits.shape))
        log_p_s = F.log_softmax(s_logits.float() / self.tau, dim=1)
        p_t = F.softmax(t_logits.detach().float() / self.tau, dim=1)
        kl = F.kl_div(log_p_s, p_t, reduction='sum') / s_logits.shape[0]
        return self.loss_weight * kl * self.tau**2

    def extra_repr(self):
        return f'tau={self.tau}, ' + super().extra_repr()
