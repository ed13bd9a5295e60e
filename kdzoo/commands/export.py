"""``kdzoo export``: a trained run's student backbone as a standalone model.

Two formats, each with a sidecar ``<out>.json`` describing the input:

* ``pth``: the backbone's ``state_dict`` alone (keys as the kdzoo backbone
  names them, which for ``IResNet``/``MobileFaceNet`` are insightface
  arcface_torch's ``backbone.pth`` keys), loadable with
  ``torch.load(..., weights_only=True)`` and ``load_state_dict(strict=True)``.
  No head, connector or teacher weights.
* ``onnx``: the backbone traced by ``torch.onnx.export`` (the TorchScript
  exporter, ``dynamo=False``: the dynamo exporter needs ``onnxscript``),
  input ``input`` float32 N×3×H×W, output ``embedding`` N×D, batch axis
  dynamic. Before anything is written the graph is run in onnxruntime at two
  batch sizes other than the traced one and compared with PyTorch; the
  export fails if ``max|onnx - torch| > 1e-4 · max|torch|``.

The input is what the run's data preprocessor feeds the student: RGB pixels
in 0..255 mapped to ``(pixel - mean) / std`` per channel (insightface's
``(x - 127.5) / 128`` by default); the sidecar records mean and std.

The run's own checkpoints are loaded with ``weights_only=True`` and the
runner allow-list (``kdzoo.engine.checkpoint``), as resuming does.
"""
import glob
import hashlib
import io
import json
import os
import warnings
from typing import Optional, Sequence

import torch
from mmengine.config import Config

from kdzoo.utils import (CheckpointError, ConfigError, KdzooError,
                         atomic_write_bytes, atomic_write_json,
                         did_you_mean, extract_state_dict, load_into,
                         load_weights_file)
from kdzoo.utils.checkpoint import select_prefix
from kdzoo.version import __version__
from kdzoo.engine.checkpoint import (find_resume_checkpoint,
                                     runner_checkpoint_policy)
from kdzoo.engine.validate import import_custom_modules

FORMATS = ('pth', 'onnx')
DEFAULT_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = 'input', 'embedding'
# max |onnxruntime - torch| allowed, as a fraction of max |torch output|
ONNX_RELATIVE_TOLERANCE = 1e-4
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)  # differ from TRACE_BATCH: proves the dynamic axis
STUDENT_BACKBONE = 'student.backbone.'
# written by ExportStudentHook after training; used when no epoch_*.pth is
FINAL_BACKBONE = 'backbone.pth'


# ------------------------------------------------------------ the run
def find_run_config(run_dir: str) -> str:
    """The config ``kdzoo train`` dumped into ``run_dir`` (newest ``*.py``
    that defines ``model``)."""
    candidates = sorted(glob.glob(os.path.join(run_dir, '*.py')),
                        key=os.path.getmtime, reverse=True)
    for path in candidates:
        try:
            cfg = Config.fromfile(path, import_custom_modules=False)
        except Exception:  # noqa: BLE001 - not a config; try the next
            continue
        if 'model' in cfg:
            return path
    raise ConfigError(
        f'no config in run dir {run_dir!r}: expected the recipe copy that '
        '`kdzoo train` writes there (<recipe>.py with a `model`); found '
        f'{[os.path.basename(p) for p in candidates] or "no *.py"}. Pass the '
        'work dir of a training run.')


def find_run_checkpoint(run_dir: str) -> str:
    """The newest complete ``epoch_*``/``iter_*.pth`` (as resuming picks
    it), else the final ``backbone.pth``."""
    path = find_resume_checkpoint(run_dir, repair_pointer=False)
    if path is None and os.path.isfile(os.path.join(run_dir,
                                                    FINAL_BACKBONE)):
        path = os.path.join(run_dir, FINAL_BACKBONE)
    if path is None:
        raise CheckpointError(
            f'no checkpoint in run dir {run_dir!r}: no loadable epoch_*.pth '
            f'/ iter_*.pth and no {FINAL_BACKBONE}. Train the run first, or '
            'pass --checkpoint FILE.')
    return path


def student_backbone_cfg(cfg: Config, source: str) -> dict:
    """``model.student.backbone`` as a plain dict, or ``ConfigError``."""
    from kdzoo.registry import BACKBONES
    student = (cfg.get('model') or {}).get('student')
    backbone = student.get('backbone') if isinstance(student, dict) else None
    if not isinstance(backbone, dict) or 'type' not in backbone:
        raise ConfigError(
            f'{source}: model.student.backbone is missing, so there is no '
            'student backbone to export; `kdzoo export` needs a recipe whose '
            'model.student is dict(backbone=dict(type=...), head=...)')
    backbone = backbone.to_dict() if hasattr(backbone, 'to_dict') \
        else dict(backbone)
    if BACKBONES.get(backbone['type']) is None:
        raise ConfigError(
            f'{source}: model.student.backbone.type {backbone["type"]!r} is '
            'not a registered backbone.' + did_you_mean(
                str(backbone['type']), BACKBONES.module_dict) +
            ' See `kdzoo list backbones`.')
    return backbone


def input_normalization(cfg: Config):
    """Per-channel (mean, std) of the run's data preprocessor (RGB, 0-255
    pixels), as ``FaceDistiller`` builds it."""
    from kdzoo.registry import MODELS
    spec = (cfg.get('model') or {}).get('data_preprocessor') \
        or cfg.get('data_preprocessor') or dict(type='FaceDataPreprocessor')
    preprocessor = MODELS.build(spec)
    mean = getattr(preprocessor, 'mean_value', 127.5)
    std = getattr(preprocessor, 'std_value', 128.0)
    return _per_channel(mean), _per_channel(std)


def _per_channel(value) -> list:
    values = [float(v) for v in torch.as_tensor(value).flatten()]
    return values * 3 if len(values) == 1 else values


def load_student_state(path: str):
    """Student backbone weights of a checkpoint, and its ``meta``.

    A runner checkpoint gives its ``student.backbone.*`` keys (stripped);
    a bare backbone state dict (``backbone.pth``) is used as it is.
    """
    with runner_checkpoint_policy():
        obj = load_weights_file(path, 'checkpoint')
    meta = obj.get('meta') if isinstance(obj, dict) else None
    state = extract_state_dict(obj, path, prefixes=('module.',))
    if any(k.startswith(STUDENT_BACKBONE) for k in state):
        state = select_prefix(state, STUDENT_BACKBONE)
    elif any(k.startswith('student.') for k in state):
        raise CheckpointError(
            f'checkpoint {path!r} is a kdzoo run checkpoint without student '
            f'backbone weights (no keys under {STUDENT_BACKBONE!r})')
    else:  # a bare backbone state dict, maybe wrapped (module./backbone.)
        state = extract_state_dict(state, path)
    return state, (meta if isinstance(meta, dict) else {})


def load_run_student(run_dir: str, checkpoint: Optional[str] = None
                     ) -> dict:
    """Build the student backbone of ``run_dir`` and load its weights.

    Returns ``dict(backbone, backbone_cfg, config, checkpoint, meta, mean,
    std, input_size)``; the backbone is on CPU in eval mode.
    """
    from kdzoo.registry import BACKBONES
    if not os.path.isdir(run_dir):
        raise ConfigError(
            f'run dir not found: {run_dir!r}. Pass the work dir of a '
            '`kdzoo train` run (it holds the recipe copy and epoch_*.pth).')
    config = find_run_config(run_dir)
    cfg = Config.fromfile(config, import_custom_modules=False)
    import_custom_modules(cfg, config)
    backbone_cfg = student_backbone_cfg(cfg, config)
    checkpoint = checkpoint or find_run_checkpoint(run_dir)
    state, meta = load_student_state(checkpoint)
    backbone = BACKBONES.build(dict(backbone_cfg))
    load_into(backbone, state, strict=True,
              source=f'student backbone of checkpoint {checkpoint!r}')
    mean, std = input_normalization(cfg)
    input_size = (cfg.get('model') or {}).get('input_size') or getattr(
        backbone, 'input_size', (112, 112))
    return dict(backbone=backbone.cpu().eval(), backbone_cfg=backbone_cfg,
                config=config, checkpoint=checkpoint, meta=meta, mean=mean,
                std=std, input_size=[int(s) for s in input_size])


