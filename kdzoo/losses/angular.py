"""Angular (direction-only) embedding distillation."""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, did_you_mean
from kdzoo.utils.probe import run_on_zeros
from .base import BaseDistillLoss, require_ndim, require_same_shape


@LOSSES.register_module()
class AngularDistillationLoss(BaseDistillLoss):
    """ShrinkTeaNet angular distillation: batch mean of (1 - cos(s, t))^p.

    Duong, Luu, Quach, Le, "ShrinkTeaNet", arXiv 1905.10620, Eq. 4 (final
    layer) with the student transform applied by a connector (Linear+BN for
    embeddings, kdzoo's ``LinearProjector``). Only the direction is
    transferred: student and teacher may lie on spheres of different radius.

    Eq. 4 reads ``|| 1 - t_hat * s_hat ||_2^2``; kdzoo takes ``*`` as the inner
    product, giving ``(1 - cos)^2`` (``p=2``, the default, paper-faithful).
    ``p=1`` is what public re-implementations use (MarginDistillation,
    TFace's ShrinkTeaNet baseline). See shared reference ``liaad.md`` §3.1/§6.

    Args:
        p: exponent on (1 - cos); 1 or 2 are the documented choices.
        eps: numerical floor for the norms.
        loss_weight: multiplier (ShrinkTeaNet lambda_n = 1).

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D); the teacher side is
    detached.
    """

    def __init__(self, p: float = 2.0, eps: float = 1e-8,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not p > 0:
            raise ValueError(f'AngularDistillationLoss: p must be > 0, got {p}')
        self.p = float(p)
        self.eps = float(eps)

    def check_shapes(self, shapes):
        require_ndim('s_emb', shapes['s_emb'], 2, 'B×D embeddings')
        require_same_shape(
            's_emb', shapes['s_emb'], 't_emb', shapes['t_emb'],
            'Put a connector on the student side, e.g. connectors=dict('
            'proj=dict(type="LinearProjector", out_features=<teacher D>)) and '
            's_emb=dict(tap="student.embedding", connector="proj").')

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(s_emb.float(), t_emb.float(),
                                  dim=1, eps=self.eps)
        loss = (1.0 - cos).clamp_min(0.0).pow(self.p).mean()
        return loss

    def extra_repr(self):
        return f'p={self.p}, ' + super().extra_repr()


MAX_STAGES = 4  # s_feat1..s_feat4: the 4-stage face backbones (IResNet, MBF)


@LOSSES.register_module()
class StagewiseAngularLoss(BaseDistillLoss):
    """ShrinkTeaNet intermediate angular distillation through the teacher.

    Duong, Luu, Quach, Le, "ShrinkTeaNet", arXiv 1905.10620, Eq. 6 (and the
    stage-wise red arrows of LIAAD's framework figure, arXiv 2004.05085):
    for each distilled stage i the student's stage-i map, already mapped to
    the teacher's stage-i shape by ShrinkTeaNet's H^s_i (1×1 conv + BN,
    kdzoo's ``ConvProjector`` on the binding), is pushed through the FROZEN
    teacher's remaining stages i+1..n and embedding layers
    (``network.forward_from_stage``); the resulting embedding e_i is compared
    angularly with the teacher's own embedding t = T(I)::

        L = sum_i lambda_i * mean_b (1 - cos(e_i, t))^p

    Written from the paper's equations (no public code of Eq. 6 exists);
    the angular term is ``AngularDistillationLoss``'s (``p=2`` reads Eq. 4's
    ``*`` as the inner product). Default weights follow ShrinkTeaNet's
    ``lambda_i = lambda_{i+1} / 2`` counting down from ``lambda_n = 1`` at
    the final layer (n = 4 stages): stages 4, 3, 2, 1 get 1, 0.5, 0.25,
    0.125. The final-layer term itself (lambda_n = 1) is
    ``AngularDistillationLoss`` on the embeddings in the recipe, so the
    default ``stages`` are the intermediate ones (1, 2, 3).

    The teacher's weights stay fixed (``requires_grad=False``, eval-mode BN
    statistics), but autograd flows through its layers to the student map
    and the connector. The pass runs in float32 with autocast disabled. The
    teacher comes from the distiller through ``attach_teachers`` and is kept
    out of this module's submodules (it is not saved or optimised twice).
    Only kdzoo backbone teachers (IResNet, MobileFaceNet: anything with
    ``forward_from_stage``) qualify; ONNX teachers support only the
    final-layer term.

    Args:
        teacher: name of the FR teacher in the recipe's ``teachers``.
        stages: distilled stages (1-based, ``stage_paths`` convention), any
            non-empty subset of 1..4; each needs its ``s_feat<i>`` bound.
        p: exponent on (1 - cos), > 0 (2: paper-faithful; 1: re-impls).
        stage_weights: one weight >= 0 per entry of ``stages`` (same
            order); default ``0.5 ** (4 - i)``.
        loss_weight: multiplier of the whole sum.

    Forward args: ``t_emb`` (B×D, the teacher's embedding; detached) and
    ``s_feat1``..``s_feat4`` (B×C_i×H_i×W_i student stage maps in the
    teacher's stage-i shape, i.e. through a ``ConvProjector``); bind exactly
    those of ``stages``.
    """

    _EPS = 1e-8

    def __init__(self, teacher: str, stages=(1, 2, 3), p: float = 2.0,
                 stage_weights=None, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        owner = type(self).__name__
        if not isinstance(teacher, str) or not teacher:
            raise ConfigError(f'{owner}: teacher must be the name of a '
                              f'teacher in model.teachers, got {teacher!r}')
        ok = (isinstance(stages, (list, tuple)) and len(stages) > 0
              and all(isinstance(s, int) and not isinstance(s, bool)
                      and 1 <= s <= MAX_STAGES for s in stages)
              and len(set(stages)) == len(stages))
        if not ok:
            raise ConfigError(f'{owner}: stages must be a non-empty sequence '
                              f'of distinct integers in 1..{MAX_STAGES}, '
                              f'got {stages!r}')
        if isinstance(p, bool) or not isinstance(p, (int, float)) \
                or not math.isfinite(p) or p <= 0:
            raise ConfigError(f'{owner}: p must be a finite number > 0 '
                              f'(1 or 2 are the documented choices), got '
                              f'{p!r}')
        self.teacher = teacher
        self.stages = tuple(int(s) for s in stages)
        self.p = float(p)
        if stage_weights is None:
            weights = tuple(0.5 ** (MAX_STAGES - s) for s in self.stages)
        else:
            ok = (isinstance(stage_weights, (list, tuple))
                  and len(stage_weights) == len(self.stages)
                  and all(isinstance(w, (int, float))
                          and not isinstance(w, bool) and math.isfinite(w)
                          and w >= 0 for w in stage_weights))
            if not ok:
                raise ConfigError(
                    f'{owner}: stage_weights must be {len(self.stages)} '
                    f'finite numbers >= 0 (one per entry of stages='
                    f'{self.stages}), got {stage_weights!r}')
            weights = tuple(float(w) for w in stage_weights)
        self.stage_weights = weights
        # Plain dict, NOT a submodule: the teacher lives in the distiller's
        # ``teachers`` only (else it would be duplicated in state_dict).
        self._attached: dict = {}

    # ----------------------------------------------------------- teacher
    def attach_teachers(self, teachers: dict) -> None:
        """Take the FR teacher ``self.teacher`` from ``{name: teacher}``.

        Called by ``FaceDistiller`` after building the losses. Checks the
        name, that the teacher is a ``FrozenTeacher`` whose network has
        ``forward_from_stage``, that ``stages`` exist, and records the
        teacher's stage output shapes (one zero-batch probe).
        """
        from kdzoo.teachers.base import FrozenTeacher
        owner = type(self).__name__
        if self.teacher not in teachers:
            raise ConfigError(
                f'{owner}: teacher={self.teacher!r} is not a teacher of '
                f'this distiller; known teachers: {sorted(teachers)}.'
                + did_you_mean(self.teacher, list(teachers)))
        teacher = teachers[self.teacher]
        if not isinstance(teacher, FrozenTeacher):
            raise ConfigError(
                f'{owner}: teacher {self.teacher!r} must be a FrozenTeacher '
                f'(e.g. CheckpointTeacher), got {type(teacher).__name__}')
        network = teacher.network
        kind = type(network).__name__
        if not callable(getattr(network, 'forward_from_stage', None)):
            raise ConfigError(
                f'{owner}: teacher {self.teacher!r} ({kind}) has no '
                'forward_from_stage: stage-wise angular distillation needs '
                'a kdzoo backbone teacher (IResNet/MobileFaceNet); ONNX '
                'teachers support only the final-layer term '
                '(AngularDistillationLoss on the embeddings)')
        paths = tuple(getattr(network, 'stage_paths', ()))
        bad = [s for s in self.stages if s > len(paths)]
        if bad:
            raise ConfigError(
                f'{owner}: stages={self.stages}: stage(s) {bad} out of '
                f'range; teacher {self.teacher!r} ({kind}) has '
                f'{len(paths)} stages {list(paths)}, use 1..{len(paths)}')
        size = teacher.input_size or getattr(network, 'input_size', None)
        if not size:
            raise ConfigError(
                f'{owner}: teacher {self.teacher!r} ({kind}) has no '
                'input_size; give the teacher input_size=(H, W)')
        stage_shapes, emb_dim = self._probe(network, paths, tuple(size))
        self._attached.clear()
        self._attached.update(name=self.teacher, teacher=teacher, kind=kind,
                              stage_shapes=stage_shapes, emb_dim=emb_dim)

    @staticmethod
    def _probe(network, paths, size):
        """Stage output shapes (C, H, W) and embedding size, zero batch."""
        shapes = {}

        def recorder(i):
            def hook(_m, _args, out):
                shapes[i] = tuple(out.shape[1:])
            return hook
        emb = run_on_zeros(network, (1, 3, *size),
                           [(network.get_submodule(path), recorder(i))
                            for i, path in enumerate(paths, start=1)])
        return shapes, int(emb.shape[1])

    def _require_attached(self) -> dict:
        if not self._attached:
            raise ConfigError(
                f'{type(self).__name__}: no teacher attached; it is used '
                'inside FaceDistiller, which calls attach_teachers(...) '
                f'with its teachers (needs teacher {self.teacher!r})')
        return self._attached

    # ----------------------------------------------------------- checks
    def check_shapes(self, shapes):
        att = self._require_attached()
        name = att['name']
        require_ndim('t_emb', shapes['t_emb'], 2, 'B×D embeddings')
        batch, dim = tuple(shapes['t_emb'])
        if dim != att['emb_dim']:
            raise ValueError(
                f't_emb has shape {tuple(shapes["t_emb"])} but teacher '
                f'{name!r} ({att["kind"]}) embeds to D={att["emb_dim"]}; '
                f'bind t_emb="{name}.embedding"')
        bound = {int(k[len('s_feat'):]) for k, v in shapes.items()
                 if k.startswith('s_feat') and v is not None}
        missing = [s for s in self.stages if s not in bound]
        if missing:
            raise ValueError(
                f'stages={self.stages} but ' + ', '.join(
                    f's_feat{s}' for s in missing) + ' not bound; bind '
                f's_feat{missing[0]}=dict(tap="student.stage{missing[0]}", '
                'connector=<a ConvProjector>) or drop it from stages')
        extra = sorted(bound - set(self.stages))
        if extra:
            raise ValueError(
                ', '.join(f's_feat{s}' for s in extra) + ' bound but stages='
                f'{self.stages}; add them to stages or unbind them')
        for s in self.stages:
            arg = f's_feat{s}'
            shape = tuple(shapes[arg])
            require_ndim(arg, shape, 4, 'B×C×H×W student stage maps')
            want = att['stage_shapes'][s]
            t_shape = (batch,) + tuple(want)
            if shape[0] != batch:
                raise ValueError(f'{arg} has shape {shape} but t_emb has '
                                 f'shape {(batch, dim)}; batch sizes differ')
            if shape[1:] == tuple(want):
                continue
            msg = (f'{arg} has shape {shape} but teacher {name!r} stage {s} '
                   f'(the input of its forward_from_stage) has shape '
                   f'{t_shape}; they must match.')
            if shape[2:] != tuple(want[1:]):
                msg += (f' The spatial sizes differ ({shape[2:]} vs '
                        f'{tuple(want[1:])}), which a 1×1 ConvProjector '
                        'cannot fix (and maps are not resized): use a '
                        'student whose stage strides and input size match '
                        "the teacher's (e.g. MobileFaceNet vs IResNet at "
                        'the same input size), or drop this stage.')
            if shape[1] != want[0]:
                msg += (f' Put a connector on the student side: '
                        f'connectors=dict(c{s}=dict(type="ConvProjector", '
                        f'out_channels={want[0]})) and {arg}=dict('
                        f'tap="student.stage{s}", connector="c{s}").')
            raise ValueError(msg)

    # ----------------------------------------------------------- forward
    def loss(self, t_emb: torch.Tensor,
             s_feat1: Optional[torch.Tensor] = None,
             s_feat2: Optional[torch.Tensor] = None,
             s_feat3: Optional[torch.Tensor] = None,
             s_feat4: Optional[torch.Tensor] = None) -> torch.Tensor:
        feats = {1: s_feat1, 2: s_feat2, 3: s_feat3, 4: s_feat4}
        shapes = {f's_feat{s}': f.shape for s, f in feats.items()
                  if f is not None}
        shapes['t_emb'] = t_emb.shape
        self.check_shapes(shapes)
        teacher = self._attached['teacher']
        network = teacher.network
        if network.training:  # FrozenTeacher keeps eval; restore if changed
            teacher.train(False)
        param = next(network.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        target = t_emb.float()
        total = t_emb.new_zeros((), dtype=torch.float32)
        for s, weight in zip(self.stages, self.stage_weights):
            x = feats[s]
            # no torch.no_grad: weights are frozen (requires_grad=False) but
            # the gradient must flow through the teacher to the student map
            with torch.autocast(device_type=x.device.type, enabled=False):
                emb = network.forward_from_stage(x.to(dtype), s)
            cos = F.cosine_similarity(emb.float(), target, dim=1,
                                      eps=self._EPS)
            term = (1.0 - cos).clamp_min(0.0).pow(self.p).mean()
            total = total + weight * term
        return total

    def extra_repr(self):
        return (f'teacher={self.teacher!r}, stages={self.stages}, '
                f'stage_weights={self.stage_weights}, p={self.p}, '
                + super().extra_repr())
