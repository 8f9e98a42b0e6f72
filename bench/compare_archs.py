"""The paper's comparison in scale model: train the stock `skip` generator and the image squeeze connection on
the same data, config, seeds and budget, measure FID with the real Inception features, print one table.

    # CPU, Fashion-MNIST 32x32 (README "Skip vs. squeeze"): about 75 minutes on two cores.
    python dataset_tool.py --source=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
        --dest=datasets/fashion-mnist-10k.zip --max-images=10000
    python bench/compare_archs.py --data=datasets/fashion-mnist-10k.zip --outdir=compare --kimg=4 --seeds=0,1,2

    # GPUs at full scale, e.g. CIFAR-10 with the paper's cifar config and FID50k:
    python bench/compare_archs.py --data=datasets/cifar10.zip --outdir=compare-cifar --gpus=8 --kimg=25000 \\
        --train-args="--cfg=cifar --cond=1 --mirror=1" --metric=fid50k_full --archs=skip,squeeze-r8,squeeze-r4

Every (arch, seed) is a real `train.py` run in its own process (and folder `<outdir>/<arch>-seed<seed>/`), then
a real `calc_metrics.py` run on its last snapshot. Arch names (bench/archs.py): `skip`, `resnet`, `orig`,
`squeeze`, `squeeze-r<R>`, and `squeeze-r<R>-<source>` for the toRGB-source ablation (`--squeeze-torgb`, Fig. 6).
A finished pair (snapshot and metric line present) is reused, so an interrupted comparison continues where it
stopped.

Columns: G parameters (of G_ema); sec/kimg (mean of the ticks after the first, which carries the start-up);
peak memory (the training processes' summed resident set, polled every 0.2 s, on the CPU; the largest
`Resources/peak_gpu_mem_gb` of the run on a GPU); the metric per seed, its mean and sample standard deviation.
"""

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import click
import numpy as np
import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import legacy  # noqa: E402
from bench.archs import parse_arch, syntax  # noqa: E402


def arch_flags(name: str) -> List[str]:
    """'skip' -> ['--arch=skip']; 'squeeze-r8-excite' -> ['--arch=squeeze', '--squeeze-r=8', '--squeeze-torgb=excite']."""
    try:
        return parse_arch(name).train_flags()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--archs') from None


class PeakMemory:
    """Polls the summed resident set of a process and its children (the spawned ranks) in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                processes = [self.process] + self.process.children(recursive=True)
                self.peak = max(self.peak, sum(_rss(p) for p in processes))
            except psutil.Error:
                pass
            self._done.wait(self.interval)

    def stop(self) -> float:
        """Stop polling; the peak in GB."""
        self._done.set()
        self._thread.join()
        return self.peak / 2 ** 30


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def _run(command: List[str], log_path: str) -> float:
    """Run `command` in the repository with its output in `log_path`; returns its peak memory in GB. A failure
    stops the comparison with the command and the end of its log."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(log_path, 'w') as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        memory = PeakMemory(process.pid)
        returncode = process.wait()
        peak = memory.stop()
    if returncode != 0:
        tail = ''.join(open(log_path).readlines()[-15:])
        raise click.ClickException(f'{shlex.join(command)} failed with exit code {returncode} (log: {log_path}):\n'
                                   f'{tail}')
    return peak


def _run_dir(outdir: str) -> Optional[str]:
    if not os.path.isdir(outdir):
        return None
    runs = sorted(d for d in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, d)) and d[:5].isdigit())
    return os.path.join(outdir, runs[-1]) if runs else None


def _last_snapshot(run_dir: str) -> Optional[str]:
    snapshots = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    return os.path.join(run_dir, snapshots[-1]) if snapshots else None


def _metric_value(run_dir: str, metric: str, snapshot: str) -> Optional[float]:
    path = os.path.join(run_dir, f'metric-{metric}.jsonl')
    if not os.path.isfile(path):
        return None
    for line in reversed(open(path).read().splitlines()):
        record = json.loads(line)
        if os.path.basename(record.get('snapshot_pkl') or '') == os.path.basename(snapshot):
            return float(record['results'][metric])
    return None


def _stats(run_dir: str) -> Dict[str, float]:
    """sec/kimg (mean over the ticks after the first) and the largest peak GPU memory of a run's stats.jsonl."""
    records = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl')).read().splitlines()]
    later = records[1:] or records
    sec_per_kimg = float(np.mean([r['Timing/sec_per_kimg']['mean'] for r in later]))
    gpu_mem = max(r.get('Resources/peak_gpu_mem_gb', dict(mean=0))['mean'] for r in records)
    return dict(sec_per_kimg=sec_per_kimg, peak_gpu_mem_gb=gpu_mem)


def _g_params(snapshot: str) -> int:
    with open(snapshot, 'rb') as f:
        G = legacy.load_network_pkl(f)['G_ema']
    return sum(p.numel() for p in G.parameters())


