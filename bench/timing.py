"""Timing and table helpers shared by the benchmark scripts."""

import statistics
import time
from typing import Callable, List, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times measure the work and not only its launch."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of `fn()` over `iters` timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, iters: int = 10) -> float:
    """Dense peak of this device in FLOP/s, measured: the median time of a large square matmul (2 n^3 FLOPs).
    The denominator of MFU, measured in the same run rather than taken from a data sheet."""
    device = torch.device(device)
    a = torch.randn([size, size], device=device, dtype=dtype)
    b = torch.randn([size, size], device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, iters=iters, warmup=2)
    return 2 * size ** 3 / seconds


def text_table(rows: List[Sequence[str]]) -> str:
    """Rows of strings (the first is the header) as aligned columns with a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append('  '.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append('  '.join('-' * width for width in widths))
    return '\n'.join(lines)