# ------------------------------------------------------------ formats
def backbone_state_dict(backbone) -> dict:
    """The backbone's tensors, detached CPU copies, keys unchanged."""
    return {k: v.detach().cpu().clone().contiguous()
            for k, v in backbone.state_dict().items()}


def _pth_bytes(backbone, backbone_cfg: dict) -> bytes:
    """Serialised state dict, checked to load back with weights_only=True
    into a fresh backbone with strict=True."""
    from kdzoo.registry import BACKBONES
    buffer = io.BytesIO()
    torch.save(backbone_state_dict(backbone), buffer)
    data = buffer.getvalue()
    fresh = BACKBONES.build(dict(backbone_cfg))
    fresh.load_state_dict(torch.load(io.BytesIO(data), map_location='cpu',
                                     weights_only=True), strict=True)
    return data


def _onnx_bytes(backbone, input_size: Sequence[int], opset: int) -> bytes:
    example = torch.randn(TRACE_BATCH, 3, *input_size,
                          generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter announces its deprecation
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(
                backbone, (example, ), buffer, input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT], opset_version=opset,
                dynamic_axes={ONNX_INPUT: {0: 'batch'},
                              ONNX_OUTPUT: {0: 'batch'}},
                do_constant_folding=True, dynamo=False)
    except Exception as e:  # noqa: BLE001 - report the exporter's reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        hint = (' Try another --opset.' if 'opset' in reason.lower()
                else '')
        raise KdzooError(f'torch.onnx.export failed for '
                         f'{type(backbone).__name__} (opset {opset}): '
                         f'{type(e).__name__}: {reason}.{hint}') from None
    return buffer.getvalue()