def run_pair(arch: str, seed: int, args: dict) -> Dict:
    """Train (arch, seed) and measure its metric, or reuse what a previous call finished."""
    outdir = os.path.join(args['outdir'], f'{arch}-seed{seed}')
    run_dir = _run_dir(outdir)
    record_path = os.path.join(outdir, 'compare.json')
    if run_dir is not None and os.path.isfile(record_path):
        record = json.load(open(record_path))
        if record.get('settings') == args['settings']:
            print(f'{arch} seed {seed}: reusing {run_dir}', flush=True)
            return record
    os.makedirs(outdir, exist_ok=True)
    gpus = args['gpus']
    train = [sys.executable, 'train.py', f'--outdir={outdir}', f'--data={args["data"]}', f'--gpus={gpus}',
             f'--seed={seed}', f'--kimg={args["kimg"]}', '--metrics=none', *arch_flags(arch),
             *shlex.split(args['train_args'])]
    print(f'{arch} seed {seed}: training  ({shlex.join(train[1:])})', flush=True)
    start = time.time()
    peak_cpu = _run(train, os.path.join(outdir, 'train.log'))
    run_dir = _run_dir(outdir)
    snapshot = _last_snapshot(run_dir)
    metric = args['metric']
    calc = [sys.executable, 'calc_metrics.py', f'--network={snapshot}', f'--metrics={metric}',
            f'--gpus={max(gpus, 1)}' if gpus else '--gpus=0']
    print(f'{arch} seed {seed}: {metric} of {os.path.relpath(snapshot, args["outdir"])}  '
          f'(trained in {time.time() - start:.0f} s)', flush=True)
    _run(calc, os.path.join(outdir, 'metric.log'))
    value = _metric_value(run_dir, metric, snapshot)
    assert value is not None, f'calc_metrics.py wrote no {metric} for {snapshot}'
    stats = _stats(run_dir)
    record = dict(arch=arch, seed=seed, run_dir=run_dir, snapshot=snapshot, G_params=_g_params(snapshot),
                  sec_per_kimg=stats['sec_per_kimg'],
                  peak_mem_gb=stats['peak_gpu_mem_gb'] if gpus else peak_cpu,
                  memory_kind='GPU' if gpus else 'CPU RSS', metric=metric, value=value, settings=args['settings'])
    json.dump(record, open(record_path, 'w'), indent=2)
    print(f'{arch} seed {seed}: {metric} = {value:.2f}', flush=True)
    return record


def summarize(records: List[Dict], archs: List[str]) -> List[Dict]:
    rows = []
    for arch in archs:
        mine = [r for r in records if r['arch'] == arch]
        values = [r['value'] for r in mine]
        rows.append(dict(arch=arch, G_params=mine[0]['G_params'], sec_per_kimg=np.mean([r['sec_per_kimg'] for r in mine]),
                         peak_mem_gb=max(r['peak_mem_gb'] for r in mine), memory_kind=mine[0]['memory_kind'],
                         metric=mine[0]['metric'], values=values, seeds=[r['seed'] for r in mine],
                         mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0))
    return rows


def print_table(rows: List[Dict]) -> None:
    metric = rows[0]['metric']
    header = ['arch', 'G params', 'sec/kimg', f'peak mem GB ({rows[0]["memory_kind"]})',
              f'{metric} per seed ({", ".join(map(str, rows[0]["seeds"]))})', 'mean', 'std']
    table = [header] + [[row['arch'], f'{row["G_params"]:,}', f'{row["sec_per_kimg"]:.1f}', f'{row["peak_mem_gb"]:.2f}',
                         ' / '.join(f'{v:.2f}' for v in row['values']), f'{row["mean"]:.2f}', f'{row["std"]:.2f}']
                        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print('  '.join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print('  '.join('-' * w for w in widths))


@click.command(epilog='Examples:\n\n\b\n'
               '  python bench/compare_archs.py --data=datasets/fashion-mnist-10k.zip --outdir=compare --kimg=4\n'
               '  python bench/compare_archs.py --data=cifar10.zip --outdir=c --gpus=8 --kimg=25000 '
               '--train-args="--cfg=cifar --cond=1" --metric=fid50k_full')
@click.option('--data', required=True, help='Dataset zip or folder (dataset_tool.py output)')
@click.option('--outdir', required=True, type=click.Path(file_okay=False), help='Where the runs go')
@click.option('--archs', default='skip,squeeze-r8', show_default=True,
              help=f'Comma list of: {syntax()} (bench/archs.py)')
@click.option('--seeds', default='0,1,2', show_default=True, help='Comma list of training seeds')
@click.option('--kimg', type=click.FloatRange(min=0, min_open=True), default=4, show_default=True,
              help='Training budget per run')
@click.option('--gpus', type=click.IntRange(min=0), default=0, show_default=True, help='0 = one CPU process')
@click.option('--metric', default='fid2k', show_default=True, help='Metric of calc_metrics.py (fid2k, fid50k_full, ...)')
@click.option('--train-args', default='--cfg=cifar --cbase=4096 --cmax=128 --batch=16 --tick=1 --snap=1000 --workers=1',
              show_default=True, help='Further train.py flags, the same for every run')
@click.option('--json', 'json_path', default=None, help='Also write the per-run records and rows to this file')
def main(data, outdir, archs, seeds, kimg, gpus, metric, train_args, json_path):
    """Train every arch on the same data, config, seeds and budget; print one table of size, speed, memory and
    the metric per seed."""
    arch_list = [a.strip() for a in archs.split(',') if a.strip()]
    for arch in arch_list:
        arch_flags(arch)
    try:
        seed_list = [int(s) for s in seeds.split(',') if s.strip()]
    except ValueError:
        raise click.BadParameter(f'"{seeds}" is not a comma list of integers', param_hint='--seeds') from None
    if not os.path.exists(data):
        raise click.BadParameter(f'"{data}" does not exist', param_hint='--data')
    settings = dict(data=os.path.abspath(data), kimg=kimg, gpus=gpus, metric=metric, train_args=train_args)
    args = dict(settings, data=os.path.abspath(data), outdir=os.path.abspath(outdir), settings=settings)
    records = [run_pair(arch, seed, args) for arch in arch_list for seed in seed_list]
    rows = summarize(records, arch_list)
    print()
    print(f'{kimg:g} kimg per run, {metric}, train.py {train_args} --gpus={gpus}')
    print_table(rows)
    if json_path:
        json.dump(dict(records=records, rows=rows), open(json_path, 'w'), indent=2)


if __name__ == '__main__':
    main()
