"""The distiller: student + named frozen teachers + taps + connectors + losses."""
import inspect
from collections import OrderedDict
from typing import Dict, Optional

import torch
from mmengine.model import BaseModel
from torch import nn

from kdzoo.registry import (BACKBONES, CONNECTORS, HEADS, LOSSES, MODELS,
                            TEACHERS)
from kdzoo.utils import ConfigError, did_you_mean
from kdzoo.losses.base import loss_signature
from kdzoo.teachers.provider import TeacherOutputs
from .inference import InferenceBackbone
from .taps import Tap, TapRecorder, parse_tap, resolve_module_path

RESERVED_NAMES = ('student', 'data', 'connectors')


class Student(nn.Module):
    """The trained model: backbone (exported) + margin head (training only)."""

    def __init__(self, backbone: dict, head: Optional[dict] = None):
        super().__init__()
        self.backbone = BACKBONES.build(backbone)
        self.head = HEADS.build(head) if head is not None else None


class _Binding:
    """One loss argument bound to a tap, optionally through a connector."""

    def __init__(self, arg: str, tap: Tap, connector: Optional[str]):
        self.arg, self.tap, self.connector = arg, tap, connector

    @property
    def key(self) -> str:
        return self.tap.text + (f'->{self.connector}' if self.connector else '')

    def describe(self) -> str:
        return repr(self.tap.text) + (f' through connector {self.connector!r}'
                                      if self.connector else '')


