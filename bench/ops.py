"""Time the custom ops: reference path vs CUDA kernel, forward and forward+backward, printing a table.

    python bench/ops.py                      # GPU: every op, fp16 and fp32, StyleGAN2-sized shapes
    python bench/ops.py --ops=upfirdn2d --dtypes=fp32 --iters=50
    python bench/ops.py --device=cpu --batch=2 --dtypes=fp32    # reference only, small batch

The kernel column is `-` where no kernel can run (CPU). A speedup below 1.0 is marked with `!`.
"""

import os
import sys
import time
from typing import Callable, List

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.ops import bias_act, conv2d_resample, dispatch, upfirdn2d  # noqa: E402

# (channels, resolution) pairs of a StyleGAN2 generator/discriminator at 256x256.
SHAPES = [(512, 8), (512, 16), (512, 32), (128, 128), (64, 256)]

# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters * 1e3


def _make_cases(batch: int, device: torch.device, dtype: torch.dtype) -> List[tuple]:
    """(op name, shape text, make_inputs, run) for every benchmarked call; run(inputs) returns the output."""
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
    cases = []
    for channels, res in SHAPES:
        shape = [batch, channels, res, res]
        text = f'{batch}x{channels}x{res}x{res}'

        def inputs(shape=shape, channels=channels):
            x = torch.randn(shape, device=device, dtype=dtype)
            b = torch.randn([channels], device=device, dtype=dtype)
            return x, b
        cases.append(('bias_act lrelu', text, inputs,
                      lambda xb: bias_act.bias_act(xb[0], xb[1], act='lrelu', clamp=256)))
        cases.append(('upsample2d', text, inputs, lambda xb: upfirdn2d.upsample2d(xb[0], f)))
        cases.append(('downsample2d', text, inputs, lambda xb: upfirdn2d.downsample2d(xb[0], f)))
        cases.append(('filter2d', text, inputs, lambda xb: upfirdn2d.filter2d(xb[0], f)))

        if res <= 128:  # The up/down convolutions of one block: input at half/full resolution.
            def conv_inputs(shape=shape, channels=channels):
                x = torch.randn(shape, device=device, dtype=dtype)
                w = torch.randn([channels, channels, 3, 3], device=device, dtype=dtype) / (channels * 9) ** 0.5
                return x, w
            cases.append(('conv2d_resample up2', text, conv_inputs,
                          lambda xw: conv2d_resample.conv2d_resample(xw[0], xw[1], f=f, up=2, padding=1,
                                                                     flip_weight=False)))
            cases.append(('conv2d_resample down2', text, conv_inputs,
                          lambda xw: conv2d_resample.conv2d_resample(xw[0], xw[1], f=f, down=2, padding=1)))
    return cases


def _measure(run, make_inputs, policy: str, backward: bool, device, iters, warmup) -> float:
    inputs = [t.requires_grad_(backward) for t in make_inputs()]

    def step():
        with dispatch.use_impl(policy):
            if backward:
                out = run(inputs)
                grads = torch.autograd.grad(out, [inputs[0]], grad_outputs=torch.ones_like(out))
                del grads
            else:
                with torch.no_grad():
                    run(inputs)
    return _time_ms(step, device, iters, warmup)


@click.command()
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--dtypes', default='fp16,fp32', show_default=True, help='Comma-separated: fp16, fp32.')
@click.option('--ops', 'op_filter', default='', help='Only ops whose name contains one of these (comma-separated).')
@click.option('--iters', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--warmup', type=click.IntRange(min=0), default=3, show_default=True)
def main(device, batch, dtypes, op_filter, iters, warmup):
    """Benchmark reference vs CUDA kernel for every custom op and print one table."""
    device = torch.device(device)
    use_kernel = device.type == 'cuda'
    dtype_map = {'fp16': torch.float16, 'fp32': torch.float32}
    rows = [('op', 'shape', 'dtype', 'pass', 'ref ms', 'cuda ms', 'speedup')]
    slower = 0
    for dtype_name in [d.strip() for d in dtypes.split(',') if d.strip()]:
        if dtype_name not in dtype_map:
            raise click.BadParameter(f'unknown dtype {dtype_name!r}; use fp16 or fp32', param_hint='--dtypes')
        dtype = dtype_map[dtype_name]
        if dtype == torch.float16 and device.type == 'cpu':
            continue  # fp16 convolutions on CPU are not what anyone runs.
        for name, shape, make_inputs, run in _make_cases(batch, device, dtype):
            if op_filter and not any(key in name for key in op_filter.split(',')):
                continue
            for backward in (False, True):
                ref = _measure(run, make_inputs, 'ref', backward, device, iters, warmup)
                cuda = _measure(run, make_inputs, 'cuda', backward, device, iters, warmup) if use_kernel else None
                speedup = '-' if cuda is None else f'{ref / cuda:.2f}' + ('!' if cuda > ref else '')
                slower += int(cuda is not None and cuda > ref)
                rows.append((name, shape, dtype_name, 'fwd+bwd' if backward else 'fwd', f'{ref:.3f}',
                             '-' if cuda is None else f'{cuda:.3f}', speedup))
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print('  '.join('-' * width for width in widths))
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f'\n{gpu}, torch {torch.__version__}, {iters} iterations after {warmup} warm-up.')
    if use_kernel:
        print(f'Kernel slower than reference in {slower} of {len(rows) - 1} rows.')


if __name__ == '__main__':
    main()
