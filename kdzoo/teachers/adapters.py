"""Teacher adapters: build a frozen teacher from weights on disk."""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from kdzoo.registry import BACKBONES, HEADS, TEACHERS
from kdzoo.utils import (ConfigError, check_size, did_you_mean,
                         extract_state_dict, load_into, load_module_weights,
                         load_weights_file)
from kdzoo.utils.probe import run_on_zeros
from .base import FrozenTeacher, Number


@TEACHERS.register_module()
class CheckpointTeacher(FrozenTeacher):
    """Frozen teacher from a registered backbone config and a weights file.

    The file is loaded on CPU with ``weights_only=True``; wrapper prefixes
    (``module.``, ``backbone.``, ``student.backbone.``) are stripped; a key or
    shape mismatch lists the missing/unexpected keys. Works with kdzoo's own
    ``backbone.pth`` exports and insightface arcface_torch ``backbone.pth``.

    Args:
        backbone: backbone config, e.g. ``dict(type='IResNet', depth=50)``.
        checkpoint: path of the backbone weights.
        head: optional head config (for ``<teacher>.logits``), with
            ``head_checkpoint`` (a kdzoo ``head.pth``).
        mean, std, input_size, stage_paths: see ``FrozenTeacher``.
    """

    def __init__(self, backbone: dict, checkpoint: str,
                 head: Optional[dict] = None,
                 head_checkpoint: Optional[str] = None,
                 mean: Number = 127.5, std: Number = 128.0,
                 input_size=None, stage_paths: Optional[Sequence[str]] = None,
                 strict: bool = True):
        if not checkpoint:
            raise ConfigError('CheckpointTeacher needs checkpoint=<path of '
                              'the backbone weights>')
        network = BACKBONES.build(backbone)
        load_module_weights(network, checkpoint, what='teacher checkpoint',
                            strict=strict)
        head_module = None
        if head is not None:
            if not head_checkpoint:
                raise ConfigError('CheckpointTeacher: head given without '
                                  'head_checkpoint (the trained class '
                                  'centres); a random head gives no '
                                  'knowledge to distil')
            head_module = HEADS.build(head)
            load_module_weights(head_module, head_checkpoint,
                                what='teacher head checkpoint', strict=strict)
        if input_size is None:
            input_size = getattr(network, 'input_size', None)
        super().__init__(network, head_module, mean=mean, std=std,
                         input_size=input_size, stage_paths=stage_paths,
                         source=checkpoint,
                         variant=backbone.get('type')
                         if isinstance(backbone, dict) else None)
        self.checkpoint = checkpoint
        self.log_summary()


@TEACHERS.register_module()
class OnnxTeacher(FrozenTeacher):
    """Frozen teacher from an ONNX file: run in onnxruntime when only its
    embedding is used, converted with onnx2torch when inner stages are
    tapped (``runtime='auto'``; see ``OnnxBackbone``).

    Args:
        file: the ``.onnx`` file (input N×3×H×W float32).
        mean, std: the model's input normalisation on 0-255 RGB pixels
            (insightface models: 127.5 / 128; some use 127.5 / 127.5).
        input_size: (H, W) the model expects.
        stage_paths: module names in the converted graph whose outputs are
            the stage feature maps (see ``OnnxBackbone.module_names``).
        runtime: ``'auto'`` (onnxruntime unless ``stage_paths``),
            ``'onnxruntime'`` or ``'torch'``.
    """

    def __init__(self, file: str, mean: Number = 127.5, std: Number = 128.0,
                 input_size=(112, 112),
                 stage_paths: Optional[Sequence[str]] = None,
                 embedding_size: Optional[int] = None,
                 runtime: str = 'auto'):
        network = BACKBONES.build(
            dict(type='OnnxBackbone', file=file, input_size=input_size,
                 embedding_size=embedding_size,
                 stage_paths=tuple(stage_paths or ()), runtime=runtime))
        # the backbone stores its stage paths with the graph's prefix
        super().__init__(network, None, mean=mean, std=std,
                         input_size=input_size,
                         stage_paths=network.stage_paths, source=file)
        self.file = file
        self.log_summary()


