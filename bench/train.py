"""Training speed and memory: stock `skip` against the squeeze generator, and each D regularizer (GGDR,
GLeaD) against none, printing a table.

    python bench/train.py                                   # tiny config on the CPU (a minute or two)
    python bench/train.py --configs=tiny,cifar --steps=6
    python bench/train.py --device=cuda --configs=cifar,paper256 --archs=skip,squeeze-r8
    python bench/train.py --archs=squeeze-r8 --regs=none,ggdr,glead
    python bench/train.py --configs=cifar --archs=skip --steps=4 --setups=system,keep,keep+fastdemod

Regularizers are set up as train.py does (GGDR's feature and GLeaD's G tail at resolution / 4, at least 8;
GLeaD's decoder at 64 or less). GLeaD uses the `mse` reconstruction unless --lpips names the LPIPS weights,
so that the bench needs no download; LPIPS-AlexNet adds its own cost on top.

Every row is a separate process running the real `training_loop` (all four phases with lazy regularization,
ADA with the bgc pipeline, G_ema) on random images for `--steps` steps. The first step (tick 0) carries the
one-time costs (allocator warm-up, kernel builds, cudnn autotuning) and is excluded: sec/kimg is the last
tick's `Timing/sec_per_kimg`, i.e. the remaining steps only. Peak memory is the process's peak resident set
(CPU) or `torch.cuda.max_memory_allocated` (GPU). On a GPU the networks use fp16 in the 4 highest
resolutions, as train.py does; on the CPU everything is fp32. `--setups` times the CPU changes of issue 23 one by
one: `keep` is how train.py runs (each process keeps large freed blocks for reuse, runner/host_memory.py),
`system` is glibc's malloc as it is (as before that change), `+fastdemod` adds train.py --fast-demod.
"""

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
from typing import Dict, List

import click
import numpy as np
import PIL.Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench.archs import default_squeeze_r, parse_arch, syntax  # noqa: E402
from training import regularizers  # noqa: E402
from training.regularizers.term import NetworkFacts  # noqa: E402

# res, z/w dim, mapping layers, channel_base, channel_max, D architecture, mbstd group, batch per device kind.
CONFIGS = {
    'tiny':     dict(res=32,  z_dim=64,  map=2, channel_base=16384, channel_max=64,  d_arch='resnet', mbstd=4,
                     batch=dict(cpu=8, cuda=32)),
    'cifar':    dict(res=32,  z_dim=512, map=2, channel_base=32768, channel_max=512, d_arch='orig',   mbstd=32,
                     batch=dict(cpu=4, cuda=64)),
    'paper256': dict(res=256, z_dim=512, map=8, channel_base=16384, channel_max=512, d_arch='resnet', mbstd=8,
                     batch=dict(cpu=2, cuda=64)),
}


def make_images(root: str, res: int, count: int = 32) -> str:
    rnd = np.random.RandomState(0)
    for i in range(count):
        PIL.Image.fromarray((rnd.rand(res, res, 3) * 255).astype(np.uint8)).save(os.path.join(root, f'{i:04d}.png'))
    return root


REGS = ('none',) + tuple(regularizers.REGULARIZERS)


def regularizer_options(reg: str, res: int, channel_base: int, channel_max: int, w_dim: int,
                        lpips_weights=None) -> tuple:
    """(decoder_kwargs of D, d_terms of the loss) for --reg=`reg`, planned by the regularizer's own declaration
    as train.py plans it (its defaults; GLeaD with mse unless LPIPS weights are given)."""
    if reg == 'none':
        return None, []
    term_class = regularizers.regularizer_class(reg)
    values = {option.name: option.default for option in term_class.options}
    if reg == 'glead':
        values.update(glead_recon='mse' if lpips_weights is None else 'lpips', glead_lpips=lpips_weights)
    plan = term_class.plan(values, NetworkFacts(resolution=res, img_channels=3, w_dim=w_dim,
                                                channel_base=channel_base, channel_max=channel_max))
    return plan.decoder, [dict(class_name=regularizers.REGULARIZERS[reg], **plan.term)]


