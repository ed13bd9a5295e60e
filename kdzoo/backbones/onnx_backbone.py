"""An ONNX face model converted to a PyTorch ``fx.GraphModule``."""
import os
from typing import Optional, Sequence, Tuple

import torch

from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError, did_you_mean
from .base import BaseBackbone, check_input_size, check_positive_int

GRAPH_PREFIX = 'model.'


def _onnx_input_hw(onnx_model) -> Optional[Tuple[Optional[int], ...]]:
    """(H, W) of the first graph input (None where dynamic), if 4-D."""
    initializers = {i.name for i in onnx_model.graph.initializer}
    inputs = [i for i in onnx_model.graph.input if i.name not in initializers]
    if not inputs:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    return tuple(d.dim_value if d.HasField('dim_value') else None
                 for d in dims[2:])


def _fold_initializer_identities(onnx_model) -> None:
    """Replace ``Identity(initializer)`` nodes by initializer copies.

    torch's ONNX exporter shares equal weights through Identity nodes, and
    onnx2torch needs conv/BN parameters to be initializers.
    """
    import onnx
    graph = onnx_model.graph
    initializers = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if (node.op_type == 'Identity' and node.input[0] in initializers
                and node.output[0] not in outputs):
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


@BACKBONES.register_module()
class OnnxBackbone(BaseBackbone):
    """An ONNX face model (e.g. an insightface .onnx) run as a torch module.

    The file is converted with ``onnx2torch.convert`` into ``self.model`` (a
    ``torch.fx.GraphModule``); ``forward`` returns its first output
    flattened to ``B×D``. The input is the model's own normalised N×3×H×W
    batch (for insightface models RGB ``(x - 127.5) / 128``). Call
    ``.eval()`` for inference: converted BatchNorm layers use batch
    statistics in training mode, as any torch module does.

    Converted module names come from the ONNX node names. To choose
    ``stage_paths`` list them with ``module_names()``, or their output
    shapes in call order with ``feature_shapes()`` (the last module at
    each spatial size is usually a stage output).

    Args:
        file: path of the ``.onnx`` file.
        embedding_size: expected D; inferred by a dry run when None, and
            checked against the dry run otherwise.
        stage_paths: module paths of stage 1..4 outputs, either relative
            to this backbone (``'model.<node>'``) or to the converted graph.
        input_size: (H, W) of the model's input; must match the ONNX input
            shape where that is fixed. ``None``: the file's fixed H×W, or
            (112, 112) where the file leaves them dynamic.
    """

    def __init__(self, file: str, embedding_size: Optional[int] = None,
                 stage_paths: Sequence[str] = (), input_size=(112, 112)):
        super().__init__()
        owner = 'OnnxBackbone'
        if not isinstance(file, (str, os.PathLike)) or not os.path.isfile(
                file):
            raise ConfigError(f'{owner}: ONNX file not found: {file!r} '
                              '(relative paths are relative to the current '
                              'directory)')
        self.file = os.fspath(file)
        if input_size is not None:
            self.input_size = check_input_size(owner, input_size)

        import onnx
        from onnx2torch import convert
        try:
            onnx_model = onnx.load(self.file)
        except Exception as e:  # noqa: BLE001 -- name the file and reason
            raise ConfigError(f'{owner}: {self.file!r} is not a readable '
                              f'ONNX file: {e}') from None
        hw = _onnx_input_hw(onnx_model)
        if input_size is None:
            fixed = hw is not None and all(d is not None and d > 0
                                           for d in hw)
            self.input_size = check_input_size(
                owner, tuple(hw) if fixed else (112, 112))
        if hw is not None and any(
                d is not None and d > 0 and d != s
                for d, s in zip(hw, self.input_size)):
            raise ConfigError(
                f'{owner}: {self.file!r} expects input H×W {hw}, but '
                f'input_size is {self.input_size}; set input_size={hw}')
        _fold_initializer_identities(onnx_model)
        try:
            self.model = convert(onnx_model)
        except Exception as e:  # noqa: BLE001 -- onnx2torch's reason
            raise ConfigError(f'{owner}: onnx2torch cannot convert '
                              f'{self.file!r}: {type(e).__name__}: '
                              f'{e}') from None
        del onnx_model

        inferred = self._dry_run_dim()
        if embedding_size is None:
            self.embedding_size = inferred
        else:
            self.embedding_size = check_positive_int(owner, 'embedding_size',
                                                     embedding_size)
            if self.embedding_size != inferred:
                raise ConfigError(
                    f'{owner}: embedding_size={embedding_size} but '
                    f'{self.file!r} outputs {inferred}-D embeddings; use '
                    f'embedding_size={inferred} or None')
        self.stage_paths = self._resolve_stage_paths(stage_paths)

    @torch.no_grad()
    def _dry_run_dim(self) -> int:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self(torch.zeros(1, 3, *self.input_size))
        except Exception as e:  # noqa: BLE001 -- name the file and reason
            raise ConfigError(
                f'OnnxBackbone: {self.file!r} fails on a 1×3×'
                f'{self.input_size[0]}×{self.input_size[1]} input: '
                f'{type(e).__name__}: {e}') from None
        finally:
            self.model.train(was_training)
        return int(out.shape[1])

    def _resolve_stage_paths(self, stage_paths) -> Tuple[str, ...]:
        if isinstance(stage_paths, str):
            stage_paths = (stage_paths,)
        known = set(self.module_names())
        resolved = []
        for path in stage_paths or ():
            if path not in known and GRAPH_PREFIX + str(path) in known:
                path = GRAPH_PREFIX + path
            if path not in known:
                raise ConfigError(
                    f'OnnxBackbone: stage path {path!r} is not a module of '
                    f'the converted {self.file!r}.'
                    + did_you_mean(str(path), known)
                    + ' List them with OnnxBackbone(...).module_names() or '
                    '.feature_shapes().')
            resolved.append(path)
        return tuple(resolved)

    def module_names(self) -> Tuple[str, ...]:
        """Paths of the converted graph's modules (``'model.<node>'``)."""
        return tuple(name for name, _ in self.named_modules()
                     if name.startswith(GRAPH_PREFIX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)