def _backbone_from_file(cfg: dict, checkpoint: str, owner: str,
                        strict: bool) -> nn.Module:
    """Read ``checkpoint`` (``weights_only=True``), then build ``cfg`` and
    load it; the file is read first so a bad path fails before the build."""
    if not checkpoint:
        raise ConfigError(f'{owner} needs checkpoint=<path of the backbone '
                          'weights>')
    what = f'{owner} checkpoint'
    state = extract_state_dict(load_weights_file(checkpoint, what),
                               checkpoint)
    network = BACKBONES.build(cfg)
    load_into(network, state, source=f'{what} {checkpoint!r}', strict=strict)
    return network


# arcface_torch ``get_model(name)`` -> the kdzoo backbone with the same
# state-dict keys (mbf / mbf_large as arcface_torch's get_mbf /
# get_mbf_large: blocks (1, 4, 6, 2) scale 2 / blocks (2, 8, 12, 4) scale 4).
ARCFACE_TORCH_ARCHS = {
    'r18': dict(type='IResNet', depth=18),
    'r34': dict(type='IResNet', depth=34),
    'r50': dict(type='IResNet', depth=50),
    'r100': dict(type='IResNet', depth=100),
    'r200': dict(type='IResNet', depth=200),
    'mbf': dict(type='MobileFaceNet'),
    'mbf_large': dict(type='MobileFaceNet', scale=4, blocks=(2, 8, 12, 4)),
}


@TEACHERS.register_module()
class ArcFaceTorchTeacher(FrozenTeacher):
    """Frozen teacher from an insightface arcface_torch ``backbone.pth``.

    ``arch`` is arcface_torch's ``--network`` name; the file (a bare state
    dict, as arcface_torch saves ``backbone.module.state_dict()``) loads
    strictly into kdzoo's ``IResNet`` / ``MobileFaceNet``, whose keys are
    arcface_torch's. arcface_torch's ``fp16`` flag only sets autocast and
    changes no weight, so it has no counterpart here.

    Input: 112×112 RGB, ``(x - 127.5) / 127.5`` — arcface_torch trains with
    ``Normalize(mean=0.5, std=0.5)`` on 0-1 RGB pixels and its
    ``inference.py`` does the same.

    Args:
        arch: ``r18``, ``r34``, ``r50``, ``r100``, ``r200``, ``mbf`` or
            ``mbf_large``.
        checkpoint: path of ``backbone.pth``.
        embedding_size: arcface_torch's ``num_features`` (512).
        mean, std: input normalisation on 0-255 RGB pixels.
        stage_paths: override the stage module paths (defaults:
            ``layer1..4`` / ``layers.1/3/5/7``).
        strict: require every key to match.
    """

    def __init__(self, arch: str, checkpoint: str, embedding_size: int = 512,
                 mean: Number = 127.5, std: Number = 127.5,
                 stage_paths: Optional[Sequence[str]] = None,
                 strict: bool = True):
        owner = 'ArcFaceTorchTeacher'
        if not isinstance(arch, str) or arch not in ARCFACE_TORCH_ARCHS:
            raise ConfigError(
                f'{owner}: arch {arch!r} is not an arcface_torch backbone; '
                f'use one of {", ".join(ARCFACE_TORCH_ARCHS)}.'
                + did_you_mean(str(arch), ARCFACE_TORCH_ARCHS))
        cfg = dict(ARCFACE_TORCH_ARCHS[arch], embedding_size=embedding_size)
        network = _backbone_from_file(cfg, checkpoint, owner, strict)
        super().__init__(network, None, mean=mean, std=std,
                         input_size=network.input_size,
                         stage_paths=stage_paths, source=checkpoint,
                         variant=arch)
        self.arch = arch
        self.checkpoint = checkpoint
        self.log_summary()


def tface_model_name(depth: int, se: bool) -> str:
    """TFace's function name: ``IR_50``, ``IR_SE_101`` (depth 100), ..."""
    return f"IR_{'SE_' if se else ''}{101 if depth == 100 else depth}"


