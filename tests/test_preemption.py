"""Nothing lost on a cluster: stop signals save the run, --state-kimg, one writer per run directory, stale
temporary files swept, resumed logs without duplicate ticks, a killed rank reported in one line.

The loop-level tests drive training_loop in this process (a stop request set from progress_fn stands in for
the signal); the others send real signals to real `python train.py` processes, the way schedulers do: SLURM
and Kubernetes signal every process of the job (`os.killpg` on a run started in a session of its own), data
workers included. tools/preemption_matrix.py runs every combination of signal, --workers and launch."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_train_cli_errors import make_zip
from test_training_loop import BATCH, _train, make_image_folder

from training import checkpoint, preemption

pytestmark = pytest.mark.usefixtures('one_thread')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def _state_nimg(run_dir):
    return checkpoint.load_training_state(os.path.join(run_dir, checkpoint.STATE_FILE_NAME))['progress']['cur_nimg']


def _stats_kimg(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [round(json.loads(line)['Progress/kimg']['mean'] * 1000) for line in f]

# ----------------------------------------------------------------------------
# The loop.


@pytest.mark.parametrize('stop_snapshot', [True, False])
def test_a_stop_request_ends_the_run_after_the_step_with_its_state_saved(tmp_path, data_dir, stop_snapshot):
    request = preemption.StopRequest()

    def progress(cur_kimg, total_kimg):
        if os.path.isfile(tmp_path / 'run' / 'stats.jsonl') and len(_stats_kimg(tmp_path / 'run')) == 2:
            request.signame = 'SIGTERM'  # What the handler does on the first signal.
    state = _train(tmp_path / 'run', data_dir, steps=20, steps_per_tick=2, network_snapshot_ticks=100,
                   image_snapshot_ticks=100, stop_request=request, progress_fn=progress,
                   stop_snapshot=stop_snapshot)
    # Ticks after steps 1 and 3; the request came with the second, so the run stopped after step 4.
    assert state.stop.signal == 'SIGTERM' and state.progress.cur_nimg == 4 * BATCH
    assert _state_nimg(tmp_path / 'run') == 4 * BATCH
    snapshots = sorted(name for name in os.listdir(tmp_path / 'run') if name.startswith('network-snapshot-'))
    assert snapshots == (['network-snapshot-000000.008.pkl', 'network-snapshot-000000.032.pkl'] if stop_snapshot
                         else ['network-snapshot-000000.008.pkl'])
    assert preemption.stop_message('SIGTERM', 0.032, 'runs/00001-x') == \
        'Stopped by SIGTERM at kimg 0.0; resume with: python train.py --resume=runs/00001-x'


def _records(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


def _run_files(run_dir):
    return sorted(name for name in os.listdir(run_dir) if name.endswith('.pkl') or name.endswith('.png'))


def _assert_identical(ours, theirs, where):
    """Two training-state records (or parts of them) equal: tensors bit for bit, everything else exactly."""
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), where
        for key, value in theirs.items():
            _assert_identical(ours[key], value, f'{where}.{key}')
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_identical(a, b, f'{where}[{i}]')
    else:
        assert ours == theirs, where


def assert_same_as_uninterrupted(run_dir, reference_dir, stop_snapshot=None):
    """A stopped and resumed run against the uninterrupted one: the same ticks (tick numbers and image counts),
    stats records with the same names and values (timings and memory aside; 1e-9 for the rounding of a tick's
    sums that were carried over in the state), the same files besides the stop's snapshot, and the same final
    training state, bit for bit (its options aside: they say what was resumed)."""
    ours, theirs = _records(run_dir), _records(reference_dir)
    # (Each value is a difference of running totals, so even the uninterrupted run's image counts are rounded.)
    assert [(round(r['Progress/tick']['mean']), round(r['Progress/kimg']['mean'] * 1000)) for r in ours] == \
        [(round(r['Progress/tick']['mean']), round(r['Progress/kimg']['mean'] * 1000)) for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert sorted(a) == sorted(b), b['Progress/kimg']
        for name, value in b.items():
            if name != 'timestamp' and not name.startswith(('Timing/', 'Resources/')):
                assert a[name]['num'] == value['num'], name
                assert a[name]['mean'] == pytest.approx(value['mean'], rel=1e-9, abs=1e-12, nan_ok=True), name
                assert a[name]['std'] == pytest.approx(value['std'], rel=1e-6, abs=1e-9, nan_ok=True), name
    files = _run_files(run_dir)
    if stop_snapshot is not None:
        assert stop_snapshot in files
        files.remove(stop_snapshot)
    assert files == _run_files(reference_dir)
    ours = checkpoint.load_training_state(os.path.join(run_dir, checkpoint.STATE_FILE_NAME))
    theirs = checkpoint.load_training_state(os.path.join(reference_dir, checkpoint.STATE_FILE_NAME))
    _assert_identical({k: v for k, v in ours.items() if k != 'options'},
                      {k: v for k, v in theirs.items() if k != 'options'}, 'state')


def test_a_stop_in_the_middle_of_a_tick_leaves_the_run_as_it_would_have_been(tmp_path, data_dir):
    # Ticks end after steps 1, 3, 5, 7, 8; lazy regularization and ADA every 4 steps (steps 1, 5), so the tick
    # of steps 2-3 reports no Loss/G/reg and its record repeats the previous one (what the state must carry).
    options = dict(steps=8, steps_per_tick=2, G_reg_interval=4, D_reg_interval=4, ada_interval=4,
                   network_snapshot_ticks=2, image_snapshot_ticks=2)
    _train(tmp_path / 'reference', data_dir, **options)
    request = preemption.StopRequest()

    def progress(cur_kimg, total_kimg):
        if os.path.isfile(tmp_path / 'run' / 'stats.jsonl') and len(_stats_kimg(tmp_path / 'run')) == 1:
            request.signame = 'SIGUSR1'
    state = _train(tmp_path / 'run', data_dir, stop_request=request, progress_fn=progress, **options)
    assert state.stop.signal == 'SIGUSR1' and state.progress.cur_nimg == 2 * BATCH  # Half way through the tick of 2-3.
    assert _stats_kimg(tmp_path / 'run') == [8]  # A stop is not a tick.
    saved = checkpoint.load_training_state(str(tmp_path / 'run' / checkpoint.STATE_FILE_NAME))
    assert saved['progress'] == dict(cur_nimg=16, cur_tick=1, batch_idx=2, tick_start_nimg=8, between_ticks=True)
    assert saved['tick_stats']['log']['pending']['Loss/G/loss'][0] == BATCH  # The tick's first step, carried.

    resumed = _train(tmp_path / 'run', data_dir, resume_state=str(tmp_path / 'run' / checkpoint.STATE_FILE_NAME),
                     **options)
    assert resumed.progress.cur_nimg == 8 * BATCH and resumed.stop.signal is None
    assert_same_as_uninterrupted(tmp_path / 'run', tmp_path / 'reference', 'network-snapshot-000000.016.pkl')


def _send_blocked_signals(connection):
    connection.send(sorted(int(signum) for signum in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


def test_processes_started_while_a_run_trains_start_with_the_stop_signals_blocked():
    import multiprocessing
    stop_numbers = sorted(int(signal.Signals[name]) for name in preemption.STOP_SIGNALS)
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    request = preemption.StopRequest()
    with preemption.stop_signals(request):
        children = {}
        for method in ('fork', 'spawn'):
            context = multiprocessing.get_context(method)
            ours, theirs = context.Pipe()
            # Forks are guarded wherever they happen; a spawned child, where the loop starts its workers.
            with contextlib.nullcontext() if method == 'fork' else preemption.holding_stop_signals(spawning=True):
                context.Process(target=_send_blocked_signals, args=(theirs,)).start()
            children[method] = ours.recv()
        # A signal that comes while they are held back is delivered afterwards, not lost. Sent to this thread:
        # a signal to the process may be delivered to another of its threads that does not hold it back
        # (threads left by earlier tests), and Python then runs the handler at once.
        with preemption.holding_stop_signals():
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert request.signame is None
        assert request.signame == 'SIGUSR1'
    assert all(set(stop_numbers) <= set(blocked) for blocked in children.values()), children
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before


def test_state_kimg_writes_states_between_snapshots(tmp_path, data_dir):
    seen = []

    def progress(cur_kimg, total_kimg):
        if os.path.isfile(tmp_path / 'run' / checkpoint.STATE_FILE_NAME):
            seen.append(_state_nimg(tmp_path / 'run'))
    _train(tmp_path / 'run', data_dir, steps=7, steps_per_tick=1, network_snapshot_ticks=100, image_snapshot_ticks=100,
           state_kimg=3 * BATCH / 1000, progress_fn=progress)
    # Snapshot (and state) at tick 0 (8 images); states at the first ticks 3 steps on (32, 56); the end (56).
    assert seen == [8, 8, 8, 32, 32, 32, 56]
    assert sorted(name for name in os.listdir(tmp_path / 'run') if name.endswith('.pkl')) == \
        ['network-snapshot-000000.008.pkl', 'network-snapshot-000000.056.pkl']


def test_a_resumed_state_drops_the_records_of_the_repeated_ticks(tmp_path, data_dir):
    run = tmp_path / 'run'

    def progress(cur_kimg, total_kimg):
        saved = (run / checkpoint.STATE_FILE_NAME).exists()
        if saved and _state_nimg(run) == BATCH and not (tmp_path / 'state-at-8.pt').exists():
            shutil.copy(run / checkpoint.STATE_FILE_NAME, tmp_path / 'state-at-8.pt')
    _train(run, data_dir, steps=4, steps_per_tick=1, network_snapshot_ticks=2, image_snapshot_ticks=100,
           progress_fn=progress)
    assert _stats_kimg(run) == [8, 16, 24, 32]
    (run / 'metric-fake.jsonl').write_text(''.join(
        json.dumps(dict(results={}, snapshot_pkl=f'network-snapshot-{tag}.pkl')) + '\n'
        for tag in ('000000.008', '000000.016', '000000.032')) + '{"cut short')
    # As if the run had been killed after tick 3, with the last state written at tick 0 (8 images).
    shutil.copy(tmp_path / 'state-at-8.pt', run / checkpoint.STATE_FILE_NAME)
    _train(run, data_dir, steps=4, steps_per_tick=1, network_snapshot_ticks=2, image_snapshot_ticks=100,
           resume_state=str(run / checkpoint.STATE_FILE_NAME))
    assert _stats_kimg(run) == [8, 16, 24, 32]  # Every tick once: 16, 24 and 32 from the resumed run.
    lines = (run / 'metric-fake.jsonl').read_text().splitlines()
    assert [json.loads(line)['snapshot_pkl'] for line in lines] == ['network-snapshot-000000.008.pkl']

# ----------------------------------------------------------------------------
# Real processes and real signals.


TINY = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map-depth=2', '--batch=8', '--metrics=none', '--workers=0',
        '--tick=0.008', '--snap=1000', '--aug=noaug', '--kimg=0.4']


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED='1')


def _start(args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, 'train.py'), *args], cwd=str(cwd), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.05)


def _ticks(run_dir):
    path = os.path.join(run_dir, 'stats.jsonl')
    return len(open(path).readlines()) if os.path.isfile(path) else 0


def _one_run_dir(outdir):
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    return os.path.join(outdir, names[0]) if len(names) == 1 else None


@pytest.fixture(scope='module')
def data_zip(tmp_path_factory):
    return make_zip(tmp_path_factory.mktemp('zip') / 'data.zip')


def test_sigterm_saves_the_run_a_second_writer_is_refused_and_resume_sweeps_and_continues_exactly(tmp_path, data_zip):
    outdir = tmp_path / 'runs'
    run = _start([f'--outdir={outdir}', f'--data={data_zip}', '--gpus=0', *TINY], tmp_path)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 2, run)
    run_dir = _one_run_dir(outdir)

    # A second writer of the same directory is refused, naming the holder, and changes nothing.
    before = sorted(os.listdir(run_dir))
    second = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py'), f'--resume={run_dir}'],
                            capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=120)
    assert second.returncode == 1 and f'is in use by PID {run.pid} on host' in second.stderr, second.stderr
    assert 'Traceback' not in second.stderr and sorted(os.listdir(run_dir)) == before

    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == preemption_exit_status(), stderr[-3000:]
    # (While the run trains, log.txt's logger carries stderr to stdout too.)
    assert 'SIGTERM received: stopping after the current step' in stdout + stderr and 'Traceback' not in stderr
    (line,) = [line for line in stdout.splitlines() if line.startswith('Stopped by SIGTERM at kimg ')]
    assert line.endswith(f'resume with: python train.py --resume={run_dir}')
    stopped_at = _state_nimg(run_dir)
    assert 16 < stopped_at < 400
    tag = f'000000.{stopped_at:03d}'
    assert os.path.isfile(os.path.join(run_dir, f'network-snapshot-{tag}.pkl'))  # --stop-snapshot is on.

    # What a kill -9 in the middle of writes leaves: our temporary files (swept), and a user's file (kept).
    stale = [f'network-snapshot-{tag}.pkl.tmp-{"0" * 32}', f'training-state.pt.tmp-{"ab" * 16}']
    for name in stale + ['notes.tmp']:
        with open(os.path.join(run_dir, name), 'wb') as f:
            f.write(b'partial')
    resumed = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py'), f'--resume={run_dir}'],
                             capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'Removed 2 temporary file(s) left by interrupted writes: {", ".join(sorted(stale))}' in resumed.stdout
    assert not any(os.path.exists(os.path.join(run_dir, name)) for name in stale)
    assert os.path.isfile(os.path.join(run_dir, 'notes.tmp'))
    kimgs = _stats_kimg(run_dir)
    assert kimgs == sorted(set(kimgs)) and kimgs[-1] == 400  # Every tick once, in order.

    # The stopped and resumed run ends exactly where an uninterrupted one does.
    reference = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py'), f'--outdir={tmp_path / "ref"}',
                                f'--data={data_zip}', '--gpus=0', *TINY], capture_output=True, text=True,
                               env=_env(), cwd=str(tmp_path), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ours = checkpoint.load_training_state(os.path.join(run_dir, checkpoint.STATE_FILE_NAME))
    theirs = checkpoint.load_training_state(os.path.join(_one_run_dir(tmp_path / 'ref'), checkpoint.STATE_FILE_NAME))
    assert ours['progress']['cur_nimg'] == theirs['progress']['cur_nimg'] == 400
    for name in ('G', 'D', 'G_ema'):
        for key, value in theirs['networks'][name].items():
            assert torch.equal(ours['networks'][name][key], value), f'{name}.{key}'


def preemption_exit_status():
    import train
    return train.EXIT_STOPPED


def test_a_second_sigint_exits_at_once(tmp_path, data_zip):
    outdir = tmp_path / 'runs'
    run = _start([f'--outdir={outdir}', f'--data={data_zip}', '--gpus=0', *TINY], tmp_path)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 1, run)
    run.send_signal(signal.SIGINT)
    # The second signal only counts once the first was handled (Python merges signals that arrive together).
    lines = []
    while not any('SIGINT received' in line for line in lines):
        lines.append(run.stdout.readline())
        assert lines[-1] or run.poll() is None, ''.join(lines)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGINT, stdout[-2000:] + stderr[-2000:]
    assert 'SIGINT again: exiting at once' in stdout + stderr and 'Traceback' not in stdout + stderr


# Ticks of 3 steps (24 images) after the first, so that most stops fall in the middle of one.
GROUP_TINY = [*TINY[:-4], '--tick=0.024', '--snap=2', '--aug=noaug', '--kimg=0.2']
LAUNCHES = {
    '1 process':    [sys.executable, os.path.join(REPO_ROOT, 'train.py'), '--gpus=0'],
    '2 processes':  [sys.executable, os.path.join(REPO_ROOT, 'train.py'), '--gpus=2', '--device=cpu'],
    'torchrun':     [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                     os.path.join(REPO_ROOT, 'train.py'), '--device=cpu'],
}


def run_group(launch, args, cwd):
    """A run started the way a scheduler starts a job: in a session (and process group) of its own."""
    return subprocess.Popen([*LAUNCHES[launch], *args], cwd=str(cwd), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_zip):
    """The run directory of the uninterrupted GROUP_TINY run on 1 or 2 processes, made on first use."""
    made = {}

    def get(processes):
        if processes not in made:
            outdir = tmp_path_factory.mktemp('uninterrupted')
            run = run_group(processes, [f'--outdir={outdir}', f'--data={data_zip}', *GROUP_TINY], outdir)
            stdout, stderr = run.communicate(timeout=600)
            assert run.returncode == 0, stderr[-3000:]
            made[processes] = _one_run_dir(outdir)
        return made[processes]
    return get


@pytest.mark.parametrize('signame,workers,launch', [
    ('SIGTERM', 3, '1 process'),
    pytest.param('SIGUSR1', 1, '2 processes', marks=pytest.mark.slow),
    pytest.param('SIGINT', 1, 'torchrun', marks=pytest.mark.slow),
])
def test_a_signal_to_the_whole_job_saves_it_and_the_resumed_run_is_the_uninterrupted_one(
        tmp_path, data_zip, uninterrupted, signame, workers, launch):
    # With --workers 0 the same holds (test_sigterm_saves_..., tools/preemption_matrix.py for all combinations).
    outdir = tmp_path / 'runs'
    run = run_group(launch, [f'--outdir={outdir}', f'--data={data_zip}', *GROUP_TINY, f'--workers={workers}'],
                    tmp_path)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 2, run, timeout=300)
    os.killpg(run.pid, getattr(signal, signame))
    stdout, stderr = run.communicate(timeout=300)
    run_dir = _one_run_dir(outdir)
    if launch == 'torchrun':
        # torchrun's agent forwards the signal to its ranks (in sessions of their own), which stop as here and
        # exit 75; the agent itself exits 1 after any signal, whatever its ranks did (README).
        assert run.returncode == 1, stderr[-3000:]
    else:
        assert run.returncode == preemption_exit_status(), stderr[-3000:]
        assert 'Traceback' not in stderr and 'Error' not in stderr, stderr[-3000:]
    (line,) = [line for line in stdout.splitlines() if line.startswith('Stopped by')]
    assert line.startswith(f'Stopped by {signame} at kimg ') and line.endswith(f'--resume={run_dir}')
    stopped_at = _state_nimg(run_dir)
    assert 32 <= stopped_at < 200

    resume = LAUNCHES[launch][:-1] if launch == 'torchrun' else LAUNCHES[launch][:2]  # README: --resume alone.
    resumed = subprocess.run([*resume, f'--resume={run_dir}'], capture_output=True, text=True, env=_env(),
                             cwd=str(tmp_path), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = uninterrupted('1 process' if launch == '1 process' else '2 processes')
    assert_same_as_uninterrupted(run_dir, reference, f'network-snapshot-000000.{stopped_at:03d}.pkl')


@pytest.mark.slow
def test_two_processes_stop_together(tmp_path, data_zip):
    # `kill <pid>` signals only the launcher, which passes the stop on (a signal to every process: above).
    outdir = tmp_path / 'runs'
    args = [sys.executable, os.path.join(REPO_ROOT, 'train.py'), f'--outdir={outdir}', f'--data={data_zip}',
            '--gpus=2', '--device=cpu', *TINY]
    run = subprocess.Popen(args, cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 2, run, timeout=180)
    run.send_signal(signal.SIGUSR1)
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == preemption_exit_status(), stderr[-3000:]
    assert 'Stopped by SIGUSR1 at kimg' in stdout and 'Traceback' not in stderr
    assert 16 < _state_nimg(_one_run_dir(outdir)) < 400


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_one_line(tmp_path, data_zip):
    import psutil
    outdir = tmp_path / 'runs'
    run = _start([f'--outdir={outdir}', f'--data={data_zip}', '--gpus=2', '--device=cpu', *TINY, '--workers=1'],
                 tmp_path)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 1, run, timeout=180)
    ranks = [child for child in psutil.Process(run.pid).children() if 'spawn' in ' '.join(child.cmdline())]
    assert len(ranks) >= 2, [child.cmdline() for child in psutil.Process(run.pid).children()]
    victim = ranks[-1]
    victim.kill()
    start = time.monotonic()
    stdout, stderr = run.communicate(timeout=120)
    assert time.monotonic() - start < 60
    assert run.returncode == 1, stderr[-3000:]
    (error,) = [line for line in stderr.splitlines() if line.startswith('Error:')]
    assert f'(PID {victim.pid}) was killed by SIGKILL' in error and 'Traceback' not in stderr, stderr[-3000:]
    assert error.endswith('log.txt') and 'The log is ' in error
    assert 'leaked' not in stderr, stderr[-3000:]  # multiprocessing's resource tracker has nothing left over.


@pytest.mark.slow
def test_a_killed_launcher_leaves_ranks_that_say_so_and_save_the_run(tmp_path, data_zip):
    import psutil
    outdir = tmp_path / 'runs'
    run = run_group('2 processes', [f'--outdir={outdir}', f'--data={data_zip}', *GROUP_TINY, '--workers=1'], tmp_path)
    _wait_for(lambda: _one_run_dir(outdir) and _ticks(_one_run_dir(outdir)) >= 2, run, timeout=300)
    ranks = [child for child in psutil.Process(run.pid).children() if 'spawn' in ' '.join(child.cmdline())]
    run.kill()
    # The ranks (and their helpers) hold the launcher's output pipes: they close when the last of them ends.
    stdout, stderr = run.communicate(timeout=300)
    psutil.wait_procs(ranks, timeout=60)
    said = f'The launching process (PID {run.pid}) died: stopping after the current step and saving'
    assert said in stderr and 'SIGINT' not in stdout + stderr, stderr[-3000:]
    run_dir = _one_run_dir(outdir)
    (line,) = [line for line in stdout.splitlines() if line.startswith('Stopped')]
    assert line.startswith(f'Stopped because the launching process (PID {run.pid}) died at kimg ')
    saved = checkpoint.load_training_state(os.path.join(run_dir, checkpoint.STATE_FILE_NAME))
    assert saved['progress']['between_ticks'] and saved['progress']['cur_nimg'] >= 32
    assert 'leaked' not in stderr and 'Traceback' not in stderr, stderr[-3000:]


def test_a_moved_dataset_does_not_strand_a_run(tmp_path, data_zip):
    import io
    import zipfile

    import numpy as np
    import PIL.Image
    from click.testing import CliRunner

    import train
    data = shutil.copy(data_zip, tmp_path / 'data.zip')
    flags = [f for f in TINY if not f.startswith(('--kimg', '--snap'))] + ['--kimg=0.016', '--snap=1', '--gpus=0']
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={data}', *flags])
    assert result.exit_code == 0, result.output
    run_dir = _one_run_dir(tmp_path / 'runs')
    moved = shutil.move(data, tmp_path / 'moved.zip')

    def resume(*extra):
        return CliRunner().invoke(train.main, [f'--resume={run_dir}', '--kimg=0.032', *extra])
    gray = tmp_path / 'gray.zip'
    with zipfile.ZipFile(gray, 'w') as archive:
        for i in range(16):
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.full([16, 16], i * 10, dtype=np.uint8)).save(buffer, format='PNG')
            archive.writestr(f'img{i:03d}.png', buffer.getvalue())
    for other, difference in ((gray, '1 image channel(s) instead of 3'),
                              (make_zip(tmp_path / 'fewer.zip', num_images=15), '15 images instead of 16')):
        result = resume(f'--data={other}')
        assert result.exit_code == 1 and difference in result.output, result.output
        assert 'does not match the data this run was trained on' in result.output
    assert _state_nimg(run_dir) == 16  # Nothing was touched by the refused starts.
    result = resume(f'--data={moved}')
    assert result.exit_code == 0, result.output
    assert f'continuing on the data at "{moved}"' in result.output and _state_nimg(run_dir) == 32
    options = json.loads(open(os.path.join(run_dir, 'training_options.json')).read())
    assert options['training_set_kwargs']['path'] == str(moved)
