"""The margin-head contract shared by ArcFace, CosFace, CurricularFace, ...

A margin head holds the class centres and turns an embedding batch into
classification logits:

* ``cosine(emb)``: ``cos θ`` between L2-normalised embeddings and
  L2-normalised centres, shape ``(B, C)``, clamped to ``[-1+eps, 1-eps]``.
* ``forward(emb)``: the margin-free logits ``s·cos θ`` (evaluation, and the
  ``<source>.logits`` tap that logit-KD losses consume).
* ``forward(emb, labels)``: the margin-applied training logits.
* ``loss(emb, labels)``: ``dict(loss_cls=<cross-entropy on the margin
  logits>)``; subclasses may add more keys (e.g. MagFace's ``loss_mag``).

Numerics: whatever the input dtype (fp16, bf16) or an enclosing autocast
region, the cosine, the margin and the cross-entropy are computed in float32
(float64 if the embedding or the weight is float64) with autocast disabled, so
the returned logits are float32. ``cos θ`` is clamped before any ``acos`` /
``sqrt``, so an embedding equal or opposite to its centre (``cos = ±1``)
gives finite values and gradients.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.utils import ConfigError, check_int, check_number, no_autocast


class BaseMarginHead(nn.Module):
    """Normalised-softmax head: class centres, ``s·cos θ`` logits, no margin.

    Subclasses override :meth:`margin_cosine` to change the target (and
    possibly non-target) cosines; everything else (normalisation, float32
    arithmetic, label checks, the loss dict) lives here.

    Args:
        num_classes: number of identities ``C`` (>= 1).
        embedding_size: embedding dimension ``D`` (>= 1).
        s: logit scale (> 0), 64 in ArcFace / CosFace / CurricularFace.
        m: the margin (its meaning is the subclass's; >= 0).
        eps: cosines are clamped to ``[-1+eps, 1-eps]`` (0 < eps < 0.1). The
            default 1e-7 keeps ``1 - cos²`` > 0 in float32.
        init_std: the centres are initialised ``N(0, init_std²)`` like
            insightface arcface_torch's ``PartialFC_V2`` (std 0.01). Only the
            direction of each centre matters (they are L2-normalised).

    Attributes:
        weight: the class centres, a ``Parameter`` of shape
            ``(num_classes, embedding_size)``: one row per class, the layout
            of insightface ``PartialFC_V2`` and of ``nn.Linear.weight``
            (TFace and the official CurricularFace code store the transpose,
            ``(embedding_size, num_classes)``; transpose when importing).
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.0, eps: float = 1e-7, init_std: float = 0.01):
        super().__init__()
        name = type(self).__name__
        self.num_classes = check_int(name, 'num_classes', num_classes)
        self.embedding_size = check_int(name, 'embedding_size',
                                        embedding_size)
        self.s = check_number(name, 's', s, low=0, low_open=True)
        self.m = check_number(name, 'm', m, low=0)
        self.eps = check_number(name, 'eps', eps, low=0, high=0.1,
                                low_open=True, high_open=True)
        init_std = check_number(name, 'init_std', init_std, low=0,
                                low_open=True)
        self.weight = nn.Parameter(
            torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    # ------------------------------------------------------------ checks
    def _compute_dtype(self, emb: torch.Tensor) -> torch.dtype:
        if torch.float64 in (emb.dtype, self.weight.dtype):
            return torch.float64
        return torch.float32

    def check_embedding(self, emb: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``emb`` is a float ``(B, D)`` tensor."""
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f'{type(self).__name__}: embeddings must be a '
                             f'tensor, got {type(emb).__name__}')
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(
                f'{type(self).__name__}: embeddings must have shape (B, '
                f'{self.embedding_size}) (embedding_size={self.embedding_size}'
                f'), got {tuple(emb.shape)}')
        if not emb.is_floating_point():
            raise ValueError(f'{type(self).__name__}: embeddings must be a '
                             f'floating-point tensor, got {emb.dtype}')

    def check_labels(self, labels, emb: torch.Tensor) -> torch.Tensor:
        """Return ``labels`` as an int64 ``(B,)`` tensor on ``emb``'s device.

        Raises ``ValueError`` for a non-integer dtype or a shape other than
        ``(B,)``, and ``ConfigError`` (a ``ValueError``) for a label outside
        ``[0, num_classes)``: the recipe's ``num_classes`` is then smaller
        than the dataset's number of identities.
        """
        name = type(self).__name__
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f'{name}: labels must be an integer tensor of '
                             f'shape ({emb.shape[0]},), got '
                             f'{type(labels).__name__}')
        if labels.dtype == torch.bool or labels.is_floating_point() or \
                labels.is_complex():
            raise ValueError(f'{name}: labels must be an integer tensor '
                             f'(class indices in [0, {self.num_classes})), '
                             f'got dtype {labels.dtype}')
        if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
            raise ValueError(
                f'{name}: labels must have shape ({emb.shape[0]},), one class '
                f'index per embedding, got {tuple(labels.shape)}')
        if labels.numel():
            low, high = torch.aminmax(labels)
            low, high = int(low), int(high)
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise ConfigError(
                    f'{name}: label {bad} is outside [0, {self.num_classes}) '
                    f'(num_classes={self.num_classes}); set the head\'s '
                    f'num_classes to the number of identities in the '
                    f'training set (at least {max(high + 1, 1)})')
        return labels.to(device=emb.device, dtype=torch.long)

    # ------------------------------------------------------------ maths
    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """``cos θ`` of shape ``(B, C)``: normalised embeddings · centres.

        Computed in float32 (float64 for float64 inputs) with autocast off,
        and clamped to ``[-1+eps, 1-eps]``.
        """
        self.check_embedding(emb)
        dtype = self._compute_dtype(emb)
        with no_autocast(emb.device.type):
            emb_n = F.normalize(emb.to(dtype), dim=1)
            weight_n = F.normalize(self.weight.to(device=emb.device,
                                                  dtype=dtype), dim=1)
            cos = emb_n.matmul(weight_n.t())
            return cos.clamp(-1.0 + self.eps, 1.0 - self.eps)

    def margin_cosine(self, cos: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """Margin-applied cosines ``(B, C)`` (before the scale ``s``).

        ``cos`` is the clamped float32 output of :meth:`cosine`; ``labels``
        are validated int64 class indices. The base head applies no margin.
        """
        return cos

    @staticmethod
    def target_cosine(cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cos θ_y`` of each row's label, shape ``(B,)``."""
        return cos.gather(1, labels.unsqueeze(1)).squeeze(1)

    @staticmethod
    def replace_target(cos: torch.Tensor, labels: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
        """``cos`` with each row's label column replaced by ``target``
        (out of place, differentiable in both)."""
        return cos.scatter(1, labels.unsqueeze(1),
                           target.unsqueeze(1).to(cos.dtype))

    def _logits(self, emb: torch.Tensor,
                labels: Optional[torch.Tensor]) -> torch.Tensor:
        with no_autocast(emb.device.type):
            cos = self.cosine(emb)
            if labels is None:
                return self.s * cos
            return self.s * self.margin_cosine(cos, labels)

    def forward(self, emb: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, C)``, float32.

        Without ``labels``: ``s·cos θ`` (evaluation, distillable logits).
        With ``labels``: the margin-applied training logits (and, for heads
        with running statistics such as CurricularFace, an update of them in
        training mode).
        """
        if labels is not None:
            self.check_embedding(emb)
            labels = self.check_labels(labels, emb)
        return self._logits(emb, labels)

    def loss(self, emb: torch.Tensor,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``dict(loss_cls=...)``: cross-entropy on the margin logits."""
        self.check_embedding(emb)
        labels = self.check_labels(labels, emb)
        logits = self._logits(emb, labels)
        with no_autocast(emb.device.type):
            return dict(loss_cls=F.cross_entropy(logits, labels))

    def extra_repr(self) -> str:
        return (f'num_classes={self.num_classes}, '
                f'embedding_size={self.embedding_size}, s={self.s}, '
                f'm={self.m}')
