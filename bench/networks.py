"""Time and count the generator: stock `skip` against the image squeeze block, printing a table.

    python bench/networks.py                                # cifar and paper256; small batches on a CPU
    python bench/networks.py --configs=tiny --iters=1       # seconds, for a smoke test
    python bench/networks.py --configs=paper256 --archs=skip,squeeze --squeeze-r=8 --mode=train
    python bench/networks.py --device=cuda --batch=32 --json=out/bench-networks.json

Two passes are timed per row:

* fwd:   G(z, c, noise_mode='const') in eval mode under no_grad (what generate.py and the metrics run);
* train: G(z, c) -> D -> softplus(-logits).mean() backward, then D(reals) -> softplus(-logits).mean()
         backward, both networks in train mode (the non-saturating loss of the Gmain and Dreal phases;
         no regularization, no optimizer step).

Each time is the median over the timed iterations of one batch, after warm-up. Multiply-adds (MACs) are
counted once per generator for one image in eval mode (fp32, on the meta device, which has shapes but does
no arithmetic; on the CPU if that fails):

* measured: `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions only; MACs = FLOPs / 2).
  This is the work the implementation does: an upsampling 3x3 convolution runs as a stride-2 transposed
  convolution on the low-resolution input (a quarter of the naive count) followed by the 4x4 FIR filter.
* nominal: from the weight shapes, every k x k convolution from c_in to c_out costs k^2 * c_in * c_out per
  *output* pixel, plus the affine and mapping layers (one multiply-add per weight). In this convention a
  squeeze block with c_in = c costs (11 + 18/r) c^2 per pixel against the stock block's 18 c^2 (plus toRGB):
  13.25 c^2 at r=8, about 26% fewer. The measured count of the same blocks drops by more, because the
  upsampling conv0 that both share is four times cheaper there.

Ratios compare each row with the `skip` row of the same configuration. The second table gives the MACs of
every synthesis block (measured / nominal, in millions).
"""

import contextlib
import copy
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.archs import parse_arch, syntax  # noqa: E402
from bench.timing import median_seconds, synchronize, text_table  # noqa: E402
from runner import host_memory  # noqa: E402
from torch_utils import compiler  # noqa: E402
from torch_utils.ops import conv2d_gradfix  # noqa: E402
from training import networks  # noqa: E402

# ----------------------------------------------------------------------------
# Configurations (the train.py presets of the same name, unconditional) and per-device run lengths.

CONFIGS = {
    # res: image size; z_dim: also w_dim; map: mapping layers; mbstd: D's minibatch-std group; fp16_res and
    # clamp: num_fp16_res and conv_clamp of both networks on a GPU (train.py --fp32 turns both off).
    'tiny':     dict(res=32,  z_dim=64,  map=2, channel_base=16384, channel_max=64,  d_arch='resnet', mbstd=4,  fp16_res=4, clamp=256),
    'cifar':    dict(res=32,  z_dim=512, map=2, channel_base=32768, channel_max=512, d_arch='orig',   mbstd=32, fp16_res=4, clamp=256),
    'paper256': dict(res=256, z_dim=512, map=8, channel_base=16384, channel_max=512, d_arch='resnet', mbstd=8,  fp16_res=4, clamp=256),
}

# (batch, timed iterations, warm-up iterations) when not given on the command line. The CPU lengths keep
# `python bench/networks.py` (cifar + paper256, four generators each) to a few minutes on two cores.
DEFAULT_RUN = {
    'cpu':  {'tiny': (4, 3, 1), 'cifar': (4, 3, 1), 'paper256': (1, 2, 1)},
    'cuda': {'tiny': (32, 20, 5), 'cifar': (64, 20, 5), 'paper256': (32, 20, 5)},
}

# Parameter counts of SPEC.md §1 (unconditional generators), checked as a side effect of every run.
SPEC_PARAMS = {
    ('paper256', 'skip', None): 24767458,
    ('paper256', 'squeeze', 4): 24240457,
    ('paper256', 'squeeze', 8): 21788217,
    ('paper256', 'squeeze', 16): 20562097,
    ('cifar', 'skip', None): 19947539,
    ('cifar', 'squeeze', 8): 15552084,
}
SPEC_D_PARAMS = {'paper256': 24001089, 'cifar': 20720641}

