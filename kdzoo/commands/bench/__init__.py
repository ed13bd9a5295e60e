"""``kdzoo bench``: training speed of the distiller against a plain loop.

Five settings train the same student (same initial weights), teachers,
precision and batch for ``warmup + steps`` steps:

``student_alone``
    ``FaceDistiller`` with the student and a CosFace head, no teacher.
``one_teacher_online``
    + one frozen teacher; ``AngularDistillationLoss`` on the embeddings,
    the student's through a ``LinearProjector``.
``two_teachers_online``
    + a second teacher (LIAAD's two-teacher setting: two embedding losses).
``two_teachers_cached``
    the same two teachers served from a ``TeacherOutputCache``, built once
    before timing by ``TeacherCacheHook`` (its time is reported apart).
``plain_pytorch``
    a loop written here in plain PyTorch: the same backbone, an inline
    CosFace head, SGD. The reference for framework overhead.

The kdzoo settings step exactly as a kdzoo run does: ``model.train_step``
(data preprocessor, ``FaceDistiller.loss``, ``parse_losses``,
``optim_wrapper.update_params``) with the optimizer wrapper that
``TrainableOptimWrapperConstructor`` builds from the recipes' schedule
(SGD lr 0.1, momentum 0.9, weight decay 5e-4, ``clip_grad`` max_norm 5;
``GuardedAmpOptimWrapper`` for bf16/fp16). The runner's hooks (logging,
checkpoints, progress bar) are not run. The plain loop does the same
arithmetic: the same SGD and clipping, autocast, a GradScaler under AMP
(as mmengine's AmpOptimWrapper, for bf16 too).

Data modes: ``synthetic`` is one pre-made uint8 batch on the device (half
of it mirrored), so the model is measured, not the input; ``loader`` reads
SynthFaceAge (rendered once into its cache) or an ``ImageFolderFaces``
folder (``data_root``, JPEG decoding) through a ``DataLoader`` with
``num_workers`` workers, and the input pipeline's images/s alone are
measured too.

Timing: warm-up steps are not timed; on GPU every timed step ends with
``torch.cuda.synchronize``. images/s = batch / mean step time (the timed
steps' total time / steps); the median step is reported too. Peak memory:
``torch.cuda.max_memory_allocated`` (reset per setting) on GPU; on CPU the
process's peak resident set size (``VmHWM``, reset per setting through
``/proc/self/clear_refs``, else ``resource.getrusage`` ``ru_maxrss``, the
peak since the process started; loader workers are not included).

The parts: ``config`` (settings, presets, options), ``data`` (the synthetic
batch and the loaders), ``plain`` (the reference loop), ``measure``
(timing, peak memory), ``session`` (building and timing the settings),
``report`` (the table).

Expected slowdown from FLOPs (``kdzoo.commands.flops``, backbones only):
training the student costs about 3 forward passes (forward + backward),
a frozen online teacher one forward, so ``(3·S + ΣT) / (3·S)``.
"""


from kdzoo.utils import json_option
from .config import PRESETS, SETTINGS, BenchConfig, make_config
from .plain import PlainLoop, cosface_loss
from .report import print_report
from .session import BenchSession, run_bench

__all__ = ['SETTINGS', 'PRESETS', 'BenchConfig', 'make_config',
           'BenchSession', 'PlainLoop', 'cosface_loss', 'run_bench',
           'print_report', 'add_bench_arguments', 'run_cli', 'register']


# ------------------------------------------------------------ CLI
def add_bench_arguments(parser) -> None:
    """The ``kdzoo bench`` options (defaults resolved by make_config)."""
    p = parser
    p.add_argument('--device', help="cpu, cuda or cuda:N (default: cuda "
                   'when available)')
    p.add_argument('--precision', help='fp32, bf16 or fp16 (default: bf16 '
                   'on GPUs that support it, else fp16; fp32 on CPU)')
    p.add_argument('--channels-last', action='store_true',
                   help='channels-last input batches')
    p.add_argument('--batch-size', type=int,
                   help='default 256 on GPU, 32 on CPU')
    p.add_argument('--steps', type=int,
                   help='timed steps per setting (default 50 GPU, 10 CPU)')
    p.add_argument('--warmup', type=int,
                   help='untimed steps first (default 10 GPU, 2 CPU)')
    p.add_argument('--image-size', type=int,
                   help="square input side, a multiple of 16 (preset's: "
                   '112, cpu-small 64)')
    p.add_argument('--preset', default='default',
                   help='default: MobileFaceNet student, IResNet-50 and '
                   'IResNet-100 teachers, 112 px; cpu-small: MobileFaceNet '
                   'width 0.5, IResNet-18/34 width 0.25, 64 px')
    p.add_argument('--student', metavar='JSON',
                   help='student backbone config, e.g. \'{"type": '
                   '"MobileFaceNet"}\'')
    p.add_argument('--teacher', metavar='JSON', action='append',
                   help='teacher backbone config; give it twice')
    p.add_argument('--num-classes', type=int, default=1000,
                   help='identities of the margin head (default 1000)')
    p.add_argument('--settings', default=','.join(SETTINGS),
                   help='comma list (default: all): ' + ', '.join(SETTINGS))
    p.add_argument('--data', default='synthetic',
                   help='synthetic (default), loader or both')
    p.add_argument('--data-root', help='loader mode: ImageFolderFaces folder '
                   '(<root>/<identity>/<image>.jpg) instead of SynthFaceAge')
    p.add_argument('--num-workers', type=int,
                   help='loader mode: DataLoader workers (default min(4, '
                   'CPU cores))')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the student and online teachers')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='work_dirs/bench/train_speed.json',
                   help='JSON results (written atomically)')


def run_cli(args) -> dict:
    """``kdzoo bench``: measure, print the tables, write the JSON."""
    teachers = None
    if args.teacher is not None:
        teachers = [json_option('--teacher', t) for t in args.teacher]
    cfg = make_config(
        device=args.device, precision=args.precision,
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        image_size=args.image_size,
        student=json_option('--student', args.student), teachers=teachers,
        preset=args.preset, settings=args.settings, data=args.data,
        num_workers=args.num_workers, num_classes=args.num_classes,
        channels_last=args.channels_last, compile=args.compile,
        data_root=args.data_root, seed=args.seed)
    record = run_bench(cfg, out=args.out)
    print_report(record)
    print(f'json: {args.out}')
    return record


def register(sub) -> None:
    p = sub.add_parser('bench', help='training speed: student alone, with '
                       'one/two online teachers, two cached teachers, and a '
                       'plain PyTorch loop (images/s, ms/step, memory)')
    add_bench_arguments(p)
    p.set_defaults(func=run_cli)
