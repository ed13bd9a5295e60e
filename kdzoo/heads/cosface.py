"""CosFace: large margin cosine loss (Wang et al., CVPR 2018, 1801.09414)."""
from kdzoo.registry import HEADS
from .base import BaseMarginHead


@HEADS.register_module()
class CosFace(BaseMarginHead):
    """CosFace additive cosine margin head: target logit s·(cos θ_y − m).

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", CVPR 2018, arXiv 1801.09414, Eq. (4) (LMCL):
    ``L = -log e^{s(cos θ_y − m)} / (e^{s(cos θ_y − m)} + Σ_{j≠y}
    e^{s cos θ_j})``. Non-target logits are ``s·cos θ_j``.

    Args:
        num_classes, embedding_size, s, eps, init_std: see
            :class:`BaseMarginHead`. ``weight`` is ``(num_classes,
            embedding_size)``, initialised ``N(0, 0.01²)``.
        m: cosine margin, >= 0. Paper 0.35 (the default); insightface
            configs and GKD use 0.4.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.35, eps: float = 1e-7, init_std: float = 0.01):
        super().__init__(num_classes, embedding_size, s=s, m=m, eps=eps,
                         init_std=init_std)

    def margin_cosine(self, cos, labels):
        target = self.target_cosine(cos, labels) - self.m
        return self.replace_target(cos, labels, target)