@MODELS.register_module()
class FaceDistiller(BaseModel):
    """Face-recognition distiller: trains a student from frozen teachers.

    Args:
        student: ``dict(backbone=<backbone cfg>, head=<margin head cfg>)``.
            The head gives the identity loss (``loss_cls``); a student with no
            head trains from its distill losses alone (MarginDistillation,
            AdaDistill replace the head).
        teachers: ``{name: teacher cfg}`` (e.g. ``CheckpointTeacher``,
            ``OnnxTeacher``); several named teachers are allowed; none trains
            the student alone.
        connectors: ``{name: connector cfg}``; trainable adapters applied to a
            tap when a loss input says ``dict(tap=..., connector=name)``.
        distill_losses: ``{name: loss cfg}``; each cfg has ``inputs``, a
            mapping from the loss's forward argument names to taps (see
            ``kdzoo.distillers.taps``) or ``dict(tap=..., connector=...)``.
        cls_loss_weight: weight of the student's identity loss.

        In ``teachers``, ``connectors`` and ``distill_losses`` an entry set to
        ``None`` is removed, so a derived recipe can drop what its base
        declares (``teachers=dict(teacher_age=None)``).
        data_preprocessor: defaults to ``FaceDataPreprocessor``.
        input_size: (H, W) of training images, used for the build-time shape
            check; defaults to the student backbone's ``input_size``.
        test_cfg: ``dict(flip=True)``: test embeddings are the sum of the
            image's and its horizontal flip's (insightface protocol);
            ``fuse_bn=False`` embeds with the backbone as trained instead of
            its BatchNorm-folded channels-last copy.
        teacher_cache: ``dict(teachers=[names], cache_dir=None,
            dtype='float32')``: read these teachers' embeddings from a cache
            built once before training (``TeacherCacheHook``) instead of
            running them every step. Only for teachers whose outputs the
            losses use at the embedding/logits level (no stage taps).

    Everything is validated at build time: unknown loss arguments, missing
    required arguments, unknown tap paths (with the nearest module names),
    and shape mismatches (with the shapes), by one forward pass on zeros.
    """

    def __init__(self, student: dict, teachers: Optional[dict] = None,
                 connectors: Optional[dict] = None,
                 distill_losses: Optional[dict] = None,
                 cls_loss_weight: float = 1.0,
                 data_preprocessor: Optional[dict] = None,
                 input_size=None, test_cfg: Optional[dict] = None,
                 teacher_cache: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        if data_preprocessor is None:
            data_preprocessor = dict(type='FaceDataPreprocessor')
        if isinstance(data_preprocessor, dict):  # build in kdzoo's scope
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        if not isinstance(student, dict) or 'backbone' not in student:
            raise ConfigError('model.student must be dict(backbone=..., '
                              'head=...)')
        unknown = set(student) - {'backbone', 'head'}
        if unknown:
            raise ConfigError(f'model.student: unknown keys {sorted(unknown)}'
                              '; expected backbone and head')
        self.student = Student(student['backbone'], student.get('head'))
        self.cls_loss_weight = float(cls_loss_weight)
        self.test_cfg = {'flip': True, **(test_cfg or {})}
        self._inference = InferenceBackbone()  # not a submodule

        self.teachers = nn.ModuleDict()
        for name, cfg in _present(teachers).items():
            self._check_name(name, 'model.teachers')
            try:
                self.teachers[name] = TEACHERS.build(cfg)
            except KeyError as e:
                raise ConfigError(f'model.teachers.{name}: {e}') from None
        mean = getattr(self.data_preprocessor, 'mean_value', 127.5)
        std = getattr(self.data_preprocessor, 'std_value', 128.0)
        for teacher in self.teachers.values():
            teacher.set_source_normalization(mean, std)

        self._connector_cfgs = _present(connectors)
        self.connectors = nn.ModuleDict()
        for name, cfg in self._connector_cfgs.items():
            self._check_name(name, 'model.connectors')
            self.connectors[name] = CONNECTORS.build(cfg)

        self.distill_losses = nn.ModuleDict()
        self._bindings: Dict[str, list] = OrderedDict()
        for name, cfg in _present(distill_losses).items():
            self._add_loss(name, cfg)
        self._attach_teachers()

        self.recorder = TapRecorder()
        self._register_taps()
        self.teacher_outputs = TeacherOutputs(
            self.teachers, teacher_cache, self._used_teachers,
            [(name, b.arg, b.tap) for name, bindings in self._bindings.items()
             for b in bindings if b.tap.is_module])
        self.input_size = tuple(input_size or getattr(
            self.student.backbone, 'input_size', (112, 112)))
        self._check_shapes()

        # Teachers are never saved: drop them from state dicts, and fill
        # them back in when loading so strict loads of our checkpoints work.
        self._register_state_dict_hook(_drop_teacher_state)
        self._register_load_state_dict_pre_hook(self._fill_teacher_state)
        self._ignore_sharded_params_in_ddp()

    # ----------------------------------------------------------- building
    def _ignore_sharded_params_in_ddp(self) -> None:
        """Keep rank-local parameters (PartialFC's centre shard) out of DDP.

        DistributedDataParallel would average their gradients across ranks,
        mixing different classes; the head synchronises what it needs.
        """
        names = [f'{prefix}.{param}'
                 for prefix, module in self.named_modules()
                 for param in getattr(module, 'ddp_ignore_params', ())]
        if names:
            from torch.nn.parallel import DistributedDataParallel as DDP
            DDP._set_params_and_buffers_to_ignore_for_model(self, names)

    @staticmethod
    def _check_name(name, where):
        if not str(name).isidentifier() or name in RESERVED_NAMES:
            raise ConfigError(f'{where}: name {name!r} must be a Python '
                              f'identifier and not one of {RESERVED_NAMES}')

    @property
    def _sources(self):
        return ['student'] + list(self.teachers.keys())

    def _add_loss(self, name: str, cfg: dict) -> None:
        where = f'model.distill_losses.{name}'
        if not isinstance(cfg, dict) or 'type' not in cfg:
            raise ConfigError(f'{where} must be a dict with a "type"')
        cfg = dict(cfg)
        inputs = cfg.pop('inputs', None)
        loss_type = cfg.get('type')
        if LOSSES.get(loss_type) is None:
            raise ConfigError(f'{where}: {loss_type!r} is not a registered '
                              'loss.' + did_you_mean(
                                  str(loss_type), LOSSES.module_dict) +
                              ' See `kdzoo list losses`.')
        try:
            loss = LOSSES.build(cfg)
        except TypeError as e:
            accepted = _init_args(LOSSES.get(loss_type))
            raise ConfigError(f'{where} ({loss_type}): {e}. Accepted '
                              f'arguments: {accepted}') from None
        params = _forward_params(loss)
        if not isinstance(inputs, dict) or not inputs:
            raise ConfigError(
                f'{where} ({loss_type}) needs inputs=dict(...) binding its '
                f'arguments {list(params)} to taps, e.g. '
                f'inputs=dict({next(iter(params), "x")}="student.embedding")')
        unknown = [a for a in inputs if a not in params]
        if unknown:
            raise ConfigError(f'{where} ({loss_type}): unknown argument(s) '
                              f'{unknown} in inputs; {loss_type} takes '
                              f'{list(params)}')
        missing = [a for a, p in params.items()
                   if p.default is inspect.Parameter.empty and a not in inputs]
        if missing:
            raise ConfigError(f'{where} ({loss_type}): inputs lacks required '
                              f'argument(s) {missing}; {loss_type} takes '
                              f'{list(params)}')
        bindings = []
        for arg, spec in inputs.items():
            connector = None
            if isinstance(spec, dict):
                extra = set(spec) - {'tap', 'connector'}
                if 'tap' not in spec or extra:
                    raise ConfigError(f'{where}.inputs.{arg}: use a tap '
                                      'string or dict(tap=..., connector=...)')
                spec, connector = spec['tap'], spec.get('connector')
                if connector is not None and connector not in self.connectors:
                    raise ConfigError(
                        f'{where}.inputs.{arg}: unknown connector '
                        f'{connector!r}; declared connectors: '
                        f'{list(self.connectors)}' +
                        did_you_mean(connector, self.connectors))
            tap = parse_tap(spec, self._sources, f'{where}.inputs.{arg}')
            bindings.append(_Binding(arg, tap, connector))
        self.distill_losses[name] = loss
        self._bindings[name] = bindings

    def _attach_teachers(self) -> None:
        """Give losses that run a teacher themselves the built teachers.

        A loss defining ``attach_teachers(teachers: dict)`` (e.g.
        ``StagewiseAngularLoss``, which pushes student maps through a frozen
        teacher's later stages) gets ``{name: FrozenTeacher}``. It must keep
        them out of its submodules: the teachers belong to ``self.teachers``
        only (never optimised or saved).
        """
        for name, loss in self.distill_losses.items():
            attach = getattr(loss, 'attach_teachers', None)
            if not callable(attach):
                continue
            try:
                attach(dict(self.teachers))
            except ValueError as e:  # ConfigError included
                raise ConfigError(f'model.distill_losses.{name} '
                                  f'({type(loss).__name__}): {e}') from None

    def _network(self, source: str) -> nn.Module:
        if source == 'student':
            return self.student.backbone
        return self.teachers[source].network

    def _stage_paths(self, source: str):
        if source == 'student':
            return getattr(self.student.backbone, 'stage_paths', ())
        return self.teachers[source].stage_paths

    def _register_taps(self) -> None:
        seen = set()
        self._module_taps = {}
        for name, bindings in self._bindings.items():
            for b in bindings:
                tap = b.tap
                where = f'model.distill_losses.{name}.inputs.{b.arg}'
                if tap.target == 'logits':
                    has_head = (self.student.head if tap.source == 'student'
                                else self.teachers[tap.source].head)
                    if has_head is None:
                        raise ConfigError(f'{where}: {tap.text!r} needs a '
                                          f'head on {tap.source}')
                if not tap.is_module or tap.text in seen:
                    continue
                seen.add(tap.text)
                path = resolve_module_path(tap, self._network(tap.source),
                                           self._stage_paths(tap.source),
                                           where)
                module = self._network(tap.source).get_submodule(path)
                self.recorder.add(tap.text, module, tap.record_input)
                self._module_taps[tap.text] = path

    @property
    def teacher_cache_cfg(self) -> Optional[dict]:
        """The checked ``model.teacher_cache`` (``None``: all online)."""
        return self.teacher_outputs.cfg

    def set_teacher_cache(self, name: str, cache,
                          taps: Optional[dict] = None) -> None:
        """Serve teacher ``name``'s embeddings from ``cache`` (a
        ``TeacherOutputCache`` over the training set) from now on, and its
        tapped feature maps from ``taps`` (``{tap text: cache}``)."""
        self.teacher_outputs.set_cache(name, cache, taps)

    @property
    def _used_teachers(self):
        return [t for t in self.teachers
                if any(b.tap.source == t for bs in self._bindings.values()
                       for b in bs)]

    def _check_shapes(self) -> None:
        """Build time: one forward pass on zeros (teachers run online) sizes
        the connectors from the tensors they receive and gives every loss
        its bound shapes to check; nothing of it stays for training."""
        if not self._bindings:
            return
        was_training = self.training
        self.eval()
        try:
            probe = torch.zeros(2, 3, *self.input_size)
            data = dict(label=torch.zeros(2, dtype=torch.long),
                        age=torch.zeros(2, dtype=torch.long),
                        index=torch.arange(2))
            with torch.no_grad(), self.recorder.recording():
                s_emb = self.student.backbone(probe)
                outputs = self._model_outputs(probe, data, s_emb,
                                              use_cache=False)
                self._size_connectors(outputs, data, s_emb)
                values = self._bound_values(outputs, data, s_emb)
            for name, bindings in self._bindings.items():
                loss = self.distill_losses[name]
                shapes = {b.arg: values[b.key].shape for b in bindings}
                check = getattr(loss, 'check_shapes', None)
                try:
                    if check is not None:
                        check(shapes)
                except (ValueError, KeyError) as e:
                    bound = ', '.join(f'{b.arg} <- {b.describe()}'
                                      for b in bindings)
                    raise ConfigError(
                        f'model.distill_losses.{name} '
                        f'({type(loss).__name__}): {e} [bound: {bound}]'
                    ) from None
                # checked once here, not at every step
                loss.inputs_checked = True
        finally:
            self.recorder.clear()
            self.train(was_training)

    def _size_connectors(self, outputs: dict, data: dict,
                         s_emb: torch.Tensor) -> None:
        """Give each connector the shape of the tensor it will receive."""
        for bindings in self._bindings.values():
            for b in bindings:
                if b.connector is None:
                    continue
                value = self._tap_value(b.tap, outputs, data, s_emb)
                try:
                    self.connectors[b.connector].build_for(value.shape)
                except ValueError as e:
                    raise ConfigError(f'model.connectors.{b.connector} on '
                                      f'{b.tap.text!r}: {e}') from None

    # ----------------------------------------------------------- forward
    def _model_outputs(self, inputs: torch.Tensor, data: dict,
                       s_emb: torch.Tensor,
                       use_cache: bool = True) -> Dict[str, torch.Tensor]:
        """The teacher pass: every used teacher's embedding (and logits),
        online or from the cache, beside the student's embedding."""
        outputs = self.teacher_outputs.outputs(self._used_teachers, inputs,
                                               data, use_cache)
        outputs['student.embedding'] = s_emb
        return outputs

    def _tap_value(self, tap: Tap, outputs: dict, data: dict,
                   s_emb: torch.Tensor) -> torch.Tensor:
        """The tensor a tap names, before any connector."""
        if tap.source == 'data':
            return data[tap.target]
        if tap.target == 'logits' and tap.source == 'student':
            if 'student.logits' not in outputs:
                outputs['student.logits'] = self.student.head(s_emb)
            return outputs['student.logits']
        if tap.target in ('embedding', 'logits'):
            return outputs[f'{tap.source}.{tap.target}']
        if tap.text in outputs:  # a cached teacher's feature map
            return outputs[tap.text]
        value = self.recorder.get(tap.text)
        if value is None:
            raise RuntimeError(
                f'tap {tap.text!r} recorded nothing: module '
                f'{self._module_taps[tap.text]!r} did not run in the forward '
                'pass')
        return value

    def _bound_values(self, outputs: dict, data: dict,
                      s_emb: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every bound tensor, through its connector where it has one."""
        values: Dict[str, torch.Tensor] = {}
        for bindings in self._bindings.values():
            for b in bindings:
                if b.key not in values:
                    value = self._tap_value(b.tap, outputs, data, s_emb)
                    if b.connector is not None:
                        value = self.connectors[b.connector](value)
                    values[b.key] = value
        return values

    def forward(self, inputs: torch.Tensor, data_samples=None,
                mode: str = 'tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        if mode == 'tensor':
            return self.student.backbone(inputs)
        raise ValueError(f'FaceDistiller: unknown mode {mode!r}')

    def loss(self, inputs: torch.Tensor, data_samples: dict) -> dict:
        """Three steps: the student pass (its identity loss), the teacher
        pass (teacher outputs, tapped maps, connectors), the distillation
        losses on the bound tensors."""
        if self.student.head is None and not self._bindings:
            raise ConfigError('nothing to train: the student has no head and '
                              'there are no distill_losses')
        losses = OrderedDict()
        try:
            with self.recorder.recording():
                s_emb = self.student.backbone(inputs)
                if self.student.head is not None:
                    for key, value in self.student.head.loss(
                            s_emb, data_samples['label']).items():
                        losses[key] = value * self.cls_loss_weight
                if self._bindings:
                    outputs = self._model_outputs(inputs, data_samples,
                                                  s_emb)
                    values = self._bound_values(outputs, data_samples, s_emb)
            # the taps are paused from here: losses that run a teacher's
            # modules again (StagewiseAngularLoss) overwrite no record
            for name, bindings in self._bindings.items():
                kwargs = {b.arg: values[b.key] for b in bindings}
                key = name if name.startswith('loss') else f'loss_{name}'
                loss = self.distill_losses[name]
                losses[key] = loss(**kwargs)
                losses.update(_extra_log_vars(key, loss, s_emb.device))
        finally:
            self.recorder.clear()
        return losses

    @torch.no_grad()
    def embed(self, inputs: torch.Tensor, flip: Optional[bool] = None):
        """Student embeddings; flip-sum (image + mirror) when ``flip``.

        In eval mode the backbone runs with BatchNorm folded into its
        convolutions, channels-last (``kdzoo.distillers.inference``;
        ``test_cfg.fuse_bn=False`` turns it off)."""
        flip = self.test_cfg.get('flip', True) if flip is None else flip
        backbone = self.student.backbone
        if not self.training and self.test_cfg.get('fuse_bn', True):
            backbone = self._inference.get(backbone)
            if backbone is not self.student.backbone and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
        emb = backbone(inputs)
        if flip:
            emb = emb + backbone(torch.flip(inputs, dims=[3]))
        return emb

    def predict(self, inputs: torch.Tensor, data_samples=None) -> list:
        emb = self.embed(inputs).float().cpu()
        index = data_samples['index'] if data_samples is not None else \
            torch.arange(len(emb))
        return [dict(index=int(i), embedding=e) for i, e in zip(index, emb)]

    # ----------------------------------------------------------- state
    def _fill_teacher_state(self, state_dict, prefix, *args):
        for key, value in self.teachers.state_dict(
                prefix=prefix + 'teachers.').items():
            state_dict.setdefault(key, value)


def _drop_teacher_state(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + 'teachers.')]:
        del state_dict[key]
    return state_dict


def _extra_log_vars(key: str, loss: nn.Module, device) -> dict:
    """A loss's ``log_vars()`` as tensors mmengine logs but never sums."""
    log_vars = getattr(loss, 'log_vars', None)
    if not callable(log_vars):
        return {}
    short = key[len('loss_'):] if key.startswith('loss_') else key
    return {f'{short}_{k}': torch.tensor(float(v), device=device)
            for k, v in log_vars().items() if 'loss' not in f'{short}_{k}'}


def _present(entries: Optional[dict]) -> dict:
    """``entries`` without the names a derived recipe set to ``None``."""
    return {k: v for k, v in (entries or {}).items() if v is not None}


def _forward_params(loss: nn.Module) -> Dict[str, inspect.Parameter]:
    sig = loss_signature(loss)
    return OrderedDict(
        (n, p) for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _init_args(cls) -> list:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != 'self' and p.kind not in (p.VAR_POSITIONAL,
                                              p.VAR_KEYWORD)]
