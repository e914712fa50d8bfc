"""Timing shared by the benchmarks (run as scripts from this folder, so `from timing import ...` works)."""

from __future__ import annotations

import torch


def cuda_seconds(fn, reps: int) -> float:
    """Seconds per call of fn() on the GPU, from CUDA events around `reps` calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps
