"""CRD: contrastive representation distillation with memory banks."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, check_int
from .base import BaseDistillLoss


@LOSSES.register_module()
class CRDLoss(BaseDistillLoss):
    """Contrastive Representation Distillation (NCE with memory banks).

    Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR
    2020, arXiv 1910.10699, Eq. 18-19 (NCE approximation of the critic
    ``h(T, S) = exp(g_T(t)' g_S(s) / tau) / Z``) as implemented by RepDistiller
    ``crd/criterion.py`` and ``crd/memory.py`` (written anew here):

    * ``embed_s``/``embed_t``: trainable ``Linear(d -> feat_dim)`` followed by
      L2 normalisation (RepDistiller ``Embed``); inputs are flattened.
      ``t_emb`` is detached, but ``embed_t`` IS trained.
    * buffers ``memory_s``/``memory_t`` (``num_data × feat_dim``, uniform in
      ``±1/sqrt(feat_dim/3)``) hold the momentum-averaged student/teacher
      embedding of every training sample (RepDistiller ``memory_v1``/``v2``).
    * for each sample: 1 positive (its own ``indices`` entry) + ``K = nce_k``
      negatives drawn uniformly with replacement from ``[0, num_data)``
      **excluding the sample's own index** (``sample_negatives``; uses
      torch's global RNG on the indices' device).
    * scores ``exp(m . v / nce_t) / Z`` where (symmetric):
      student anchor ``g_S(s)`` vs teacher memory (normaliser ``Z_s``) and
      teacher anchor ``g_T(t)`` vs student memory (normaliser ``Z_t``).
      ``Z_s``/``Z_t`` are buffers, -1 until set from the first batch as
      ``mean(exp(.)) * num_data`` (RepDistiller), then fixed.
    * NCE loss per side with ``P_n = 1/num_data``, ``eps = 1e-7``::

          -(sum_b log(P_pos / (P_pos + K P_n + eps))
            + sum_{b,k} log(K P_n / (P_neg + K P_n + eps))) / B

      and ``loss = loss_weight * (L_student_anchor + L_teacher_anchor)``.
    * after the scores, in training mode only and under ``no_grad``:
      ``memory[i] <- normalise(nce_m * memory[i] + (1 - nce_m) * v_i)`` for
      the batch's indices (student embeddings into ``memory_s``, teacher into
      ``memory_t``).

    Not implemented: RepDistiller's ``'exact'`` mode, where the dataset draws
    negatives only from other classes (``CIFAR100InstanceSample``
    ``contrast_idx``); ``labels`` is accepted and currently unused. The banks
    are rank-local under DDP (RepDistiller is single-GPU). Memory: two fp32
    banks take ``2 * num_data * feat_dim * 4`` bytes (≈5.96 GB for MS1MV2).

    Args:
        num_data: training-set size (number of distinct ``indices``).
        s_dim: student embedding dim; ``None`` infers it in ``check_shapes``
            (the distiller calls it at build time, before the optimizer).
        t_dim: teacher embedding dim; same as ``s_dim``.
        feat_dim: contrastive embedding size (RepDistiller 128).
        nce_k: negatives per sample (RepDistiller 16384); < ``num_data``.
        nce_t: temperature (RepDistiller 0.07).
        nce_m: memory momentum (RepDistiller 0.5), in [0, 1).
        loss_weight: multiplier (RepDistiller beta = 0.8).

    Forward args: ``s_emb`` (B×D_s), ``t_emb`` (B×D_t), ``indices`` (B, long,
    dataset indices: bind to ``data.index``), ``labels`` (optional, unused).
    """

    EPS = 1e-7

    def __init__(self, num_data: int, s_dim: Optional[int] = None,
                 t_dim: Optional[int] = None, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.num_data = check_int('CRDLoss', 'num_data', num_data, 2)
        self.s_dim = check_int('CRDLoss', 's_dim', s_dim, 1, allow_none=True)
        self.t_dim = check_int('CRDLoss', 't_dim', t_dim, 1, allow_none=True)
        self.feat_dim = check_int('CRDLoss', 'feat_dim', feat_dim, 1)
        self.nce_k = check_int('CRDLoss', 'nce_k', nce_k, 1)
        if self.nce_k >= self.num_data:
            raise ConfigError(
                f'CRDLoss: nce_k must be < num_data (negatives are drawn from '
                f'the other num_data - 1 samples), got nce_k={nce_k} with '
                f'num_data={num_data}')
        if (isinstance(nce_t, bool) or not isinstance(nce_t, (int, float))
                or not math.isfinite(nce_t) or nce_t <= 0):
            raise ConfigError(f'CRDLoss: nce_t must be a finite number > 0, '
                              f'got {nce_t!r}')
        self.nce_t = float(nce_t)
        if (isinstance(nce_m, bool) or not isinstance(nce_m, (int, float))
                or not 0 <= nce_m < 1):
            raise ConfigError(f'CRDLoss: nce_m must be in [0, 1), got '
                              f'{nce_m!r}')
        self.nce_m = float(nce_m)

        self.embed_s = (nn.Linear(self.s_dim, self.feat_dim)
                        if self.s_dim is not None else None)
        self.embed_t = (nn.Linear(self.t_dim, self.feat_dim)
                        if self.t_dim is not None else None)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ('memory_s', 'memory_t'):
            bank = torch.rand(self.num_data, self.feat_dim) * (2 * stdv) - stdv
            self.register_buffer(name, bank)
        self.register_buffer('Z_s', torch.tensor(-1.0))
        self.register_buffer('Z_t', torch.tensor(-1.0))

    # ------------------------------------------------------------ building
    def _check_embed(self, attr: str, dim_attr: str, arg: str, dim: int):
        current = getattr(self, attr)
        if current is not None and current.in_features != dim:
            raise ValueError(
                f'{arg} has {dim} features (shape after flattening) but '
                f'CRDLoss.{dim_attr}={current.in_features}; set {dim_attr}='
                f'{dim} (or leave it None to infer it)')

    def _make_embed(self, attr: str, dim_attr: str, arg: str, dim: int):
        self._check_embed(attr, dim_attr, arg, dim)
        if getattr(self, attr) is None:
            layer = nn.Linear(dim, self.feat_dim).to(self.memory_s.device)
            setattr(self, attr, layer)
            setattr(self, dim_attr, dim)

    def check_shapes(self, shapes):
        """Validate, then build the embed heads the config left to the
        bound shapes (``s_dim``/``t_dim`` None)."""
        self.validate_shapes(shapes)
        self._make_embed('embed_s', 's_dim', 's_emb',
                         math.prod(shapes['s_emb'][1:]))
        self._make_embed('embed_t', 't_dim', 't_emb',
                         math.prod(shapes['t_emb'][1:]))

    def validate_shapes(self, shapes):
        s_shape, t_shape = shapes['s_emb'], shapes['t_emb']
        for name, shape in (('s_emb', s_shape), ('t_emb', t_shape)):
            if len(shape) < 2:
                raise ValueError(f'{name} must be B×D embeddings (2-D), got '
                                 f'shape {tuple(shape)}')
        idx_shape = shapes['indices']
        if len(idx_shape) != 1:
            raise ValueError(f'indices must be the B dataset indices (1-D), '
                             f'got shape {tuple(idx_shape)}; bind it to '
                             '"data.index"')
        if not s_shape[0] == t_shape[0] == idx_shape[0]:
            raise ValueError(
                f's_emb has shape {tuple(s_shape)}, t_emb has shape '
                f'{tuple(t_shape)} and indices has shape {tuple(idx_shape)}; '
                'their batch sizes (first dimension) must match')
        if shapes.get('labels') is not None and \
                tuple(shapes['labels']) != tuple(idx_shape):
            raise ValueError(f'labels has shape {tuple(shapes["labels"])} '
                             f'but indices has shape {tuple(idx_shape)}; '
                             'they must match')
        self._check_embed('embed_s', 's_dim', 's_emb', math.prod(s_shape[1:]))
        self._check_embed('embed_t', 't_dim', 't_emb', math.prod(t_shape[1:]))

    # ------------------------------------------------------------ pieces
    def sample_negatives(self, indices: torch.Tensor) -> torch.Tensor:
        """``B × nce_k`` indices uniform on ``[0, num_data)`` minus own index.

        Draws ``r`` uniform on ``[0, num_data - 1)`` (torch's global RNG) and
        maps ``r >= own`` to ``r + 1``.
        """
        r = torch.randint(0, self.num_data - 1,
                          (indices.shape[0], self.nce_k),
                          device=indices.device)
        return r + (r >= indices.unsqueeze(1)).long()

    @staticmethod
    def _embed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = layer(x.float().flatten(1))
        return F.normalize(out.float(), p=2, dim=1)

    def _scores(self, anchor, memory, idx, z_buffer):
        """``exp(memory[idx] . anchor / T) / Z`` (B × (K+1)); sets Z once."""
        weight = memory[idx].detach()  # B × (K+1) × feat_dim
        out = torch.exp(torch.bmm(weight, anchor.unsqueeze(2)).squeeze(2) /
                        self.nce_t)
        with torch.no_grad():
            z = torch.where(z_buffer < 0, out.mean() * self.num_data,
                            z_buffer)
            z_buffer.copy_(z)
        return out / z

    def _nce(self, x: torch.Tensor) -> torch.Tensor:
        """RepDistiller ContrastLoss on B × (K+1) scores (column 0 positive)."""
        bsz, m = x.shape[0], x.shape[1] - 1
        kpn = m / self.num_data
        p_pos, p_neg = x[:, 0], x[:, 1:]
        log_d1 = torch.log(p_pos / (p_pos + kpn + self.EPS))
        log_d0 = torch.log(kpn / (p_neg + kpn + self.EPS))
        return -(log_d1.sum() + log_d0.sum()) / bsz

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, indices: torch.Tensor,
                v: torch.Tensor) -> None:
        pos = memory[indices] * self.nce_m + v.detach() * (1 - self.nce_m)
        memory.index_copy_(0, indices, F.normalize(pos, p=2, dim=1))

    # ------------------------------------------------------------ forward
    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             indices: torch.Tensor,
             labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError(
                'CRDLoss: the embed heads are not built: give s_dim and t_dim '
                'in the config (or let the distiller call check_shapes at '
                'build time, before the optimizer is created)')
        indices = indices.long()
        bad = (indices < 0) | (indices >= self.num_data)
        if bool(bad.any()):
            raise ValueError(
                f'CRDLoss: indices must lie in [0, num_data={self.num_data}),'
                f' got values {indices[bad][:5].tolist()}; num_data must be '
                'the training-set size (the number of distinct data.index '
                'values)')
        v_s = self._embed(self.embed_s, s_emb)
        v_t = self._embed(self.embed_t, t_emb)
        idx = torch.cat([indices.unsqueeze(1),
                         self.sample_negatives(indices)], dim=1)
        # student anchor vs teacher memory; teacher anchor vs student memory
        out_s = self._scores(v_s, self.memory_t, idx, self.Z_s)
        out_t = self._scores(v_t, self.memory_s, idx, self.Z_t)
        loss = self._nce(out_s) + self._nce(out_t)
        if self.training:
            self._update(self.memory_s, indices, v_s)
            self._update(self.memory_t, indices, v_t)
        return loss

    def extra_repr(self):
        return (f'num_data={self.num_data}, s_dim={self.s_dim}, '
                f't_dim={self.t_dim}, feat_dim={self.feat_dim}, '
                f'nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, '
                + super().extra_repr())
