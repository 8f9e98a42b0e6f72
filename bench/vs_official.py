"""This code base against NVIDIA's StyleGAN2-ADA PyTorch release on the same shapes, side by side, as a table of
time ratios (ours / official; below 1 = we are faster).

    # An export of the official code (never committed here): fetch NVlabs/stylegan2-ada-pytorch, then
    mkdir -p /tmp/official && git --git-dir=<its git dir> archive HEAD | tar -x -C /tmp/official
    python bench/vs_official.py --official=/tmp/official --official-commit=$(git --git-dir=<its git dir> rev-parse --short HEAD)
    python bench/vs_official.py --official=/tmp/official --configs=cifar --cases=G_eval,step --rounds=9

Both code bases have the packages `dnnlib`, `torch_utils` and `training`, so each runs in its own worker
process (this script with `--worker=DIR`), started once; the parent sends each worker one measurement at a time
and alternates them, A B A B, so that both see the same machine load, drift and thermal state. A measurement
is `--iters` calls of one case after `--warmup` untimed ones; each row's time is the median over `--rounds`
measurements of the time per call.

Large freed blocks (`--malloc`): by default each code base runs as its own scripts run it: ours keep freed blocks
for reuse (runner/host_memory.py; most of the CPU gain), the official code leaves glibc's default. `--malloc=keep`
gives the official code the same (through GLIBC_TUNABLES) and `--malloc=system` takes it from ours: like-for-like
tables of everything else. `--fast-demod` runs our G with the demodulation of train.py --fast-demod (other
rounding; the official code has no such path).

Cases (fp32, no reduced-precision blocks, no clamping; `--threads` torch threads in each worker):
    G_train   G(z, c) in train mode under no_grad (the modulated convolutions run unfused, as in training)
    G_eval    G(z, c) in eval mode under no_grad (fused modulated convolutions: generate.py, the metrics)
    D         D(img, c) in eval mode under no_grad
    step      G(z, c) -> D -> sum of the logits, backward, both in train mode (the work of a training step)
Configs: cifar (32x32, batch 16, cifar preset networks: channel_base 32768, mapping 2, D orig, mbstd 32) and
paper256 (256x256, batch 4, paper256 networks: channel_base 16384, mapping 8, D resnet, mbstd 8). Archs: skip,
and squeeze (r=8) compared with the official skip (the official code has no squeeze block).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench.timing import text_table  # noqa: E402

CONFIGS = {
    'cifar':    dict(res=32,  batch=16, channel_base=32768, map=2, d_arch='orig',   mbstd=32),
    'paper256': dict(res=256, batch=4,  channel_base=16384, map=8, d_arch='resnet', mbstd=8),
    'tiny':     dict(res=16,  batch=4,  channel_base=1024,  map=2, d_arch='resnet', mbstd=4),  # For tests.
}
CASES = ('G_train', 'G_eval', 'D', 'step')
ARCHS = ('skip', 'squeeze')

# ----------------------------------------------------------------------------
# The worker: one code base, imported from its own tree.


def _networks(config: str, arch: str):
    """G and D of `config` with the `training.networks` of the tree this worker imported."""
    import torch  # Here: the parent process never imports torch (the workers each set their threads first).

    # Here: the tree of this worker, put first on the path by worker().
    from training import networks
    cfg = CONFIGS[config]
    synthesis = dict(channel_base=cfg['channel_base'], channel_max=512, num_fp16_res=0, conv_clamp=None,
                     architecture=arch)
    if arch == 'squeeze':
        synthesis['squeeze_r'] = 8
    torch.manual_seed(0)
    G = networks.Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=cfg['res'], img_channels=3,
                           mapping_kwargs=dict(num_layers=cfg['map']), synthesis_kwargs=synthesis)
    D = networks.Discriminator(c_dim=0, img_resolution=cfg['res'], img_channels=3, architecture=cfg['d_arch'],
                               channel_base=cfg['channel_base'], channel_max=512, num_fp16_res=0, conv_clamp=None,
                               epilogue_kwargs=dict(mbstd_group_size=cfg['mbstd']))
    return G, D


def _case_fn(case: str, G, D, batch: int, g_kwargs: dict):
    """A function that runs `case` once; `g_kwargs` go to every call of G."""
    import torch  # Here: as in _networks.
    z = torch.randn([batch, G.z_dim])
    c = torch.zeros([batch, 0])
    img = torch.randn([batch, 3, G.img_resolution, G.img_resolution])

    def g_forward():
        with torch.no_grad():
            G(z, c, **g_kwargs)

    def d_forward():
        with torch.no_grad():
            D(img, c)

    def step():
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        D(G(z, c, **g_kwargs), c).sum().backward()

    G.train(case in ('G_train', 'step'))
    D.train(case == 'step')
    return dict(G_train=g_forward, G_eval=g_forward, D=d_forward, step=step)[case]


def worker(tree: str, threads: int) -> None:
    """Serve measurements of the code base in `tree`: one JSON request per line on stdin, one JSON reply."""
    sys.path.insert(0, tree)
    import torch  # Here: after the tree is first on the path, and with the threads set before any work.
    torch.set_num_threads(threads)
    if tree == REPO_ROOT:
        # Here: only this tree has it. What every process of our scripts does first ($STYLEGAN_HOST_MALLOC,
        # which the parent set from --malloc, decides).
        from runner import host_memory
        host_memory.keep_freed_memory()
    built: Dict[tuple, object] = dict()
    for line in sys.stdin:
        request = json.loads(line)
        key = (request['config'], request['arch'])
        if key not in built:
            built[key] = _networks(*key)
        fn = _case_fn(request['case'], *built[key], batch=CONFIGS[request['config']]['batch'],
                      g_kwargs=request['g_kwargs'])
        for _ in range(request['warmup']):
            fn()
        start = time.perf_counter()
        for _ in range(request['iters']):
            fn()
        seconds = (time.perf_counter() - start) / request['iters']
        print(json.dumps(dict(seconds=seconds)), flush=True)

# ----------------------------------------------------------------------------
# The parent: alternate the two workers.


# glibc's environment form of what runner.host_memory sets with mallopt, for the official code under --malloc=keep.
KEEP_TUNABLES = 'glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647'
MALLOC_MODES = dict(  # --malloc -> (ours, official): whether each keeps freed blocks.
    scripts=(True, False),  # As each code base's scripts run: ours keep them (runner/host_memory.py).
    keep=(True, True),      # Like for like: the official code too, through GLIBC_TUNABLES.
    system=(False, False),  # Like for like: glibc's default for both.
)


class Worker:
    def __init__(self, tree: str, threads: int, keep_freed: bool):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=tree, STYLEGAN_HOST_MALLOC='keep' if keep_freed else 'system')
        env.pop('GLIBC_TUNABLES', None)
        if keep_freed and tree != REPO_ROOT:
            env['GLIBC_TUNABLES'] = KEEP_TUNABLES
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), f'--worker={tree}',
                                         f'--threads={threads}'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        cwd=tree, env=env, text=True)

    def measure(self, **request) -> float:
        self.process.stdin.write(json.dumps(request) + '\n')
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise click.ClickException(f'a benchmark worker ended without an answer (exit status '
                                       f'{self.process.wait()}); its error is above')
        return json.loads(reply)['seconds']

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def _tree_commit(tree: str) -> str:
    """The short commit of the git checkout `tree` (this repository), or 'unknown'."""
    try:
        out = subprocess.run(['git', '-C', tree, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             timeout=10)
    except OSError:
        return 'unknown'
    return out.stdout.strip() or 'unknown'


def compare(official: str, configs: List[str], cases: List[str], archs: List[str], rounds: int, iters: int,
            warmup: int, threads: int, malloc: str = 'scripts', fast_demod: bool = False) -> List[dict]:
    """One row per (config, arch, case): the median seconds per call of both code bases and their ratio."""
    keep_ours, keep_official = MALLOC_MODES[malloc]
    ours, theirs = Worker(REPO_ROOT, threads, keep_ours), Worker(official, threads, keep_official)
    ours_g_kwargs = dict(fast_demod=True) if fast_demod else {}
    rows = []
    try:
        for config in configs:
            for arch in archs:
                for case in cases:
                    times = dict(ours=[], official=[])
                    for round_index in range(rounds):
                        # A B A B: the official code always runs its skip G (it has no squeeze block). The
                        # first round of a row warms both up.
                        request = dict(config=config, case=case, iters=iters,
                                       warmup=warmup if round_index == 0 else 0)
                        times['ours'].append(ours.measure(arch=arch, g_kwargs=ours_g_kwargs, **request))
                        times['official'].append(theirs.measure(arch='skip', g_kwargs={}, **request))
                    ours_s, official_s = statistics.median(times['ours']), statistics.median(times['official'])
                    rows.append(dict(config=config, arch=arch, case=case, batch=CONFIGS[config]['batch'],
                                     ours_ms=ours_s * 1e3, official_ms=official_s * 1e3, ratio=ours_s / official_s))
                    print(f'{config} {arch} {case}: ours {ours_s * 1e3:.1f} ms, official {official_s * 1e3:.1f} ms, '
                          f'ratio {ours_s / official_s:.3f}', file=sys.stderr)
    finally:
        ours.close()
        theirs.close()
    return rows


def format_table(rows: List[dict]) -> str:
    header = ['config', 'arch', 'case', 'batch', 'ours ms', 'official ms', 'ours/official']
    body = [[row['config'], row['arch'] + ('' if row['arch'] == 'skip' else ' vs skip'), row['case'],
             str(row['batch']), f'{row["ours_ms"]:.1f}', f'{row["official_ms"]:.1f}', f'{row["ratio"]:.3f}']
            for row in rows]
    return text_table([header] + body)


def _names(value: str, valid: tuple, flag: str) -> List[str]:
    names = [name.strip() for name in value.split(',') if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise click.BadParameter(f'{", ".join(unknown) or "nothing"}; valid choices: {", ".join(valid)}',
                                 param_hint=flag)
    return names


@click.command()
@click.option('--official', type=click.Path(file_okay=False), help='An export of NVlabs/stylegan2-ada-pytorch '
              '(the module docstring says how to make one)')
@click.option('--configs', default='cifar,paper256', show_default=True, help='Comma list of ' + ', '.join(CONFIGS))
@click.option('--cases', default=','.join(CASES), show_default=True, help='Comma list of ' + ', '.join(CASES))
@click.option('--archs', default=','.join(ARCHS), show_default=True, help='Comma list of ' + ', '.join(ARCHS))
@click.option('--rounds', type=click.IntRange(min=1), default=5, show_default=True,
              help='Alternated measurements per row and code base (the median is reported)')
@click.option('--iters', type=click.IntRange(min=1), default=3, show_default=True, help='Calls per measurement')
@click.option('--warmup', type=click.IntRange(min=0), default=2, show_default=True,
              help='Untimed calls before the first measurement of a row')
@click.option('--threads', type=click.IntRange(min=1), default=2, show_default=True, help='torch threads per worker')
@click.option('--malloc', type=click.Choice(list(MALLOC_MODES)), default='scripts', show_default=True,
              help='Large freed blocks: as each code base\'s scripts leave them (ours keep them for reuse, the '
              'official code does not), or kept / returned by both alike')
@click.option('--fast-demod', is_flag=True, help='Our G with fast_demod=True (train.py --fast-demod)')
@click.option('--official-commit', default='unknown (an export)', show_default=True,
              help='The commit the export was made from, for the table\'s footer')
@click.option('--json', 'json_path', type=click.Path(dir_okay=False), help='Also write the rows as JSON here')
@click.option('--worker', 'worker_tree', hidden=True)
def main(official, configs, cases, archs, rounds, iters, warmup, threads, malloc, fast_demod, official_commit,
         json_path, worker_tree):
    """Time this code base against the official StyleGAN2-ADA code on the same shapes (module docstring)."""
    if worker_tree is not None:
        worker(worker_tree, threads)
        return
    if official is None:
        raise click.UsageError('--official is required: an export of NVlabs/stylegan2-ada-pytorch (see --help)')
    official = os.path.abspath(official)
    if not os.path.isfile(os.path.join(official, 'training', 'networks.py')):
        raise click.BadParameter(f'"{official}" holds no training/networks.py; give an export of '
                                 f'NVlabs/stylegan2-ada-pytorch', param_hint='--official')
    configs, cases, archs = (_names(configs, tuple(CONFIGS), '--configs'), _names(cases, CASES, '--cases'),
                             _names(archs, ARCHS, '--archs'))
    rows = compare(official, configs, cases, archs, rounds, iters, warmup, threads, malloc, fast_demod)
    click.echo(format_table(rows))
    setup = f'--malloc={malloc}' + ('; ours with --fast-demod' if fast_demod else '')
    click.echo(f'Median of {rounds} alternated measurements of {iters} call(s) each; {threads} thread(s) per code '
               f'base; {setup}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. Ours: '
               f'{_tree_commit(REPO_ROOT)}; official: {official_commit}.')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
