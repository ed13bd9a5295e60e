"""LIAAD-style attentive distillation (reconstructed by kdzoo).

LIAAD: Truong, Duong, Quach, Le, Bui, Luu, "LIAAD: Lightweight Attentive
Angular Distillation for Large-scale Age-Invariant Face Recognition",
Neurocomputing 543:126198 (2023), arXiv 2004.05085.

The LIAAD paper's equations could not be read; only the authors' framework
figure is known (shared reference ``liaad.md`` §2.4, ``liaad_framework.png``).
The two plugins below therefore mark what is VERIFIED and what kdzoo
RECONSTRUCTED. Do not present them as "the paper's method": they are
"LIAAD-style (reconstructed)".

* :class:`AgeAttentionLoss`: the figure reading (kdzoo's LIAAD default), the
  "age-invariant attentive" branch: spatial attention maps from the age
  teacher's stages 3 and 4 go to the student's stages 3 and 4.
* :class:`TeacherAttentionAngularLoss`: the alternative reading (``liaad.md``
  §3.2 "Alternative: per-sample attention over the two teachers'
  embeddings"), kept as an ablation.

The angular term in both readings is ShrinkTeaNet's (Duong, Luu, Quach, Le,
arXiv 1905.10620, Eq. 4 final layer / Eq. 6 stages), which IS verified; the
final-layer term alone is :class:`kdzoo.losses.angular.AngularDistillationLoss`.
"""
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, is_finite_number, is_int
from .base import BaseDistillLoss, require_ndim, require_same_shape


# ---------------------------------------------------------------- helpers
def _same_batch(named_shapes: Dict[str, torch.Size]) -> None:
    """Raise if the first dimensions of the given shapes differ."""
    batches = {name: int(shape[0]) for name, shape in named_shapes.items()
               if len(shape)}
    if len(set(batches.values())) > 1:
        listed = ', '.join(f'{name} has shape {tuple(named_shapes[name])}'
                           for name in named_shapes)
        raise ValueError(f'{listed}; their batch sizes (dim 0) must match: '
                         'bind them to taps of the same forward pass')


