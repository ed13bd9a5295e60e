"""Any timm model as a face backbone, with a face-embedding neck."""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from kdzoo.registry import BACKBONES
from kdzoo.utils import (CheckpointError, ConfigError, did_you_mean,
                         extract_state_dict, load_into, load_weights_file)
from kdzoo.utils import check_int, check_number, check_size
from .base import BaseBackbone


@BACKBONES.register_module()
class TimmBackbone(BaseBackbone):
    """A timm model (CNN or ViT) with a face embedding neck; no downloads.

    The trunk is ``timm.create_model(model_name, pretrained=False,
    num_classes=0, global_pool='')`` (so nothing is downloaded); weights come
    only from ``pretrained_file``. Neck, chosen by the trunk's output:

    * spatial map ``B×C×h×w`` (CNNs): BatchNorm2d → Dropout → flatten →
      Linear(C·h·w → D) → BatchNorm1d, like IResNet's head;
    * token sequence ``B×N×C`` (ViTs): the class token (or the token mean
      when the model has none) → Linear → BatchNorm1d;
    * pooled ``B×C`` (e.g. ``global_pool='avg'`` in ``timm_kwargs``):
      Linear → BatchNorm1d.

    ``stage_paths`` default to the last module at each of the four deepest
    strides in timm's ``feature_info`` (e.g. ``model.layer1..4`` for a
    ResNet); for isotropic models (ViTs, one stride) four evenly spaced
    blocks, whose outputs are token sequences, not 4-D maps.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        embedding_size: embedding dimension D.
        pretrained_file: optional local state dict for the timm trunk (its
            classifier keys are ignored) or for a whole ``TimmBackbone``;
            loaded on CPU with ``weights_only=True``.
        input_size: (H, W); passed to timm as ``img_size`` for models with
            a fixed input size (ViTs) unless ``timm_kwargs`` has one.
        in_chans: input channels.
        dropout: dropout probability in the neck.
        stage_paths: override the stage module paths (relative to this
            backbone, e.g. ``'model.layer3'``).
        **timm_kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, model_name: str, embedding_size: int = 512,
                 pretrained_file: Optional[str] = None,
                 input_size=(112, 112), in_chans: int = 3,
                 dropout: float = 0.0,
                 stage_paths: Optional[Sequence[str]] = None,
                 **timm_kwargs):
        super().__init__()
        import timm
        owner = 'TimmBackbone'
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ConfigError(
                f'{owner}: unknown timm model_name {model_name!r}.'
                + did_you_mean(str(model_name), timm.list_models())
                + ' List names with timm.list_models("pattern*").')
        self.model_name = model_name
        self.embedding_size = check_int(owner, 'embedding_size',
                                        embedding_size)
        self.input_size = check_size(owner, input_size)
        self.in_chans = check_int(owner, 'in_chans', in_chans)
        dropout = check_number(owner, 'dropout', dropout, 0, 1,
                               high_open=True)
        if timm_kwargs.pop('pretrained', False):
            raise ConfigError(f'{owner}: pretrained=True would download '
                              'weights; give pretrained_file=<local path>')
        timm_kwargs.setdefault('global_pool', '')
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is not None and getattr(cfg, 'fixed_input_size', False):
            timm_kwargs.setdefault('img_size', self.input_size)
        try:
            self.model = timm.create_model(model_name, pretrained=False,
                                           num_classes=0, in_chans=in_chans,
                                           **timm_kwargs)
        except TypeError as e:
            raise ConfigError(f'{owner}: timm rejected the arguments for '
                              f'{model_name!r}: {e}') from None

        self.output_format, out_shape = self._probe_output()
        if self.output_format.startswith('spatial'):
            c, h, w = out_shape
            self.neck = nn.Sequential(
                nn.BatchNorm2d(c), nn.Dropout(dropout), nn.Flatten(),
                nn.Linear(c * h * w, self.embedding_size))
        else:
            self.neck = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(out_shape[-1], self.embedding_size))
        self.features = nn.BatchNorm1d(self.embedding_size)

        if stage_paths is None:
            stage_paths = self._default_stage_paths()
        self.stage_paths = tuple(stage_paths)
        known = set(self.module_names())
        for path in self.stage_paths:
            if path not in known:
                raise ConfigError(
                    f'{owner}: stage path {path!r} is not a module of '
                    f'{model_name!r}.' + did_you_mean(path, known))
        if pretrained_file:
            self.load_pretrained(pretrained_file)

    @torch.no_grad()
    def _probe_output(self) -> Tuple[str, Tuple[int, ...]]:
        """Run the trunk once to find its output layout and shape."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(torch.zeros(1, self.in_chans, *self.input_size))
        except Exception as e:  # noqa: BLE001 -- report timm's reason
            raise ConfigError(
                f'TimmBackbone: {self.model_name!r} cannot run at input_size '
                f'{self.input_size}: {type(e).__name__}: {e}') from None
        finally:
            self.model.train(was_training)
        if out.dim() == 4:
            if getattr(self.model, 'output_fmt', 'NCHW') == 'NHWC':
                return 'spatial_nhwc', tuple(out.permute(0, 3, 1, 2).shape[1:])
            return 'spatial', tuple(out.shape[1:])
        if out.dim() == 3:
            return 'tokens', tuple(out.shape[1:])
        if out.dim() == 2:
            return 'pooled', tuple(out.shape[1:])
        raise ConfigError(f'TimmBackbone: {self.model_name!r} returned a '
                          f'{out.dim()}-D output {tuple(out.shape)}; expected '
                          '2-D, 3-D (tokens) or 4-D (feature map)')

    def _default_stage_paths(self) -> Tuple[str, ...]:
        info = getattr(self.model, 'feature_info', None)
        entries = []
        if info is not None:
            for item in info:  # a list of dicts, or timm's FeatureInfo
                if isinstance(item, dict) and item.get('module'):
                    entries.append((item['module'], item.get('reduction')))
        if not entries:
            return ()
        last_per_stride = {}
        for module, reduction in entries:
            last_per_stride[reduction] = module
        if len(last_per_stride) >= 4:
            picked = list(last_per_stride.values())[-4:]
        else:  # isotropic: four evenly spaced blocks ending at the last
            n = len(entries)
            picked = [entries[max(0, round(n * k / 4) - 1)][0]
                      for k in range(1, 5)]
        return tuple(f'model.{m}' for m in dict.fromkeys(picked))

    def _pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        prefix = getattr(self.model, 'num_prefix_tokens', 0)
        return x[:, 0] if prefix > 0 else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model(x)
        if self.output_format == 'spatial_nhwc':
            x = x.permute(0, 3, 1, 2)
        elif self.output_format == 'tokens':
            x = self._pool_tokens(x)
        return self.features(self.neck(x))

    def load_pretrained(self, path: str) -> None:
        """Load a local trunk (timm) or whole-backbone state dict."""
        state = extract_state_dict(load_weights_file(path, 'pretrained_file'),
                                   path)
        own = self.state_dict()
        source = f'pretrained_file {path!r}'
        if all(k in own for k in state) and any(
                k.startswith('neck.') for k in state):
            load_into(self, state, source)
            return
        classifier = []
        cfg = getattr(self.model, 'pretrained_cfg', None) or {}
        heads = cfg.get('classifier') or ()
        for head in (heads,) if isinstance(heads, str) else heads:
            classifier.append(head + '.')
        trunk_keys = self.model.state_dict()
        state = {k: v for k, v in state.items()
                 if k in trunk_keys or not k.startswith(tuple(classifier))}
        if not state:
            raise CheckpointError(f'{source} holds no weights for '
                                  f'{self.model_name!r}')
        load_into(self.model, state, source)
