"""Wall-clock timing that waits for the GPU when there is one."""

from __future__ import annotations

import time
from typing import Callable

import torch


_CLOCK = {"cpu_time": False}


def use_cpu_time() -> None:
    """Time the CPU time of the calling thread, with one torch thread, instead of wall-clock time (CPU runs
    only). On a shared machine the other processes' load then barely moves the numbers: under a load
    of 6-9 on 2 cores, wall-clock medians of the same code path were 10-25% apart in one run."""
    _CLOCK["cpu_time"] = True
    torch.set_num_threads(1)


def clock_name() -> str:
    return "CPU time of one thread" if _CLOCK["cpu_time"] else "wall clock"


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn`` takes, synchronising CUDA before and after (CPU: its thread's CPU time instead of
    wall-clock time after :func:`use_cpu_time`)."""
    cuda = str(device).startswith("cuda")
    clock = time.thread_time if _CLOCK["cpu_time"] and not cuda else time.perf_counter
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return clock() - start


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak on a GPU; on the CPU, the peak of the
    process RSS (sampled every 2 ms) above its level on entry. ``peak`` in bytes."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import threading

        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        self._base = self._top = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self._top = max(self._top, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(0, self._top - self._base)
