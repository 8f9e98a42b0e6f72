"""Stop signals to the whole job, every combination: what tests/test_preemption.py samples, run in full by hand.

    python tools/preemption_matrix.py --outdir=/tmp/preemption-matrix [--only=SIGTERM-3-torchrun ...]

For each signal (SIGTERM, SIGINT, SIGUSR1), --workers (0, 1, 3) and launch (`1`: one process; `2`: --gpus=2
--device=cpu; `torchrun`: torchrun --standalone --nproc_per_node=2, signalled as `killpg` on torchrun's group;
`torchrun-all`: the same plus the ranks' own sessions, as SLURM signals every process of a step), a tiny run is
started in a session of its own, signalled with os.killpg once it has written two ticks, checked (exit status,
the one stop line, the saved state, no traceback or leaked semaphores), resumed with `--resume=<run dir>` (under
torchrun for the torchrun launches) and compared with an uninterrupted run: ticks, stats.jsonl records (timings
aside), files besides the stop's snapshot, and the final training state bit for bit. One line per combination,
then the count of those that held. It takes 10-30 s per combination on a 2-core CPU.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map-depth=2', '--batch=8', '--metrics=none', '--tick=0.024',
        '--snap=2', '--aug=noaug', '--kimg=0.2']
SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')
WORKERS = (0, 1, 3)
LAUNCHES = ('1', '2', 'torchrun', 'torchrun-all')


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED='1')


def _command(launch):
    train = os.path.join(REPO_ROOT, 'train.py')
    if launch == '1':
        return [sys.executable, train, '--gpus=0']
    if launch == '2':
        return [sys.executable, train, '--gpus=2', '--device=cpu']
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', train, '--device=cpu']


def _write_data(path):
    """16 random 16x16 RGB images in a zip (what the tests use)."""
    import io
    import zipfile
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(16):
            buffer = io.BytesIO()
            PIL.Image.fromarray((rnd.rand(16, 16, 3) * 255).astype(np.uint8)).save(buffer, format='PNG')
            archive.writestr(f'img{i:03d}.png', buffer.getvalue())


def _run_dir(outdir):
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    return os.path.join(outdir, names[0]) if len(names) == 1 else None


def _ticks(run_dir):
    path = os.path.join(run_dir, 'stats.jsonl') if run_dir else ''
    return len(open(path).readlines()) if os.path.isfile(path) else 0


def _state(run_dir):
    from training import checkpoint
    return checkpoint.load_training_state(os.path.join(run_dir, checkpoint.STATE_FILE_NAME))


def _differences(ours, theirs, where):
    """Where two training-state records differ (tensors bit for bit)."""
    if isinstance(theirs, torch.Tensor):
        return [] if torch.equal(ours, theirs) else [where]
    if isinstance(theirs, dict):
        if sorted(ours) != sorted(theirs):
            return [f'{where} keys']
        return [d for key in theirs for d in _differences(ours[key], theirs[key], f'{where}.{key}')]
    if isinstance(theirs, (list, tuple)):
        if len(ours) != len(theirs):
            return [f'{where} length']
        return [d for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for d in _differences(a, b, f'{where}[{i}]')]
    return [] if ours == theirs else [where]


def _compare(run_dir, reference, stop_snapshot):
    """What differs between a stopped and resumed run and the uninterrupted one."""
    def records(d):
        with open(os.path.join(d, 'stats.jsonl')) as f:
            return [json.loads(line) for line in f]

    def files(d):
        return sorted(n for n in os.listdir(d) if n.endswith(('.pkl', '.png')) and n != stop_snapshot)

    notes = []
    ours, theirs = records(run_dir), records(reference)
    ticks = [[(round(r['Progress/tick']['mean']), round(r['Progress/kimg']['mean'] * 1000)) for r in rs]
             for rs in (ours, theirs)]
    if ticks[0] != ticks[1]:
        notes.append(f'ticks {ticks[0]} vs {ticks[1]}')
    for a, b in zip(ours, theirs, strict=False):  # A length difference is a note of its own (ticks).
        if sorted(a) != sorted(b):
            notes.append(f'record names differ at kimg {b["Progress/kimg"]["mean"]}')
        for name in set(a) & set(b):
            if name == 'timestamp' or name.startswith(('Timing/', 'Resources/')):
                continue
            x, y = a[name]['mean'], b[name]['mean']
            if not (x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y)) or (x != x and y != y)):
                notes.append(f'{name} {x} vs {y}')
    if not os.path.isfile(os.path.join(run_dir, stop_snapshot)):
        notes.append(f'no {stop_snapshot}')
    if files(run_dir) != files(reference):
        notes.append(f'files {files(run_dir)} vs {files(reference)}')
    state = {k: v for k, v in _state(run_dir).items() if k != 'options'}
    reference_state = {k: v for k, v in _state(reference).items() if k != 'options'}
    notes += [f'state differs at {d}' for d in _differences(state, reference_state, 'state')[:3]]
    return notes


def _one(outdir, data, signame, workers, launch, reference):
    """Stop, check, resume, compare: the notes of what went wrong (empty when all held) and where it stopped."""
    out = os.path.join(outdir, f'{signame}-{workers}-{launch}')
    run = subprocess.Popen([*_command(launch), f'--outdir={out}', f'--data={data}', f'--workers={workers}', *TINY],
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    while _ticks(_run_dir(out)) < 2 and run.poll() is None:
        time.sleep(0.05)
    import psutil
    children = psutil.Process(run.pid).children(recursive=True)
    os.killpg(run.pid, getattr(signal, signame))
    if launch == 'torchrun-all':
        for child in children:  # The ranks lead sessions of their own; their data workers do not (skipped).
            try:
                os.killpg(child.pid, getattr(signal, signame))
            except ProcessLookupError:
                pass
    stdout, stderr = run.communicate(timeout=900)
    psutil.wait_procs(children, timeout=600)  # Ranks whose agent died go on alone until they have saved.
    run_dir, notes = _run_dir(out), []
    torchrun = launch.startswith('torchrun')
    # torchrun's own status: 1 after SIGTERM/SIGINT (it re-raises them), killed by SIGUSR1 (it does not handle it).
    expected = (-signal.SIGUSR1 if signame == 'SIGUSR1' else 1) if torchrun else 75
    if run.returncode != expected:
        notes.append(f'status {run.returncode}')
    if torchrun:
        # A dead agent (SIGUSR1) cannot pass its ranks' output on: the README's way to tell a stop under torchrun
        # is the last line of log.txt.
        with open(os.path.join(run_dir, 'log.txt')) as f:
            stdout = f.read().rstrip().splitlines()[-1]
    lines = [line for line in stdout.splitlines() if line.startswith('Stopped ')]
    want = 'Stopped because the launching process' if launch == 'torchrun' and signame == 'SIGUSR1' else \
        'Stopped ' if launch == 'torchrun-all' else f'Stopped by {signame} at kimg'
    if len(lines) != 1 or not lines[0].startswith(want):
        notes.append(f'stop lines {lines}')
    if 'leaked' in stderr or (not torchrun and ('Traceback' in stderr or 'Error' in stderr)):
        notes.append('stderr: ' + stderr[-600:].replace('\n', ' | '))
    stopped_at = _state(run_dir)['progress']['cur_nimg'] if run_dir else None
    if notes:
        return notes, stopped_at
    resume = (_command(launch)[:-1] if torchrun else _command(launch)[:2]) + [f'--resume={run_dir}']
    resumed = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=900)
    if resumed.returncode != 0:
        return [f'resume status {resumed.returncode}: {resumed.stderr[-500:]}'], stopped_at
    return _compare(run_dir, reference, f'network-snapshot-000000.{stopped_at:03d}.pkl'), stopped_at


@click.command()
@click.option('--outdir', required=True, help='Where the runs go (a fresh directory)')
@click.option('--only', multiple=True, help='Combinations SIGNAL-WORKERS-LAUNCH to run, e.g. SIGTERM-3-2')
def main(outdir, only):
    """Stop, resume and compare every combination of signal, --workers and launch (module docstring)."""
    sys.path.insert(0, REPO_ROOT)
    os.makedirs(outdir, exist_ok=True)
    data = os.path.join(outdir, 'data.zip')
    _write_data(data)
    references = {}
    combos = [c for c in itertools.product(LAUNCHES, WORKERS, SIGNALS) if not only or f'{c[2]}-{c[1]}-{c[0]}' in only]
    held = 0
    for launch, workers, signame in combos:
        processes = '1' if launch == '1' else '2'
        if processes not in references:
            ref_out = os.path.join(outdir, f'uninterrupted-{processes}')
            done = subprocess.run([*_command(processes), f'--outdir={ref_out}', f'--data={data}', *TINY], env=_env(),
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-2000:]
            references[processes] = _run_dir(ref_out)
        start = time.monotonic()
        notes, stopped_at = _one(outdir, data, signame, workers, launch, references[processes])
        held += not notes
        print(f'{signame:8s} --workers={workers} {launch:12s} stopped at {stopped_at} images: '
              f'{"; ".join(notes) if notes else "OK"} ({time.monotonic() - start:.0f} s)', flush=True)
    print(f'{held} of {len(combos)} held')


if __name__ == '__main__':
    main()