@TEACHERS.register_module()
class TFaceTeacher(FrozenTeacher):
    """Frozen teacher from a Tencent TFace IR / IR-SE backbone file.

    Loads e.g. ``Backbone_Epoch_24_checkpoint.pth`` (TFace saves the bare
    ``backbone.module.state_dict()``; ``module.`` prefixes are stripped too)
    strictly into ``TFaceIR``, whose keys are TFace's (see
    ``kdzoo.backbones.tface_irse``).

    Input: RGB, ``(x - 127.5) / 127.5`` (TFace's configs use ``RGB_MEAN =
    RGB_STD = [0.5, 0.5, 0.5]`` on 0-1 pixels, images read with PIL as RGB).

    Args:
        depth: 18, 34, 50, 100 (``IR_101``; 101 is accepted), 152, 200.
        checkpoint: path of the backbone weights.
        se: True for ``IR_SE_*``.
        input_size: 112 or 224 (H, W) the model was trained at.
        embedding_size: D (512 in TFace's models).
        mean, std: input normalisation on 0-255 RGB pixels.
        stage_paths: override the stage module paths (default: the last
            unit of each stage, ``body.<k>``).
        strict: require every key to match.
    """

    def __init__(self, depth: int, checkpoint: str, se: bool = False,
                 input_size=112, embedding_size: int = 512,
                 mean: Number = 127.5, std: Number = 127.5,
                 stage_paths: Optional[Sequence[str]] = None,
                 strict: bool = True):
        cfg = dict(type='TFaceIR', depth=depth, se=se, input_size=input_size,
                   embedding_size=embedding_size)
        network = _backbone_from_file(cfg, checkpoint, 'TFaceTeacher',
                                      strict)
        super().__init__(network, None, mean=mean, std=std,
                         input_size=network.input_size,
                         stage_paths=stage_paths, source=checkpoint,
                         variant=tface_model_name(network.depth, se))
        self.checkpoint = checkpoint
        self.log_summary()


