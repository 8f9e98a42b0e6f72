"""Time the ADA augmentation pipeline, printing a table of images per second.

    python bench/augment.py                                 # bgc at 32 and 256 px, batch 8, on the CPU
    python bench/augment.py --presets=blit,bgc,bgcfnc --res=64 --mode=both
    python bench/augment.py --device=cuda --batch=64 --res=256,1024

Two passes can be timed per row:

* fwd: `pipe(images)` under no_grad (the augmentation of fakes and reals in the discriminator phases);
* r1:  `pipe(images)` with images that require grad, the gradient of the sum of squares of the result with
       create_graph=True, and the backward pass of that gradient's squared norm: the shape of R1 on augmented
       reals, without a discriminator.

Each time is the median over the timed iterations of one batch after warm-up, at augmentation probability
`--p` (every transform of the preset fires with that probability per sample).
"""

import os
import platform
import sys
from typing import Dict, List, Sequence

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import median_seconds  # noqa: E402
from training import augment  # noqa: E402

# ----------------------------------------------------------------------------




def run_benchmark(presets: Sequence[str], resolutions: Sequence[int], batch: int = 8, p: float = 0.6,
                  device: str = 'cpu', iters: int = 3, warmup: int = 1, mode: str = 'fwd',
                  threads: int = 0, seed: int = 0) -> List[Dict]:
    """One row per (preset, resolution): {preset, res, batch, fwd_ips, r1_ips} (None for a pass not run)."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device)
    rows = []
    for preset in presets:
        pipe = augment.augment_pipe_from_preset(preset).to(device)
        pipe.p.copy_(torch.as_tensor(p))
        for res in resolutions:
            torch.manual_seed(seed)
            images = torch.randn([batch, 3, res, res], device=device)
            row = dict(preset=preset, res=res, batch=batch, fwd_ips=None, r1_ips=None)
            if mode in ('fwd', 'both'):
                with torch.no_grad():
                    seconds = median_seconds(lambda: pipe(images), device, iters, warmup)  # noqa: B023
                row['fwd_ips'] = batch / seconds
            if mode in ('r1', 'both'):
                seconds = median_seconds(lambda: _r1_pass(pipe, images), device, iters, warmup)  # noqa: B023
                row['r1_ips'] = batch / seconds
            rows.append(row)
    return rows


def _r1_pass(pipe: torch.nn.Module, images: torch.Tensor) -> None:
    x = images.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(pipe(x).square().sum(), [x], create_graph=True)
    grad.square().sum().backward()


def format_table(rows: Sequence[Dict]) -> str:
    def cell(value):
        return '-' if value is None else f'{value:.1f}'
    lines = [f'{"preset":<8} {"res":>5} {"batch":>5} {"fwd img/s":>10} {"r1 img/s":>10}']
    for row in rows:
        lines.append(f'{row["preset"]:<8} {row["res"]:>5} {row["batch"]:>5} {cell(row["fwd_ips"]):>10} '
                     f'{cell(row["r1_ips"]):>10}')
    return '\n'.join(lines)

# ----------------------------------------------------------------------------


def _parse_list(value: str, convert) -> List:
    return [convert(item) for item in value.split(',') if item.strip()]


@click.command()
@click.option('--presets', default='bgc', show_default=True, help='Comma-separated augment presets.')
@click.option('--res', 'resolutions', default='32,256', show_default=True, help='Comma-separated image sizes.')
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--p', type=click.FloatRange(0, 1), default=0.6, show_default=True, help='Augmentation probability.')
@click.option('--device', default='cpu', show_default=True)
@click.option('--iters', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--warmup', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--mode', type=click.Choice(['fwd', 'r1', 'both']), default='fwd', show_default=True)
@click.option('--threads', type=click.IntRange(min=0), default=0, show_default=True, help='0: torch default.')
def main(presets, resolutions, batch, p, device, iters, warmup, mode, threads):
    """Images per second of the augmentation pipeline."""
    presets = _parse_list(presets, str)
    unknown = [name for name in presets if name not in augment.AUGPIPE_SPECS]
    if unknown:
        raise click.BadParameter(f'unknown preset(s) {", ".join(unknown)}; valid: {", ".join(augment.AUGPIPE_SPECS)}',
                                 param_hint='--presets')
    rows = run_benchmark(presets, _parse_list(resolutions, int), batch=batch, p=p, device=device, iters=iters,
                         warmup=warmup, mode=mode, threads=threads)
    print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, '
          f'{torch.get_num_threads()} threads, p={p}')
    print(format_table(rows))


if __name__ == '__main__':
    main()