# ----------------------------------------------------------------------------
# Building the networks.


def parse_archs(archs: Sequence[str], squeeze_rs: Sequence[int]) -> List[Tuple[str, Optional[int]]]:
    """['skip', 'squeeze', 'squeeze-r8'] with rs [4, 8] -> [('skip', None), ('squeeze', 4), ('squeeze', 8)].

    Names as bench/archs.py reads them; a bare `squeeze` expands over every r. Duplicates are dropped.
    """
    specs = []
    for name in archs:
        name = name.strip()
        if not name:
            continue
        arch = parse_arch(name, ablations=False)  # build_networks makes the method's own toRGB source.
        if arch.arch == 'squeeze' and arch.r is None:
            specs.extend(('squeeze', r) for r in squeeze_rs)
        else:
            specs.append((arch.arch, arch.r))
    unique = []
    for spec in specs:
        if spec not in unique:
            unique.append(spec)
    return unique


def build_networks(config: str, arch: str, squeeze_r: Optional[int], fp16: bool = False,
                   channels_last: bool = False, bf16: bool = False) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Generator and discriminator of one configuration, on the CPU, with a fixed seed.

    `fp16=False` is `train.py --fp32`: no fp16 layers and no clamping. `channels_last` is `--nhwc` (it only
    affects fp16 layers, as in the official code). `bf16` makes those layers bfloat16 (`train.py --precision=bf16`).
    """
    cfg = CONFIGS[config]
    synthesis_kwargs = dict(channel_base=cfg['channel_base'], channel_max=cfg['channel_max'],
                            num_fp16_res=cfg['fp16_res'] if fp16 else 0,
                            conv_clamp=cfg['clamp'] if fp16 else None, architecture=arch)
    if arch == 'squeeze':
        synthesis_kwargs['squeeze_r'] = squeeze_r
    precision = dict(precision='bf16') if fp16 and bf16 else {}
    synthesis_kwargs.update(precision)
    d_block_kwargs = {}
    if channels_last:
        synthesis_kwargs['fp16_channels_last'] = True
        d_block_kwargs['fp16_channels_last'] = True
    torch.manual_seed(0)
    G = networks.Generator(z_dim=cfg['z_dim'], c_dim=0, w_dim=cfg['z_dim'], img_resolution=cfg['res'],
                           img_channels=3, mapping_kwargs=dict(num_layers=cfg['map']),
                           synthesis_kwargs=synthesis_kwargs)
    D = networks.Discriminator(c_dim=0, img_resolution=cfg['res'], img_channels=3, architecture=cfg['d_arch'],
                               channel_base=cfg['channel_base'], channel_max=cfg['channel_max'],
                               num_fp16_res=cfg['fp16_res'] if fp16 else 0,
                               conv_clamp=cfg['clamp'] if fp16 else None, block_kwargs=d_block_kwargs,
                               mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=cfg['mbstd']), **precision)
    return G, D


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

# ----------------------------------------------------------------------------
# Counting multiply-adds.


def _block_resolution(name: str) -> Optional[int]:
    """'b64' -> 64; None for anything that is not a synthesis block name."""
    return int(name[1:]) if name.startswith('b') and name[1:].isdigit() else None


def nominal_macs(G: torch.nn.Module) -> Tuple[int, Dict[str, int]]:
    """Multiply-adds of one image from the weight shapes (paper convention; see the module docstring).

    Returns (total, {block name: MACs}). A 4-D weight in block `bR` costs R^2 * numel (all of a block's
    convolutions, the upsampling one included, write R x R outputs); a 2-D weight (affine, mapping) costs numel.
    """
    per_block = {}
    for name, block in G.synthesis.named_children():
        res = _block_resolution(name)
        if res is None:
            continue
        per_block[name] = sum(p.numel() * (res * res if p.ndim == 4 else 1)
                              for pname, p in block.named_parameters() if pname.endswith('weight') and p.ndim in (2, 4))
    mapping = sum(p.numel() for pname, p in G.mapping.named_parameters() if pname.endswith('weight') and p.ndim == 2)
    return mapping + sum(per_block.values()), per_block


def measured_macs(G: torch.nn.Module, device: str = 'meta') -> Tuple[int, Dict[str, int]]:
    """Multiply-adds of one eval-mode forward pass of one image, counted by FlopCounterMode.

    The count depends on shapes only, so by default it runs on a copy of G on the `meta` device, where no
    arithmetic happens (a paper256 generator takes a fraction of a second instead of seconds of CPU work).
    `device='cpu'` counts a CPU copy instead. Returns (total, {block name: MACs}); raises whatever the forward
    pass or FlopCounterMode raises (the caller falls back).
    """
    from torch.utils.flop_counter import FlopCounterMode

    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    z = torch.randn([1, G.z_dim], device=device)
    c = torch.zeros([1, G.c_dim], device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G(z, c, noise_mode='const', force_fp32=True)
    counts = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    per_block = {}
    for name, _block in G.synthesis.named_children():
        if _block_resolution(name) is None:
            continue
        # Keys are dotted module paths below the root's class name, e.g. 'Generator.synthesis.b8'.
        keys = [key for key in counts if key.endswith(f'.synthesis.{name}')]
        per_block[name] = counts[keys[0]] // 2 if keys else 0
    return counter.get_total_flops() // 2, per_block


def count_macs(G: torch.nn.Module) -> dict:
    """Nominal and measured counts of one generator (left unchanged).

    The measured count runs on the meta device, then on the CPU if that fails (a network that looks at tensor
    values); if FlopCounterMode fails there too, `measured` is None and `count_error` says why.
    """
    nominal, nominal_blocks = nominal_macs(G)
    measured, measured_blocks, counted_on, errors = None, {}, None, []
    for device in ('meta', 'cpu'):
        try:
            measured, measured_blocks = measured_macs(G, device)
            counted_on = device
            break
        except Exception as exc:  # Custom ops may not run on meta or under FlopCounterMode; try the next way.
            errors.append(f'{device}: {type(exc).__name__}: {exc}')
    return dict(measured=measured, nominal=nominal, measured_blocks=measured_blocks, nominal_blocks=nominal_blocks,
                counted_on=counted_on, count_error='; '.join(errors) or None)

# ----------------------------------------------------------------------------
# Timing.




@contextlib.contextmanager
def _training_flags(device: torch.device) -> Iterator[None]:
    """The global switches the training loop sets (gradfix convolutions, cuDNN autotuning, no TF32), restored."""
    saved = (conv2d_gradfix.enabled, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    conv2d_gradfix.enabled = True
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (conv2d_gradfix.enabled, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved


def _forward_fn(G, run, device, batch) -> Callable[[], None]:
    """One no-grad call of `run` (G or a compiled G) on a fixed batch of latents, as generate.py calls it."""
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn([batch, G.z_dim], device=device, generator=gen)
    c = torch.zeros([batch, G.c_dim], device=device)

    def step():
        with torch.no_grad():
            run(z, c, noise_mode='const')
    return step


def time_forward(G, device, batch, iters, warmup) -> float:
    """Median ms of one eval-mode, no-grad generator call on a batch."""
    G.eval().requires_grad_(False)
    return median_seconds(_forward_fn(G, G, device, batch), device, iters, warmup) * 1e3


def time_train(G, D, device, batch, iters, warmup) -> float:
    """Median ms of G -> D -> loss backward plus D(reals) -> loss backward, both networks in train mode."""
    G.train().requires_grad_(True)
    D.train().requires_grad_(True)
    return median_seconds(_train_step(G, D, G, D, device, batch), device, iters, warmup) * 1e3


def _train_step(G_run, D_run, G, D, device, batch) -> Callable[[], None]:
    """The pass time_train times, running G_run and D_run (G and D themselves, or compiled wrappers of them)."""
    gen = torch.Generator(device=device).manual_seed(2)
    z = torch.randn([batch, G.z_dim], device=device, generator=gen)
    c = torch.zeros([batch, G.c_dim], device=device)
    reals = torch.randn([batch, G.img_channels, G.img_resolution, G.img_resolution], device=device, generator=gen)
    params = list(G.parameters()) + list(D.parameters())

    def step():
        for p in params:
            p.grad = None
        fake_logits = D_run(G_run(z, c), c)
        F.softplus(-fake_logits).mean().backward()
        real_logits = D_run(reals, c)
        F.softplus(-real_logits).mean().backward()
    return step


def first_call_seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call of `fn` (for a compiled function: the call that traces and compiles it)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_compiled(G, D, device, batch, iters, warmup, mode) -> dict:
    """The fwd and train passes of time_forward / time_train with G and D compiled (torch_utils.compiler: the
    backend of --compile). Returns {pass}_compiled_ms (median, after the compiling call and `warmup` more) and
    {pass}_compile_s (the first call, which traces and compiles; the steady time is not subtracted)."""
    result = {}
    if mode in ('fwd', 'both'):
        fwd = _forward_fn(G, compiler.compile_module(G.eval(), device), device, batch)
        G.requires_grad_(False)
        result['fwd_compile_s'] = first_call_seconds(fwd, device)
        result['fwd_compiled_ms'] = median_seconds(fwd, device, iters, warmup) * 1e3
    if mode in ('train', 'both'):
        G_train, D_train = compiler.compile_module(G, device), compiler.compile_module(D, device)
        G.train().requires_grad_(True)
        D.train().requires_grad_(True)
        step = _train_step(G_train, D_train, G, D, device, batch)
        result['train_compile_s'] = first_call_seconds(step, device)
        result['train_compiled_ms'] = median_seconds(step, device, iters, warmup) * 1e3
    torch._dynamo.reset()  # The next network starts with empty caches (and no recompilation limit reached).
    return result

# ----------------------------------------------------------------------------
# The benchmark as a pure function (tests call it), and the tables.


def run_benchmark(
    configs:        Sequence[str],                      # Names in CONFIGS.
    archs:          Sequence[Tuple[str, Optional[int]]],  # (architecture, squeeze r or None), see parse_archs.
    device:         str = 'cpu',                        # 'cpu', 'cuda', 'cuda:1', ...
    batch:          Optional[int] = None,               # Images per timed batch; None = DEFAULT_RUN.
    iters:          Optional[int] = None,               # Timed iterations (median reported); None = DEFAULT_RUN.
    warmup:         Optional[int] = None,               # Untimed iterations first; None = DEFAULT_RUN.
    mode:           str = 'both',                       # 'fwd', 'train' or 'both'.
    fp32:           bool = False,                       # Force fp32 on a GPU (the CPU always runs fp32).
    channels_last:  bool = False,                       # fp16 layers in channels-last memory format.
    threads:        Optional[int] = None,               # CPU threads for PyTorch ops; None = leave as is.
    bf16:           bool = False,                       # The reduced-precision layers in bfloat16 (GPU).
    log:            Callable[[str], None] = lambda msg: None,  # Progress messages.
    compile:        bool = False,                       # Also time G and D under torch.compile (see time_compiled).
) -> Tuple[List[dict], dict]:
    """Build, count and time every (config, arch) pair; returns (rows, run description)."""
    if mode not in ('fwd', 'train', 'both'):
        raise ValueError(f'unknown mode {mode!r}; use fwd, train or both')
    with _num_threads(threads):
        return _run_benchmark(configs, archs, device, batch, iters, warmup, mode, fp32, channels_last, log, bf16,
                              compile)


@contextlib.contextmanager
def _num_threads(threads: Optional[int]) -> Iterator[None]:
    # With another busy process on a small machine, OpenMP regions that wait for a descheduled thread can make
    # every op many times slower; fewer threads than cores avoids that (see the load warning in main).
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run_benchmark(configs, archs, device, batch, iters, warmup, mode, fp32, channels_last, log, bf16=False,
                   compile=False):
    load_before = _load_average()
    device = torch.device(device)
    kind = 'cuda' if device.type == 'cuda' else 'cpu'
    fp16 = device.type == 'cuda' and not fp32
    rows = []
    runs = {}
    for config in configs:
        if config not in CONFIGS:
            raise ValueError(f'unknown config {config!r}; use one of {", ".join(CONFIGS)}')
        default_batch, default_iters, default_warmup = DEFAULT_RUN[kind][config]
        run = dict(batch=batch or default_batch, iters=iters or default_iters,
                   warmup=default_warmup if warmup is None else warmup)
        group = CONFIGS[config]['mbstd']
        if run['batch'] > group and run['batch'] % group != 0:
            raise ValueError(f'batch {run["batch"]} is not a multiple of the minibatch-std group size {group} '
                             f'of config {config!r}')
        runs[config] = run
        for arch, r in archs:
            label = f'{config} {arch}' + (f' r={r}' if r else '')
            log(f'{label}: building')
            G, D = build_networks(config, arch, r, fp16=fp16, channels_last=channels_last, bf16=bf16)
            row = dict(config=config, arch=arch, r=r, g_params=num_params(G), d_params=num_params(D),
                       num_ws=G.synthesis.num_ws, batch=run['batch'], iters=run['iters'], warmup=run['warmup'])
            log(f'{label}: counting MACs')
            row.update(count_macs(G))
            G.to(device)
            D.to(device)
            with _training_flags(device):
                if mode in ('fwd', 'both'):
                    log(f'{label}: timing fwd')
                    row['fwd_ms'] = time_forward(G, device, run['batch'], run['iters'], run['warmup'])
                if mode in ('train', 'both'):
                    log(f'{label}: timing train')
                    row['train_ms'] = time_train(G, D, device, run['batch'], run['iters'], run['warmup'])
                if compile:
                    log(f'{label}: compiling ({compiler.backend_name()}) and timing')
                    row.update(time_compiled(G, D, device, run['batch'], run['iters'], run['warmup'], mode))
            rows.append(row)
            del G, D
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    _add_ratios(rows)
    description = dict(device=str(device), device_name=_device_name(device), torch=torch.__version__,
                       threads=torch.get_num_threads(), cpu_count=os.cpu_count(), load_before=load_before,
                       precision=f'{"bf16" if bf16 else "fp16"} (num_fp16_res=4)' if fp16 else 'fp32',
                       channels_last=channels_last, mode=mode, runs=runs,
                       compile_backend=compiler.backend_name() if compile else None)
    return rows, description


def _load_average() -> Optional[float]:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _add_ratios(rows: List[dict]) -> None:
    """Each row's counts and times divided by those of the `skip` row of its config (None without one)."""
    for row in rows:
        base = next((b for b in rows if b['config'] == row['config'] and b['arch'] == 'skip'), None)
        for key in ('measured', 'nominal', 'fwd_ms', 'train_ms'):
            value = row.get(key)
            ref = base.get(key) if base is not None else None
            row[f'{key}_ratio'] = value / ref if value is not None and ref else None


