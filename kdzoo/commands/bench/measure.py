"""Timing and peak memory for ``kdzoo bench``."""
import gc
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch



# ------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory of one setting: CUDA allocator peak, or on CPU the
    process's peak RSS (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == 'cuda'
        self.resettable_rss = False
        if self.cuda:
            self.method = 'torch.cuda.max_memory_allocated, reset per setting'
        elif self._clear_peak_rss():
            self.resettable_rss = True
            self.method = ('peak RSS of the process (VmHWM), reset per '
                           'setting via /proc/self/clear_refs; loader '
                           'workers not included')
        else:
            self.method = ('peak RSS since the process started '
                           '(resource.getrusage ru_maxrss; not reset per '
                           'setting); loader workers not included')

    @staticmethod
    def _clear_peak_rss() -> bool:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # 5 resets the peak RSS (Linux >= 4.0)
            return PeakMemory._vm_hwm_kib() is not None
        except OSError:
            return False

    @staticmethod
    def _vm_hwm_kib() -> Optional[int]:
        try:
            with open('/proc/self/status') as f:
                for line in f:
                    if line.startswith('VmHWM:'):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable_rss:
            self._clear_peak_rss()

    def peak_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        kib = self._vm_hwm_kib() if self.resettable_rss else None
        if kib is None:
            import resource
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_steps(step: Callable[[], object], warmup: int, steps: int,
               sync: Callable[[], None]) -> Tuple[List[float], object]:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``;
    return each timed call's seconds (synchronised) and the last output."""
    out = None
    for _ in range(warmup):
        out = step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - start)
    return times, out


def _timing(times: Sequence[float], batch_size: int) -> dict:
    mean = sum(times) / len(times)
    median = statistics.median(times)
    return dict(ms_per_step_mean=round(mean * 1e3, 3),
                ms_per_step_median=round(median * 1e3, 3),
                images_per_s=round(batch_size / mean, 2),
                images_per_s_median=round(batch_size / median, 2))
