"""Teacher adapters: build a frozen teacher from weights on disk."""
from typing import Optional, Sequence

from kdzoo.registry import BACKBONES, HEADS, TEACHERS
from kdzoo.utils import ConfigError, load_module_weights
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
                         input_size=input_size, stage_paths=stage_paths)
        self.checkpoint = checkpoint


@TEACHERS.register_module()
class OnnxTeacher(FrozenTeacher):
    """Frozen teacher from an ONNX file, converted with onnx2torch.

    Args:
        file: the ``.onnx`` file (input N×3×H×W float32).
        mean, std: the model's input normalisation on 0-255 RGB pixels
            (insightface models: 127.5 / 128; some use 127.5 / 127.5).
        input_size: (H, W) the model expects.
        stage_paths: module names in the converted graph whose outputs are
            the stage feature maps (see ``OnnxBackbone.module_names``).
    """

    def __init__(self, file: str, mean: Number = 127.5, std: Number = 128.0,
                 input_size=(112, 112),
                 stage_paths: Optional[Sequence[str]] = None,
                 embedding_size: Optional[int] = None):
        network = BACKBONES.build(
            dict(type='OnnxBackbone', file=file, input_size=input_size,
                 embedding_size=embedding_size,
                 stage_paths=tuple(stage_paths or ())))
        # the backbone stores its stage paths with the graph's prefix
        super().__init__(network, None, mean=mean, std=std,
                         input_size=input_size,
                         stage_paths=network.stage_paths)
        self.file = file