@torch.no_grad()
def check_onnx(model: bytes, backbone, input_size: Sequence[int],
               batch_sizes: Sequence[int] = CHECK_BATCHES,
               tolerance: float = ONNX_RELATIVE_TOLERANCE) -> dict:
    """Run ``model`` in onnxruntime on random batches and compare with
    ``backbone``; ``KdzooError`` when ``max|Δ| > tolerance · max|torch|``."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model, options,
                                   providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(1)
    report = dict(tolerance_relative=tolerance, batches={})
    worst_diff, scale = 0.0, 0.0
    for n in batch_sizes:
        x = torch.randn(n, 3, *input_size, generator=generator)
        expected = backbone(x).float()
        got = torch.from_numpy(session.run([ONNX_OUTPUT],
                                           {ONNX_INPUT: x.numpy()})[0])
        if tuple(got.shape) != tuple(expected.shape):
            raise KdzooError(
                f'ONNX export check: batch {n} gives output shape '
                f'{tuple(got.shape)} in onnxruntime but '
                f'{tuple(expected.shape)} in PyTorch')
        diff = float((got - expected).abs().max())
        report['batches'][str(n)] = dict(max_abs_diff=diff)
        worst_diff = max(worst_diff, diff)
        scale = max(scale, float(expected.abs().max()))
    relative = worst_diff / scale if scale > 0 else (
        0.0 if worst_diff == 0 else float('inf'))
    report.update(max_abs_diff=worst_diff, output_scale=scale,
                  relative_diff=relative)
    if not relative <= tolerance:  # also catches NaN
        raise KdzooError(
            f'ONNX export check failed: onnxruntime differs from PyTorch by '
            f'up to {worst_diff:.3g} (relative {relative:.3g} of the output '
            f'scale {scale:.3g}), above the tolerance {tolerance:g}; nothing '
            'was written. Try another --opset.')
    return report


# ------------------------------------------------------------ entry point
def default_output(run_dir: str, checkpoint: str, fmt: str) -> str:
    """``RUN_DIR/export/student_<checkpoint stem>.<fmt>``."""
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return os.path.join(run_dir, 'export', f'student_{stem}.{fmt}')


def export_student(run_dir: str, fmt: str, out: Optional[str] = None,
                   checkpoint: Optional[str] = None,
                   opset: int = DEFAULT_OPSET) -> dict:
    """Export ``run_dir``'s student backbone as ``fmt`` (``pth``/``onnx``).

    Writes ``out`` (default ``RUN_DIR/export/student_<ckpt>.<fmt>``) and
    ``<out>.json``, both atomically, and returns the sidecar's contents
    (with ``file``/``sidecar`` paths added).
    """
    if fmt not in FORMATS:
        raise ConfigError(f'--format: unknown export format {fmt!r}; use one '
                          f'of {list(FORMATS)}.' + did_you_mean(str(fmt),
                                                                FORMATS))
    if fmt == 'onnx' and (isinstance(opset, bool) or not isinstance(
            opset, int) or opset < 7):
        raise ConfigError(f'--opset must be an integer >= 7, got {opset!r}')
    student = load_run_student(run_dir, checkpoint)
    backbone = student['backbone']
    if fmt == 'pth':
        data = _pth_bytes(backbone, student['backbone_cfg'])
        check = None
    else:
        data = _onnx_bytes(backbone, student['input_size'], opset)
        check = check_onnx(data, backbone, student['input_size'])
    out = out or default_output(run_dir, student['checkpoint'], fmt)
    sidecar = dict(
        format=fmt,
        file=os.path.basename(out),
        sha256=hashlib.sha256(data).hexdigest(),
        embedding_size=int(getattr(backbone, 'embedding_size', 0)) or None,
        input_size=student['input_size'],
        input=dict(layout='NCHW (N x 3 x H x W) float32, RGB',
                   normalization='(pixel - mean) / std per channel, '
                   'pixels in 0..255', mean=student['mean'],
                   std=student['std']),
        backbone=student['backbone_cfg'],
        source_run=os.path.abspath(run_dir),
        config=os.path.abspath(student['config']),
        checkpoint=os.path.abspath(student['checkpoint']),
        checkpoint_epoch=student['meta'].get('epoch'),
        checkpoint_iter=student['meta'].get('iter'),
        kdzoo_version=__version__,
        torch_version=torch.__version__)
    if fmt == 'onnx':
        sidecar.update(opset=opset, input_name=ONNX_INPUT,
                       output_name=ONNX_OUTPUT, dynamic_axes=dict(
                           input={'0': 'batch'}, embedding={'0': 'batch'}),
                       onnxruntime_check=check)
    sidecar = json.loads(json.dumps(sidecar, default=_jsonable))
    atomic_write_bytes(out, data)
    atomic_write_json(out + '.json', sidecar)
    return dict(sidecar, path=out, sidecar_path=out + '.json')


def _jsonable(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, 'item'):
        return obj.item()
    return str(obj)


# ------------------------------------------------------------ command line
def register(sub) -> None:
    p = sub.add_parser('export', help="write a run's student backbone as a "
                       '.pth state dict or an .onnx model (+ sidecar JSON)')
    p.add_argument('run_dir', metavar='RUN_DIR',
                   help='work dir of a `kdzoo train` run')
    p.add_argument('--format', required=True, metavar='{pth,onnx}')
    p.add_argument('--checkpoint', help='runner checkpoint or backbone.pth '
                   '(default: the newest complete one in RUN_DIR)')
    p.add_argument('--out', help='output file (default: '
                   'RUN_DIR/export/student_<checkpoint>.<format>)')
    p.add_argument('--opset', type=int, default=17,
                   help='ONNX opset version (onnx only)')
    p.set_defaults(func=run)


def run(args):
    result = export_student(args.run_dir, args.format, out=args.out,
                            checkpoint=args.checkpoint, opset=args.opset)
    check = result.get('onnxruntime_check')
    if check:
        per_batch = ', '.join(f'batch {n}: {v["max_abs_diff"]:.3g}'
                              for n, v in check['batches'].items())
        print(f'onnxruntime vs PyTorch max |diff|: {per_batch} (relative '
              f'{check["relative_diff"]:.3g} of output scale '
              f'{check["output_scale"]:.3g}; tolerance '
              f'{check["tolerance_relative"]:g})')
    print(f'student backbone from {result["checkpoint"]}')
    print(f'exported: {result["path"]}')
    print(f'sidecar: {result["sidecar_path"]}')