def _fmt(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def summary_table(rows: List[dict]) -> str:
    """One line per generator: sizes, MACs per image, times per batch, and ratios against `skip`."""
    table = [('config', 'arch', 'r', 'G params', 'D params', 'ws', 'GMAC/img', 'x skip', 'nominal GMAC', 'x skip',
              'batch', 'fwd ms', 'fwd img/s', 'x skip', 'train ms', 'train img/s', 'x skip')]
    for row in rows:
        fwd, train = row.get('fwd_ms'), row.get('train_ms')
        table.append((
            row['config'], row['arch'], _fmt(row['r'], 'd'), f'{row["g_params"]:,}', f'{row["d_params"]:,}',
            str(row['num_ws']),
            _fmt(None if row['measured'] is None else row['measured'] / 1e9, '.3f'), _fmt(row['measured_ratio'], '.3f'),
            f'{row["nominal"] / 1e9:.3f}', _fmt(row['nominal_ratio'], '.3f'), str(row['batch']),
            _fmt(fwd, '.1f'), _fmt(None if fwd is None else row['batch'] / fwd * 1e3, '.1f'),
            _fmt(row['fwd_ms_ratio'], '.3f'),
            _fmt(train, '.1f'), _fmt(None if train is None else row['batch'] / train * 1e3, '.1f'),
            _fmt(row['train_ms_ratio'], '.3f'),
        ))
    return text_table(table)


def compile_table(rows: List[dict]) -> str:
    """Eager against compiled, one line per generator: median ms per batch, the speed-up, and the seconds of the
    first compiled call (tracing and compiling)."""
    table = [('config', 'arch', 'r', 'batch', 'fwd eager ms', 'fwd compiled ms', 'speed-up', 'compile s',
              'train eager ms', 'train compiled ms', 'speed-up', 'compile s')]
    for row in rows:
        cells = []
        for name in ('fwd', 'train'):
            eager, compiled = row.get(f'{name}_ms'), row.get(f'{name}_compiled_ms')
            speedup = eager / compiled if eager is not None and compiled else None
            cells += [_fmt(eager, '.1f'), _fmt(compiled, '.1f'), _fmt(speedup, '.2f'),
                      _fmt(row.get(f'{name}_compile_s'), '.1f')]
        table.append((row['config'], row['arch'], _fmt(row['r'], 'd'), str(row['batch']), *cells))
    return text_table(table)


def block_table(rows: List[dict]) -> str:
    """MACs of every synthesis block, measured / nominal in millions, one line per generator."""
    tables = []
    for config in dict.fromkeys(row['config'] for row in rows):
        subset = [row for row in rows if row['config'] == config]
        names = list(subset[0]['nominal_blocks'])
        table = [('config', 'arch', 'r', *[f'{name} MMAC' for name in names])]
        for row in subset:
            cells = []
            for name in names:
                measured = row['measured_blocks'].get(name)
                cells.append(f'{_fmt(None if measured is None else measured / 1e6, ".1f")} / '
                             f'{row["nominal_blocks"][name] / 1e6:.1f}')
            table.append((config, row['arch'], _fmt(row['r'], 'd'), *cells))
        tables.append(text_table(table))
    return '\n\n'.join(tables)


def spec_mismatches(rows: List[dict]) -> List[str]:
    """Rows whose parameter counts differ from SPEC.md §1."""
    problems = []
    for row in rows:
        expected = SPEC_PARAMS.get((row['config'], row['arch'], row['r']))
        if expected is not None and row['g_params'] != expected:
            problems.append(f'{row["config"]} {row["arch"]} r={row["r"]}: G has {row["g_params"]:,} parameters, '
                            f'SPEC says {expected:,}')
        expected_d = SPEC_D_PARAMS.get(row['config'])
        if expected_d is not None and row['d_params'] != expected_d:
            problems.append(f'{row["config"]}: D has {row["d_params"]:,} parameters, SPEC says {expected_d:,}')
    return list(dict.fromkeys(problems))

# ----------------------------------------------------------------------------


def _split(text: str) -> List[str]:
    return [item.strip() for item in text.split(',') if item.strip()]


def _print_tables(rows: List[dict], info: dict) -> None:
    print(summary_table(rows))
    print()
    if info['compile_backend'] is not None:
        print(f'torch.compile ({info["compile_backend"]}) against eager, median ms per batch; compile s: the first '
              f'compiled call, which traces and compiles:')
        print(compile_table(rows))
        print()
    print('MACs per synthesis block, measured / nominal, millions per image:')
    print(block_table(rows))
    print()


def _check_compile(device: str) -> None:
    try:
        compiler.check_available(torch.device(device))
    except compiler.CompileUnavailable as exc:
        raise click.ClickException(f'--compile: {exc}') from None


@click.command()
@click.option('--device', default='cuda' if torch.cuda.is_available() else 'cpu', show_default=True)
@click.option('--configs', default='cifar,paper256', show_default=True,
              help=f'Comma-separated: {", ".join(CONFIGS)}.')
@click.option('--archs', default='skip,squeeze', show_default=True,
              help=f'Comma-separated: {syntax(ablations=False)}; bare squeeze expands over --squeeze-r.')
@click.option('--squeeze-r', 'squeeze_r', default='4,8,16', show_default=True, help='Comma-separated squeeze ratios.')
@click.option('--mode', type=click.Choice(['fwd', 'train', 'both']), default='both', show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=None, help='Images per batch  [default: per device and config]')
@click.option('--iters', type=click.IntRange(min=1), default=None, help='Timed iterations  [default: per device and config]')
@click.option('--warmup', type=click.IntRange(min=0), default=None, help='Warm-up iterations  [default: per device and config]')
@click.option('--fp32', is_flag=True, help='No fp16 layers on a GPU (the CPU always runs fp32).')
@click.option('--channels-last', is_flag=True, help='fp16 layers in channels-last memory format (GPU).')
@click.option('--bf16', is_flag=True, help='The reduced-precision layers in bfloat16 instead of float16 (GPU).')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='CPU threads for PyTorch  [default: PyTorch\'s]')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False), default=None, help='Also write the rows here.')
@click.option('--quiet', is_flag=True, help='No progress messages on stderr.')
@click.option('--compile', 'compile_net', is_flag=True,
              help='Also time G and D under torch.compile (backend: $STYLEGAN_COMPILE_BACKEND or inductor), with '
                   'the compile time.')