def options(config: str, arch: str, r, device: str, steps: int, run_dir: str, data: str, batch=None,
            precision: str = 'fp16', reg: str = 'none', lpips_weights=None, fast_demod: bool = False) -> dict:
    cfg = CONFIGS[config]
    batch = batch or cfg['batch']['cuda' if device.startswith('cuda') else 'cpu']
    gpu = device.startswith('cuda')
    num_fp16_res = 4 if gpu and precision != 'fp32' else 0
    synthesis = dict(channel_base=cfg['channel_base'], channel_max=cfg['channel_max'], num_fp16_res=num_fp16_res,
                     conv_clamp=256, architecture=arch)
    precision_kwargs = dict(precision=precision) if precision == 'bf16' else {}
    synthesis.update(precision_kwargs)
    if r is not None:
        synthesis['squeeze_r'] = r
    decoder, terms = regularizer_options(reg, cfg['res'], cfg['channel_base'], cfg['channel_max'], cfg['z_dim'],
                                         lpips_weights)
    decoder_kwargs = dict(decoder_kwargs=decoder) if decoder is not None else {}
    return dict(
        run_dir=run_dir,
        training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=False,
                                 max_size=None, xflip=False, resolution=cfg['res'], random_seed=0),
        data_loader_kwargs=dict(pin_memory=gpu, num_workers=0),
        G_kwargs=dict(class_name='training.networks.Generator', z_dim=cfg['z_dim'], w_dim=cfg['z_dim'],
                      mapping_kwargs=dict(num_layers=cfg['map']), synthesis_kwargs=synthesis),
        D_kwargs=dict(class_name='training.networks.Discriminator', architecture=cfg['d_arch'],
                      channel_base=cfg['channel_base'], channel_max=cfg['channel_max'], num_fp16_res=num_fp16_res,
                      conv_clamp=256, epilogue_kwargs=dict(mbstd_group_size=min(cfg['mbstd'], batch)),
                      **precision_kwargs, **decoder_kwargs),
        G_opt_kwargs=dict(class_name='torch.optim.Adam', lr=0.0025, betas=(0.0, 0.99), eps=1e-8),
        D_opt_kwargs=dict(class_name='torch.optim.Adam', lr=0.0025, betas=(0.0, 0.99), eps=1e-8),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', xflip=1, rotate90=1, xint=1, scale=1, rotate=1,
                            aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1),
        loss_kwargs=dict(class_name='training.loss.StyleGAN2Loss', r1_gamma=1.0, d_terms=terms,
                         **(dict(fast_demod=True) if fast_demod else {})),
        batch_size=batch, batch_gpu=batch, ada_target=0.6, augment_p=0.2,
        total_kimg=steps * batch / 1000, kimg_per_tick=1e9,  # Tick 0 after step 1, then one tick at the end.
        image_snapshot_ticks=None, network_snapshot_ticks=None, image_grid_max=(1, 1), device=device,
    )


def step_flops(state) -> float:
    """FLOPs of one more training step of a finished loop (every phase of a step whose index runs them all, so
    lazy regularization is counted once per its interval), by torch's FLOP counter: matmuls and convolutions of
    the forward and backward passes, including the double backward of R1 and path length. Work inside custom
    CUDA kernels (the FIR filters of upfirdn2d) is not an aten matmul/conv and is not counted."""
    from training import training_loop as loop
    flops = 0.0
    for index, phase in enumerate(state.optim.phases):
        real_img, real_c, gen_z, gen_c = loop._fetch_batch(state)
        with _flop_count_mode() as counter:
            loop._run_phase(state, phase, real_img, real_c, gen_z[index], gen_c[index])
        flops += counter.total / phase.interval  # A lazy phase runs once every `interval` steps.
    return flops