@TEACHERS.register_module()
class TimmTeacher(FrozenTeacher):
    """Frozen teacher from a timm architecture and a local weights file.

    The model is ``timm.create_model(model_name, pretrained=False, ...)``
    (nothing is downloaded) and its weights come only from ``checkpoint``,
    read with ``weights_only=True`` and loaded strictly. The embedding is
    the model's output:

    * ``num_classes=None`` (default): taken from the file's classifier
      (timm's ``pretrained_cfg['classifier']``, e.g. ``fc``): a face model
      trained with a D-wide last layer gives D-dim embeddings; a file
      without classifier weights gives the pooled features;
    * ``num_classes=0``: the pooled features; the file's classifier weights
      are dropped;
    * ``num_classes=N``: an N-wide classifier, which the file must hold.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        checkpoint: local weights (a timm state dict, possibly wrapped in
            ``state_dict``/``model`` or prefixed ``module.``).
        num_classes: see above.
        mean, std: input normalisation on 0-255 RGB pixels; default: the
            model's timm ``pretrained_cfg`` mean/std × 255.
        input_size: (H, W) the model runs at; the batch is resized to it.
            Models with a fixed input size (ViTs) are built with
            ``img_size=input_size``.
        stage_paths: stage module paths in the timm model; default: the
            last module at each of the four deepest strides of timm's
            ``feature_info`` (``layer1..4`` for a ResNet), none for
            isotropic models.
        strict: require every key to match.
        **timm_kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, model_name: str, checkpoint: str,
                 num_classes: Optional[int] = None,
                 mean: Optional[Number] = None, std: Optional[Number] = None,
                 input_size=(112, 112),
                 stage_paths: Optional[Sequence[str]] = None,
                 strict: bool = True, **timm_kwargs):
        import timm
        from timm.data import resolve_data_config

        owner = 'TimmTeacher'
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ConfigError(
                f'{owner}: unknown timm model_name {model_name!r}.'
                + did_you_mean(str(model_name), timm.list_models())
                + ' List names with timm.list_models("pattern*").')
        if timm_kwargs.pop('pretrained', False):
            raise ConfigError(f'{owner}: pretrained=True would download '
                              'weights; give checkpoint=<local file>')
        if not checkpoint:
            raise ConfigError(f'{owner} needs checkpoint=<path of the '
                              'local weights file>')
        if num_classes is not None and (
                isinstance(num_classes, bool)
                or not isinstance(num_classes, int) or num_classes < 0):
            raise ConfigError(f'{owner}: num_classes must be None (from the '
                              'file), 0 (pooled features) or a positive '
                              f'integer, got {num_classes!r}')
        input_size = check_size(owner, input_size)
        what = f'{owner} checkpoint'
        source = f'{what} {checkpoint!r}'
        state = extract_state_dict(load_weights_file(checkpoint, what),
                                   checkpoint)

        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        classifiers = _classifier_prefixes(pretrained_cfg)
        if num_classes is None:
            num_classes = _classifier_width(state, classifiers)
        elif num_classes == 0:
            state = {k: v for k, v in state.items()
                     if not k.startswith(classifiers)}
        if getattr(pretrained_cfg, 'fixed_input_size', False):
            timm_kwargs.setdefault('img_size', input_size)
        try:
            model = timm.create_model(model_name, pretrained=False,
                                      num_classes=num_classes,
                                      **timm_kwargs)
        except TypeError as e:
            raise ConfigError(f'{owner}: timm rejected the arguments for '
                              f'{model_name!r}: {e}') from None
        load_into(model, state, source=source, strict=strict)
        embedding_size = _probe_embedding_size(model, input_size, owner,
                                               model_name)
        data_cfg = resolve_data_config({}, model=model)
        if mean is None:
            mean = [255.0 * v for v in data_cfg['mean']]
        if std is None:
            std = [255.0 * v for v in data_cfg['std']]
        if stage_paths is None:
            stage_paths = _timm_stage_paths(model)
        super().__init__(model, None, mean=mean, std=std,
                         input_size=input_size, stage_paths=stage_paths,
                         source=checkpoint, variant=model_name,
                         embedding_size=embedding_size)
        self.model_name = model_name
        self.checkpoint = checkpoint
        self.log_summary()


def _classifier_prefixes(pretrained_cfg) -> Tuple[str, ...]:
    """``('fc.',)`` from timm's ``classifier`` entry (a name or a tuple)."""
    heads = getattr(pretrained_cfg, 'classifier', None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(h + '.' for h in heads)


def _classifier_width(state: dict, prefixes: Tuple[str, ...]) -> int:
    """Output width of the file's classifier, 0 when it has none."""
    for prefix in prefixes:
        weight = state.get(prefix + 'weight')
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            return int(weight.shape[0])
    return 0


@torch.no_grad()
def _probe_embedding_size(model: nn.Module, input_size, owner: str,
                          model_name: str) -> int:
    """Run a zero batch; the output must be B×D."""
    try:
        out = run_on_zeros(model, (1, 3, *input_size))
    except Exception as e:  # noqa: BLE001 -- report timm's reason
        raise ConfigError(f'{owner}: {model_name!r} cannot run at '
                          f'input_size {tuple(input_size)}: '
                          f'{type(e).__name__}: {e}') from None
    if out.dim() != 2:
        raise ConfigError(
            f'{owner}: {model_name!r} returns a {out.dim()}-D output '
            f'{tuple(out.shape)}; a teacher must return B×D embeddings '
            '(drop global_pool=\'\' or use TimmBackbone with a neck)')
    return int(out.shape[1])


def _timm_stage_paths(model: nn.Module) -> Tuple[str, ...]:
    """Last module at each of the four deepest strides of ``feature_info``."""
    last_per_stride = {}
    for item in getattr(model, 'feature_info', None) or ():
        if isinstance(item, dict) and item.get('module'):
            last_per_stride[item.get('reduction')] = item['module']
    if len(last_per_stride) < 4:
        return ()
    return tuple(list(last_per_stride.values())[-4:])