def main(device, configs, archs, squeeze_r, mode, batch, iters, warmup, fp32, channels_last, bf16, threads, json_path,
         quiet, compile_net):
    """Benchmark stock `skip` against `squeeze` generators: parameters, MACs, forward and training time."""
    try:
        rs = [int(r) for r in _split(squeeze_r)]
    except ValueError:
        raise click.BadParameter(f'{squeeze_r!r} is not a comma-separated list of integers',
                                 param_hint='--squeeze-r') from None
    if any(r < 1 for r in rs):
        raise click.BadParameter('squeeze ratios must be positive', param_hint='--squeeze-r')
    config_list = _split(configs)
    for config in config_list:
        if config not in CONFIGS:
            raise click.BadParameter(f'unknown config {config!r}; use {", ".join(CONFIGS)}', param_hint='--configs')
    try:
        arch_list = parse_archs(_split(archs), rs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint='--archs') from None
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise click.BadParameter('no CUDA device is available', param_hint='--device')

    if compile_net:
        _check_compile(device)
    host_memory.keep_freed_memory()  # As every process of the scripts (runner/host_memory.py).
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    try:
        rows, info = run_benchmark(config_list, arch_list, device=device, batch=batch, iters=iters, warmup=warmup,
                                   mode=mode, fp32=fp32, channels_last=channels_last, threads=threads, log=log,
                                   bf16=bf16, compile=compile_net)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    elapsed = time.perf_counter() - start

    _print_tables(rows, info)
    runs = ', '.join(f'{config} batch {run["batch"]} x {run["iters"]} timed after {run["warmup"]} warm-up'
                     for config, run in info['runs'].items())
    print(f'{info["device_name"]} ({info["device"]}, torch threads {info["threads"]}, load average before the run '
          f'{_fmt(info["load_before"], ".1f")}), torch {info["torch"]}, '
          f'{info["precision"]}{", channels-last" if channels_last else ""}, mode {mode}; {runs}; '
          f'median ms per batch; {elapsed:.0f} s in all.')
    print('GMAC/img: FlopCounterMode on one image (eval, fp32; convolutions and matmuls). Nominal: every '
          'k x k conv at its output resolution, from the weight shapes. x skip: ratio to the skip row.')
    load = info['load_before']
    if device.startswith('cpu') and load is not None and load > 0.5 and info['threads'] > 1:
        print(f'Note: load average {load:.1f} on {info["cpu_count"]} cores before the run; other processes '
              f'slow CPU times down, by much more than their share when they collide with PyTorch\'s threads '
              f'(try --threads=1).')
    for row in rows:
        label = f'{row["config"]} {row["arch"]} r={row["r"]}'
        if row['measured'] is None:
            print(f'No measured MAC count for {label} (only the nominal one): {row["count_error"]}')
        elif row['count_error']:
            print(f'MACs of {label} counted on the {row["counted_on"]} device after: {row["count_error"]}')
    for problem in spec_mismatches(rows):
        print(f'PARAMETER COUNT MISMATCH: {problem}')
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, 'w') as f:
            json.dump(dict(info, elapsed_s=elapsed, rows=rows), f, indent=2)
        print(f'Wrote {json_path}')


if __name__ == '__main__':
    main()