def _flop_count_mode():
    """A dispatch mode that adds up torch.utils.flop_counter's per-op formulas. FlopCounterMode itself tracks
    modules with backward hooks, which torch.autograd.grad (R1, path length) does not support."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            count = flop_registry.get(func._overloadpacket)
            if count is not None:
                self.total += count(*args, **kwargs, out_val=out)
            return out
    return FlopCount()


def run_one(config: str, arch_name: str, device: str, steps: int, batch=None, precision: str = 'fp16',
            reg: str = 'none', lpips_weights=None, fast_demod: bool = False) -> Dict:
    """One row, measured in this process (called in a child process by `main`)."""
    import torch

    from bench.timing import peak_matmul_flops
    from runner import host_memory
    from training.training_loop import training_loop
    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', torch.get_num_threads())))
    # What each process of train.py does first ($STYLEGAN_HOST_MALLOC, from --malloc, decides).
    malloc = 'keep' if host_memory.keep_freed_memory() else 'system'
    setup = malloc + ('+fastdemod' if fast_demod else '')
    arch, r, _torgb = parse_arch(arch_name, ablations=False)  # options() builds the method's own toRGB source.
    if arch == 'squeeze' and r is None:
        r = default_squeeze_r()  # A bare `squeeze` trains train.py's default, and the row names it.
    with tempfile.TemporaryDirectory() as temp:
        data, run_dir = os.path.join(temp, 'data'), os.path.join(temp, 'run')
        os.makedirs(data)
        os.makedirs(run_dir)
        make_images(data, CONFIGS[config]['res'])
        with contextlib.redirect_stdout(io.StringIO()):
            state = training_loop(**options(config, arch, r, device, steps, run_dir, data, batch, precision, reg,
                                            lpips_weights, fast_demod))
        with open(os.path.join(run_dir, 'stats.jsonl')) as f:
            last = json.loads(f.readlines()[-1])
        peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith('cuda')
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        flops = step_flops(state)  # After the peak: counting is not part of training. Needs the data still.
    sec_per_kimg = last['Timing/sec_per_kimg']['mean']
    achieved = flops * (1000 / state.opts.batch_size) / sec_per_kimg
    # The peak of the dtype the heavy blocks use: fp16/bf16 tensor cores on a GPU, fp32 on the CPU.
    peak_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32)
    if not device.startswith('cuda'):
        peak_dtype = torch.float32
    size = 8192 if device.startswith('cuda') else 1024
    peak_flops = peak_matmul_flops(torch.device(device), peak_dtype, size=size, iters=5)
    used = precision if device.startswith('cuda') else 'fp32'  # The CPU computes every block in fp32.
    return dict(config=config, arch=arch, r=r, reg=reg, setup=setup, device=device, precision=used,
                batch=state.opts.batch_size,
                steps=steps, G_params=sum(p.numel() for p in state.nets.G.parameters()), sec_per_kimg=sec_per_kimg,
                peak_mem_gb=peak, step_tflop=flops / 1e12, achieved_tflops=achieved / 1e12,
                peak_tflops=peak_flops / 1e12, mfu=achieved / peak_flops)


def _child_row(config, arch_name, precision, reg, device, steps, batch, lpips_weights, malloc, fast_demod) -> Dict:
    """One row, measured in a fresh process (its peak memory is its own)."""
    what = f'{config} {arch_name} {precision} reg={reg}'
    print(f'{what}: training {steps} steps on {device}...', file=sys.stderr, flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), f'--child={config}:{arch_name}:{precision}:{reg}',
           f'--device={device}', f'--steps={steps}'] + ([f'--batch={batch}'] if batch else [])
    cmd += [f'--lpips={lpips_weights}'] if lpips_weights else []
    cmd += ['--fast-demod'] if fast_demod else []
    env = dict(os.environ, STYLEGAN_HOST_MALLOC=malloc)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith('BENCH-ROW ')]
    if out.returncode != 0 or not lines:
        raise click.ClickException(f'{what} failed:\n{out.stderr[-3000:]}')
    return json.loads(lines[-1][len('BENCH-ROW '):])


def print_table(rows: List[Dict]) -> None:
    header = ['config', 'arch', 'r', 'reg', 'setup', 'device', 'precision', 'batch', 'steps', 'G params', 'sec/kimg',
              'x skip', 'x none', 'peak mem GB', 'TFLOP/step', 'TFLOP/s', 'peak TFLOP/s', 'MFU']
    # 'x skip': against the skip row of the same regularizer; 'x none': against the same arch without one.
    skip = {(row['config'], row['precision'], row['reg'], row['setup']): row['sec_per_kimg'] for row in rows
            if row['arch'] == 'skip'}
    none = {(row['config'], row['precision'], row['arch'], row['r'], row['setup']): row['sec_per_kimg'] for row in rows
            if row['reg'] == 'none'}
    table = [header]
    for row in rows:
        vs_skip = row['sec_per_kimg'] / skip.get((row['config'], row['precision'], row['reg'], row['setup']),
                                                 float('nan'))
        vs_none = row['sec_per_kimg'] / none.get((row['config'], row['precision'], row['arch'], row['r'],
                                                  row['setup']), float('nan'))
        table.append([row['config'], row['arch'], '-' if row['r'] is None else str(row['r']), row['reg'], row['setup'],
                      row['device'], row['precision'], str(row['batch']), str(row['steps']), f'{row["G_params"]:,}',
                      f'{row["sec_per_kimg"]:.1f}', f'{vs_skip:.3f}', f'{vs_none:.3f}', f'{row["peak_mem_gb"]:.2f}',
                      f'{row["step_tflop"]:.4f}', f'{row["achieved_tflops"]:.3f}', f'{row["peak_tflops"]:.2f}',
                      f'{row["mfu"]:.1%}'])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print('  '.join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print('  '.join('-' * w for w in widths))


def _parse_setup(setup: str):
    """'keep', 'system', 'keep+fastdemod', ... -> (malloc, fast_demod)."""
    malloc, _, extra = setup.partition('+')
    if malloc not in ('keep', 'system') or extra not in ('', 'fastdemod'):
        raise click.BadParameter(f'{setup!r}; use keep or system, optionally with +fastdemod', param_hint='--setups')
    return malloc, extra == 'fastdemod'


@click.command()
@click.option('--configs', default='tiny', show_default=True, help='Comma list of: ' + ', '.join(CONFIGS))
@click.option('--archs', default='skip,squeeze-r8', show_default=True, help=f'Comma list of: {syntax(ablations=False)}')
@click.option('--device', default=None, help='cpu or cuda  [default: cuda if available]')
@click.option('--steps', type=click.IntRange(min=2), default=6, show_default=True, help='Training steps per row')
@click.option('--batch', type=click.IntRange(min=1), default=None, help='Batch  [default: per config and device]')
@click.option('--precisions', default='fp16', show_default=True, help='Comma list of fp16, bf16, fp32 (the 4 highest '
              'resolutions on a GPU; the CPU computes fp32 whatever is asked)')
@click.option('--regs', default='none', show_default=True, help='Comma list of D regularizers: ' + ', '.join(REGS))
@click.option('--lpips', 'lpips_weights', default=None, help='LPIPS weights for GLeaD rows (train.py --glead-lpips '
              'syntax)  [default: GLeaD with mse]')
@click.option('--setups', default='keep', show_default=True, help='Comma list of: keep (as train.py runs), system '
              '(glibc\'s malloc as it is: freed large blocks go back to the OS), each optionally +fastdemod '
              '(train.py --fast-demod)')
@click.option('--fast-demod', is_flag=True, hidden=True)  # A child's half of its setup.
@click.option('--json', 'json_path', default=None, help='Also write the rows to this JSON file')
@click.option('--child', hidden=True, default=None)
def main(configs, archs, device, steps, batch, precisions, regs, lpips_weights, setups, fast_demod, json_path,
         child):
    """Measure sec/kimg, peak memory and MFU of real training steps: stock vs squeeze, each regularizer vs none."""
    if child is not None:  # Child process: one row, printed as JSON.
        config, arch_name, precision, reg = child.split(':')
        row = run_one(config, arch_name, device, steps, batch, precision, reg, lpips_weights, fast_demod)
        print('BENCH-ROW ' + json.dumps(row))
        return
    unknown = [reg for reg in regs.split(',') if reg not in REGS]
    if unknown:
        raise click.BadParameter(f'{unknown[0]!r}; valid choices: {", ".join(REGS)}', param_hint='--regs')
    try:
        for arch_name in archs.split(','):
            parse_arch(arch_name, ablations=False)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--archs') from None
    setups = [_parse_setup(setup) for setup in setups.split(',')]
    import torch
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    rows = []
    for config in configs.split(','):
        for precision in precisions.split(','):
            for arch_name in archs.split(','):
                for reg in regs.split(','):
                    for malloc, fast in setups:
                        rows.append(_child_row(config, arch_name, precision, reg, device, steps, batch, lpips_weights,
                                               malloc, fast))
    print_table(rows)
    print(f'sec/kimg excludes the first step; {os.cpu_count()} CPUs; torch {torch.__version__}. MFU: FLOPs of one '
          f'step (torch FLOP counter) x steps per second / the peak of a large matmul measured in the same process.')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