# ---------------------------------------------------------------- figure
@LOSSES.register_module()
class AgeAttentionLoss(BaseDistillLoss):
    """Age-invariant attentive term of LIAAD-style distillation, one stage.

    Cite: Truong, Duong, Quach, Le, Bui, Luu, "LIAAD: Lightweight Attentive
    Angular Distillation for Large-scale Age-Invariant Face Recognition",
    Neurocomputing 543:126198 (2023), arXiv 2004.05085. The paper's equations
    are not known; the attention map follows attention transfer (Zagoruyko &
    Komodakis, "Paying More Attention to Attention", arXiv 1612.03928, Eq. 2,
    authors' code convention: mean over channels, squared difference).

    VERIFIED (authors' framework figure, ``liaad.md`` §2.4): attention maps
    ("Attentive Knowledge") are taken from the **Age Attentive Teacher's
    stages 3 and 4** and carried into the **student's stages 3 and 4**. One
    instance of this loss handles one stage; a recipe declares two (stage 3
    and stage 4).

    RECONSTRUCTED by kdzoo (not from the paper): how the maps are computed,
    how they are used, and the weights.

    * Attention map of a stage output ``F`` (B×C×H×W), per sample::

          a(F) = mean_c |F_c|^q                       (B×H×W, map level)
          Â(F) = a(F).flatten(1) / ||a(F).flatten(1)||_2

    * ``attention_use='transfer'`` (default, the figure reading): the
      student matches the age teacher's attention::

          loss = mean_{b, pos} (Â(s_feat) − Â(t_feat))²

      ``t_feat`` is the age teacher's stage map (detached). Channel counts may
      differ. When the spatial sizes differ, the student's **map-level**
      attention ``a(s_feat)`` (before normalising) is resized to the
      teacher's H×W with ``F.interpolate(mode=resize)``
      (``align_corners=False`` for ``'bilinear'``), then normalised. (kdzoo's
      ``ATLoss`` pools the larger map instead; IResNet and MobileFaceNet
      stages have equal sizes at 112×112, so this rarely matters.)
    * ``attention_use='weight'``: the age teacher's attention is a spatial
      weight on a stage-level feature distillation between ``s_map`` (e.g.
      the student's stage map through a ``ConvProjector``) and ``t_map``
      (e.g. the FR teacher's stage map; same shape B×C×H×W)::

          w   = resize(a(t_feat)) to ``s_map``'s H×W, detached,
                divided by its mean over positions (mean 1 per sample;
                a sample whose attention is all zero gets w = 1)
          ŝ   = s_map / ||s_map||_c,  t̂ = t_map / ||t_map||_c
                (channel-L2-normalised at every position, eps 1e-12)
          loss = mean_b mean_pos  w[b, pos] · mean_c (ŝ − t̂)²[b, :, pos]

      ``t_map`` is detached. ``s_feat`` is not part of the value in this mode
      (it is a required argument of the signature: bind it to the student's
      stage map; only its batch size is checked).

    Attention transfer's reference code weights its term by 1000 with this
    mean reduction (``liaad.md`` §3.2 suggests ``loss_weight=1000`` for
    ``'transfer'``; a recipe setting, the class default stays 1).

    Args:
        q: exponent of the attention map (attention transfer: 2); >= 1.
        attention_use: ``'transfer'`` or ``'weight'``, see above.
        resize: interpolation used when the spatial sizes differ:
            ``'bilinear'`` (default), ``'nearest'`` or ``'area'``.
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_feat`` (B×C_s×H_s×W_s, student stage map), ``t_feat``
    (B×C_t×H_t×W_t, age teacher stage map, detached), ``s_map`` and ``t_map``
    (B×C×H×W each, same shape; required with ``attention_use='weight'``, not
    accepted with ``'transfer'``; ``t_map`` detached).
    """

    USES = ('transfer', 'weight')
    RESIZES = ('bilinear', 'nearest', 'area')

    def __init__(self, q: float = 2.0, attention_use: str = 'transfer',
                 resize: str = 'bilinear', loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        if not is_finite_number(q) or q < 1:
            raise ConfigError(f'{name}: q must be a finite number >= 1 (the '
                              f'attention exponent, usually 2), got {q!r}')
        if attention_use not in self.USES:
            raise ConfigError(f'{name}: attention_use must be one of '
                              f'{self.USES}, got {attention_use!r}')
        if resize not in self.RESIZES:
            raise ConfigError(f'{name}: resize must be one of {self.RESIZES},'
                              f' got {resize!r}')
        self.q = float(q)
        self.attention_use = attention_use
        self.resize = resize

    # ------------------------------------------------------------ checks
    def check_shapes(self, shapes):
        s, t = shapes['s_feat'], shapes['t_feat']
        require_ndim('s_feat', s, 4, 'B×C×H×W feature maps')
        require_ndim('t_feat', t, 4, 'B×C×H×W feature maps (the age '
                     "teacher's stage output)")
        s_map, t_map = shapes.get('s_map'), shapes.get('t_map')
        if self.attention_use == 'transfer':
            given = [n for n, v in (('s_map', s_map), ('t_map', t_map))
                     if v is not None]
            if given:
                raise ValueError(
                    f'{given} bound but attention_use=\'transfer\' does not '
                    'use s_map/t_map; set attention_use=\'weight\' to weight '
                    'a stage-level distillation between them, or drop them '
                    'from inputs')
            _same_batch(dict(s_feat=s, t_feat=t))
            return
        missing = [n for n, v in (('s_map', s_map), ('t_map', t_map))
                   if v is None]
        if missing:
            raise ValueError(
                f"attention_use='weight' needs s_map and t_map (missing: "
                f'{missing}): bind s_map to the student stage map through a '
                'ConvProjector (s_map=dict(tap=<student stage>, connector='
                '<ConvProjector>)) and t_map to the FR teacher\'s stage map')
        require_ndim('s_map', s_map, 4, 'B×C×H×W feature maps')
        require_ndim('t_map', t_map, 4, 'B×C×H×W feature maps')
        require_same_shape(
            's_map', s_map, 't_map', t_map,
            'Put a projector on the student side: connectors=dict(proj=dict('
            f'type="ConvProjector", out_channels={int(t_map[1])})) and '
            's_map=dict(tap=<student stage>, connector="proj"); the spatial '
            'sizes must already agree.')
        _same_batch(dict(s_feat=s, t_feat=t, s_map=s_map, t_map=t_map))

    # ------------------------------------------------------------ pieces
    def map_attention(self, f: torch.Tensor) -> torch.Tensor:
        """``mean_c |F_c|^q`` as B×1×H×W (float32, before normalising)."""
        return f.float().abs().pow(self.q).mean(1, keepdim=True)

    def _resize(self, a: torch.Tensor, size) -> torch.Tensor:
        if tuple(a.shape[-2:]) == tuple(size):
            return a
        if self.resize == 'bilinear':
            return F.interpolate(a, size=size, mode='bilinear',
                                 align_corners=False)
        return F.interpolate(a, size=size, mode=self.resize)

    def loss(self, s_feat: torch.Tensor, t_feat: torch.Tensor,
             s_map: Optional[torch.Tensor] = None,
             t_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        a_t = self.map_attention(t_feat)
        if self.attention_use == 'transfer':
            a_s = self._resize(self.map_attention(s_feat), a_t.shape[-2:])
            diff = (F.normalize(a_s.flatten(1), dim=1) -
                    F.normalize(a_t.flatten(1), dim=1))
            return diff.pow(2).mean()
        # 'weight': spatial weight from the age teacher, mean 1 per sample
        w = self._resize(a_t, s_map.shape[-2:]).flatten(1)  # B×HW, detached
        mean = w.mean(1, keepdim=True)
        w = torch.where(mean > 0, w / mean.clamp_min(1e-30),
                        torch.ones_like(w))
        s_hat = F.normalize(s_map.float(), dim=1, eps=1e-12)
        t_hat = F.normalize(t_map.float(), dim=1, eps=1e-12)
        per_pos = (s_hat - t_hat).pow(2).mean(1).flatten(1)  # B×HW
        return (w * per_pos).mean()

    def extra_repr(self):
        return (f'q={self.q}, attention_use={self.attention_use!r}, '
                f'resize={self.resize!r}, ' + super().extra_repr())


# ---------------------------------------------------------------- alternative
@LOSSES.register_module()
class TeacherAttentionAngularLoss(BaseDistillLoss):
    """Per-sample attention over two teachers' angular distillation terms.

    Cite: Truong, Duong, Quach, Le, Bui, Luu, "LIAAD: Lightweight Attentive
    Angular Distillation for Large-scale Age-Invariant Face Recognition",
    Neurocomputing 543:126198 (2023), arXiv 2004.05085 (the alternative
    reading of ``liaad.md`` §3.2, not kdzoo's LIAAD default; that is the
    figure reading, :class:`AgeAttentionLoss` + ShrinkTeaNet angular terms).

    VERIFIED: the angular term ``d = (1 − cos(s, t))^p`` is ShrinkTeaNet's
    final-layer angular distillation (Duong, Luu, Quach, Le, arXiv
    1905.10620, Eq. 4, with ``*`` read as the inner product of unit vectors;
    ``p=2`` paper-faithful, ``p=1`` as in public re-implementations). LIAAD
    distils from two heavy teachers with different specialised knowledge (a
    general FR teacher and an age teacher; abstract and framework figure).

    RECONSTRUCTED by kdzoo (not from the paper): the per-sample weighting of
    the two teachers, the gating network ``g``, the floor ``alpha_min``, the
    entropy term and all default values. With ``t̂_k`` the L2-normalised,
    detached teacher embeddings::

        d_ik = (1 − cos(s_emb_k[i], t_emb_k[i]))^p                    (B×2)
        α_i  = α_min + (1 − 2 α_min) · softmax(g([t̂_1[i]; t̂_2[i]]) / τ)
        g    = Linear(D_1 + D_2 → hidden) – ReLU – Linear(hidden → 2)
        loss = mean_i Σ_k α_ik d_ik + β · mean_i Σ_k α_ik log α_ik

    Rows of α sum to 1 and every entry is >= α_min; the floor and the
    negative-entropy term (β) keep the learned weights from collapsing onto
    the teacher that is easier to match. ``α`` is not detached: ``g`` is
    trained by this loss together with the student (it is a submodule of
    the loss, so the optimizer sees it; PyTorch default initialisation).
    With ``g``'s output constant, ``α = (0.5, 0.5)`` and the loss is the
    average of the two angular terms minus ``β log 2``.

    ``s_emb_k`` is the student embedding already mapped to teacher ``k``'s
    space by a per-teacher projector connector (``LinearProjector``,
    declared in the recipe). ``g`` is built in ``__init__`` when
    ``teacher_dim`` is given, otherwise in :meth:`check_shapes` from the
    bound shapes (the distiller calls it once at build time, before the
    optimizer is created); calling ``forward`` before ``g`` exists raises.
    ``g`` runs in float32 (autocast off). The mean α over the batch of the
    latest forward is kept in ``last_weights`` (detached float32 tensor of
    shape (2,), ``None`` before the first forward) for a logging hook.

    Args:
        num_teachers: number of teachers; only 2 is supported.
        teacher_dim: embedding dim of the teachers: an int (both) or a
            sequence of 2 ints; ``None`` infers it in ``check_shapes``.
        hidden: width of ``g``'s hidden layer (128).
        p: exponent on (1 − cos); > 0 (2 = ShrinkTeaNet Eq. 4).
        tau: softmax temperature of the gate; > 0.
        alpha_min: floor on each weight, in [0, 0.5).
        beta: weight of the negative-entropy term; >= 0.
        loss_weight: multiplier on the returned loss (λ_AAD = 1).

    Forward args: ``s_emb_1`` (B×D_1), ``t_emb_1`` (B×D_1, teacher 1 e.g. the
    FR teacher, detached), ``s_emb_2`` (B×D_2), ``t_emb_2`` (B×D_2, teacher 2
    e.g. the age teacher, detached).
    """

    ARGS = ('s_emb_1', 't_emb_1', 's_emb_2', 't_emb_2')

    def __init__(self, num_teachers: int = 2,
                 teacher_dim: Union[int, Sequence[int], None] = None,
                 hidden: int = 128, p: float = 2.0, tau: float = 1.0,
                 alpha_min: float = 0.1, beta: float = 0.1,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        if not is_int(num_teachers) or num_teachers != 2:
            raise ConfigError(f'{name}: num_teachers must be 2 (the only '
                              f'supported value), got {num_teachers!r}')
        self.num_teachers = 2
        if teacher_dim is None:
            dims = None
        elif is_int(teacher_dim):
            dims = (teacher_dim, teacher_dim)
        elif isinstance(teacher_dim, (list, tuple)):
            dims = tuple(teacher_dim)
        else:
            dims = ()
        if dims is not None and (len(dims) != 2 or not all(
                is_int(d) and d >= 1 for d in dims)):
            raise ConfigError(f'{name}: teacher_dim must be None, an int >= 1 '
                              'or a sequence of 2 ints >= 1, got '
                              f'{teacher_dim!r}')
        if not is_int(hidden) or hidden < 1:
            raise ConfigError(f'{name}: hidden must be an int >= 1, got '
                              f'{hidden!r}')
        if not is_finite_number(p) or p <= 0:
            raise ConfigError(f'{name}: p must be a finite number > 0 (1 or '
                              f'2 are the documented choices), got {p!r}')
        if not is_finite_number(tau) or tau <= 0:
            raise ConfigError(f'{name}: tau must be a finite number > 0, got '
                              f'{tau!r}')
        if not is_finite_number(alpha_min) or not 0 <= alpha_min < 0.5:
            raise ConfigError(f'{name}: alpha_min must be in [0, 0.5), got '
                              f'{alpha_min!r}')
        if not is_finite_number(beta) or beta < 0:
            raise ConfigError(f'{name}: beta must be a finite number >= 0, '
                              f'got {beta!r}')
        self.hidden = int(hidden)
        self.p = float(p)
        self.tau = float(tau)
        self.alpha_min = float(alpha_min)
        self.beta = float(beta)
        self.teacher_dims = dims
        # tracks the module's device so a lazily built g lands on it
        self.register_buffer('_anchor', torch.empty(0), persistent=False)
        self.register_module('g', None)
        if dims is not None:
            self._build_gate(dims)
        self.last_weights: Optional[torch.Tensor] = None

    def _build_gate(self, dims) -> None:
        self.teacher_dims = tuple(int(d) for d in dims)
        self.g = nn.Sequential(
            nn.Linear(sum(self.teacher_dims), self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, 2)).to(self._anchor.device)

    # ------------------------------------------------------------ checks
    def validate_shapes(self, shapes) -> None:
        for arg in self.ARGS:
            require_ndim(arg, shapes[arg], 2, 'B×D embeddings')
        _same_batch({arg: shapes[arg] for arg in self.ARGS})
        for k in (1, 2):
            t_shape = shapes[f't_emb_{k}']
            require_same_shape(
                f's_emb_{k}', shapes[f's_emb_{k}'], f't_emb_{k}', t_shape,
                f'Map the student embedding to teacher {k}\'s space with a '
                f'per-teacher projector: connectors=dict(proj{k}=dict('
                f'type="LinearProjector", out_features={int(t_shape[1])})) '
                f'and s_emb_{k}=dict(tap="student.embedding", '
                f'connector="proj{k}").')
        dims = (int(shapes['t_emb_1'][1]), int(shapes['t_emb_2'][1]))
        if self.teacher_dims is not None:
            ok, built_for = dims == self.teacher_dims, f'{self.teacher_dims}'
        elif self.g is not None:  # g was built from a loaded checkpoint
            total = self.g[0].in_features
            ok, built_for = sum(dims) == total, f'{total} in total'
        else:
            ok = True
        if not ok:
            raise ValueError(
                f't_emb_1 has shape {tuple(shapes["t_emb_1"])} and t_emb_2 '
                f'has shape {tuple(shapes["t_emb_2"])} but '
                f'{type(self).__name__}\'s gate g was built for teacher_dim='
                f'{built_for}; set teacher_dim={dims} (or leave it None to '
                'infer it)')

    def check_shapes(self, shapes):
        """Validate the shapes and build ``g`` if ``teacher_dim`` was None."""
        self.validate_shapes(shapes)
        if self.g is None:
            self._build_gate((int(shapes['t_emb_1'][1]),
                              int(shapes['t_emb_2'][1])))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        # g may still be unbuilt (teacher_dim=None, no check_shapes yet):
        # build it from the checkpoint's shapes instead of silently dropping
        # its weights (torch skips keys of a submodule that is None).
        first = state_dict.get(prefix + 'g.0.weight')
        if self.g is None and first is not None and first.dim() == 2:
            self.g = nn.Sequential(
                nn.Linear(int(first.shape[1]), self.hidden), nn.ReLU(),
                nn.Linear(self.hidden, 2)).to(self._anchor.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------ pieces
    def weights(self, t_emb_1: torch.Tensor,
                t_emb_2: torch.Tensor) -> torch.Tensor:
        """``α`` (B×2) from the detached, normalised teacher embeddings."""
        x = torch.cat([F.normalize(t_emb_1.detach().float(), dim=1),
                       F.normalize(t_emb_2.detach().float(), dim=1)], dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.g(x).float()
        soft = torch.softmax(logits / self.tau, dim=1)
        return self.alpha_min + (1.0 - 2.0 * self.alpha_min) * soft

    def loss(self, s_emb_1: torch.Tensor, t_emb_1: torch.Tensor,
             s_emb_2: torch.Tensor, t_emb_2: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            raise RuntimeError(
                f'{type(self).__name__}: the gate g is not built yet. Set '
                'teacher_dim=<teacher embedding dim(s)> in the config, or '
                'call check_shapes(shapes) before creating the optimizer '
                '(the distiller does this at build time); building it '
                'inside forward would leave it out of the optimizer')
        d = torch.stack([
            (1.0 - F.cosine_similarity(s.float(), t.detach().float(), dim=1,
                                       eps=1e-8)).clamp_min(0.0).pow(self.p)
            for s, t in ((s_emb_1, t_emb_1), (s_emb_2, t_emb_2))], dim=1)
        alpha = self.weights(t_emb_1, t_emb_2)
        self.last_weights = alpha.detach().mean(0)
        distill = (alpha * d).sum(1).mean()
        neg_entropy = torch.xlogy(alpha, alpha).sum(1).mean()
        return distill + self.beta * neg_entropy

    def log_vars(self):
        """The batch-mean weight of each teacher (``weight_1``, ``weight_2``)."""
        if self.last_weights is None:
            return {}
        return {f'weight_{k + 1}': float(w)
                for k, w in enumerate(self.last_weights.tolist())}

    def extra_repr(self):
        return (f'teacher_dim={self.teacher_dims}, hidden={self.hidden}, '
                f'p={self.p}, tau={self.tau}, alpha_min={self.alpha_min}, '
                f'beta={self.beta}, ' + super().extra_repr())
