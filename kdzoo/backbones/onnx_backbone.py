"""An ONNX face model: run in onnxruntime for inference, or converted to a
PyTorch ``fx.GraphModule`` (onnx2torch) where a gradient or a tap on an
inner stage is needed."""
import math
import os
from typing import Optional, Sequence, Tuple

import torch

from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError, did_you_mean
from kdzoo.utils.fileio import file_sha256
from kdzoo.utils import check_int, check_size
from .base import BaseBackbone

GRAPH_PREFIX = 'model.'
RUNTIMES = ('torch', 'onnxruntime', 'auto')


def onnxruntime_session(model, threads: Optional[int] = None,
                        device: Optional[torch.device] = None):
    """An ``onnxruntime.InferenceSession`` for ``model`` (a path or bytes)
    with ``threads`` intra-op threads (default: torch's thread count, the
    cores kdzoo uses) on ``device``: the CUDA provider for a CUDA device
    where this onnxruntime build has it, else the CPU provider."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    providers = ['CPUExecutionProvider']
    if (device is not None and torch.device(device).type == 'cuda'
            and 'CUDAExecutionProvider' in ort.get_available_providers()):
        index = torch.device(device).index
        providers.insert(0, ('CUDAExecutionProvider', dict(
            device_id=torch.cuda.current_device() if index is None
            else index)))
    return ort.InferenceSession(model, options, providers=providers)


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
    """An ONNX face model (e.g. an insightface .onnx) as a backbone.

    ``runtime='torch'`` (the default: trainable, tappable) converts the file
    with ``onnx2torch.convert`` into ``self.model`` (a
    ``torch.fx.GraphModule``). ``runtime='onnxruntime'`` runs it in an
    onnxruntime session instead (inference only: no parameters, no
    gradient, no taps; the CPU provider with torch's thread count, the CUDA
    provider for CUDA inputs where installed); on a 2-core CPU it embeds
    112 px faces 2.7x faster than the converted graph (docs/speed.md). ``'auto'``: onnxruntime unless ``stage_paths`` are
    tapped. ``forward`` returns the first output flattened to ``B×D``. The input is the model's own normalised N×3×H×W
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
        runtime: ``'torch'``, ``'onnxruntime'`` or ``'auto'`` (above).
    """

    def __init__(self, file: str, embedding_size: Optional[int] = None,
                 stage_paths: Sequence[str] = (), input_size=(112, 112),
                 runtime: str = 'torch'):
        super().__init__()
        owner = 'OnnxBackbone'
        if runtime not in RUNTIMES:
            raise ConfigError(f'{owner}: runtime must be one of {RUNTIMES}, '
                              f'got {runtime!r}')
        if isinstance(stage_paths, str):
            stage_paths = (stage_paths,)
        if runtime == 'auto':
            runtime = 'torch' if stage_paths else 'onnxruntime'
        if runtime == 'onnxruntime' and stage_paths:
            raise ConfigError(
                f"{owner}: stage_paths {tuple(stage_paths)} tap modules of "
                "the converted graph, which runtime='onnxruntime' does not "
                "build; use runtime='torch' (or 'auto')")
        self.runtime = runtime
        if not isinstance(file, (str, os.PathLike)) or not os.path.isfile(
                file):
            raise ConfigError(f'{owner}: ONNX file not found: {file!r} '
                              '(relative paths are relative to the current '
                              'directory)')
        self.file = os.fspath(file)
        if input_size is not None:
            self.input_size = check_size(owner, input_size)

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
            self.input_size = check_size(
                owner, tuple(hw) if fixed else (112, 112))
        if hw is not None and any(
                d is not None and d > 0 and d != s
                for d, s in zip(hw, self.input_size)):
            raise ConfigError(
                f'{owner}: {self.file!r} expects input H×W {hw}, but '
                f'input_size is {self.input_size}; set input_size={hw}')
        # the weights live in the file: what a teacher cache is keyed by
        self.file_sha256 = file_sha256(self.file)
        self.onnx_parameters = sum(math.prod(i.dims)
                                   for i in onnx_model.graph.initializer)
        self.session = None
        if runtime == 'onnxruntime':
            try:
                self._start_session()
            except Exception as e:  # noqa: BLE001 -- onnxruntime's reason
                raise ConfigError(f'{owner}: onnxruntime cannot load '
                                  f'{self.file!r}: {type(e).__name__}: {e}; '
                                  "runtime='torch' converts it with "
                                  'onnx2torch instead') from None
        else:
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
            self.embedding_size = check_int(owner, 'embedding_size',
                                            embedding_size)
            if self.embedding_size != inferred:
                raise ConfigError(
                    f'{owner}: embedding_size={embedding_size} but '
                    f'{self.file!r} outputs {inferred}-D embeddings; use '
                    f'embedding_size={inferred} or None')
        self.stage_paths = self._resolve_stage_paths(stage_paths)

    def _start_session(self, device=None) -> None:
        self.session = onnxruntime_session(self.file, device=device)
        self._session_device = torch.device(device or 'cpu')
        self._input_name = self.session.get_inputs()[0].name
        self._output_name = self.session.get_outputs()[0].name

    @torch.no_grad()
    def _dry_run_dim(self) -> int:
        model = getattr(self, 'model', None)
        was_training = model.training if model is not None else False
        if model is not None:
            model.eval()
        try:
            out = self(torch.zeros(1, 3, *self.input_size))
        except Exception as e:  # noqa: BLE001 -- name the file and reason
            raise ConfigError(
                f'OnnxBackbone: {self.file!r} fails on a 1×3×'
                f'{self.input_size[0]}×{self.input_size[1]} input: '
                f'{type(e).__name__}: {e}') from None
        finally:
            if model is not None:
                model.train(was_training)
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
        if self.session is not None:
            return self._run_session(x)
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)

    def _run_session(self, x: torch.Tensor) -> torch.Tensor:
        """The first output for ``x`` from onnxruntime (float32, through
        host memory); no gradient flows through it."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise ConfigError(
                f"OnnxBackbone: {self.file!r} runs in onnxruntime "
                "(runtime='onnxruntime'), which gives no gradient; use "
                "runtime='torch' where a gradient is needed")
        if x.device.type != self._session_device.type:
            self._start_session(x.device)  # e.g. the CUDA provider
        batch = x.detach().float().contiguous().cpu().numpy()
        out = self.session.run([self._output_name],
                               {self._input_name: batch})[0]
        return torch.from_numpy(out).to(x.device).flatten(1)

    def __getstate__(self):
        # onnxruntime sessions do not pickle (deepcopy, spawn); rebuilt
        state = dict(self.__dict__)
        if state.get('session') is not None:
            state['session'] = 'restart'
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.__dict__.get('session') == 'restart':
            self._start_session(self._session_device)
