"""Wall-clock timing that waits for the GPU when there is one."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds ``fn`` takes, synchronising CUDA before and after."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
