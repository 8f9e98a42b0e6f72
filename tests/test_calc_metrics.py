"""calc_metrics.py: --gpus and --device mean what they mean for train.py; a real two-process CPU run; clear
one-line errors; help examples.

(The metric computations themselves, the registry and the metric files are tested in test_metrics.py.)
"""

import json
import os
import pickle
import subprocess
import sys
import types

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from test_legacy import REPO_ROOT, make_generator

import calc_metrics
import dnnlib
import train
from metrics import metric_main

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def network_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('calc')
    (root / 'net.pkl').write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=make_generator())))
    images = root / 'images'
    images.mkdir()
    rng = np.random.RandomState(0)
    for idx in range(4):
        PIL.Image.fromarray(rng.randint(0, 256, [16, 16, 3]).astype(np.uint8)).save(images / f'{idx}.png')
    return str(root / 'net.pkl'), str(images)


def _outcome(fn, *args):
    """(num_gpus, device_type), or 'error' for a refused request."""
    try:
        launch = fn(*args)
    except (click.ClickException, train.UserError):
        return 'error'
    return launch.num_gpus, launch.device_type


@pytest.mark.parametrize('visible', [0, 2])
def test_gpus_and_device_mean_what_they_mean_for_train_py(visible, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: visible)
    for gpus in (0, 1, 2, 3):
        for device in ('auto', 'cpu', 'cuda'):
            ours = _outcome(calc_metrics.resolve_processes, gpus, device)
            assert ours == _outcome(train.resolve_launch, gpus, device), (gpus, device)
    assert calc_metrics.resolve_processes(0, 'auto') == dict(num_gpus=1, device_type='cpu')
    assert calc_metrics.resolve_processes(3, 'cpu') == dict(num_gpus=3, device_type='cpu')
    if visible:
        assert calc_metrics.resolve_processes(2, 'auto') == dict(num_gpus=2, device_type='cuda')
    else:
        with pytest.raises(click.ClickException, match='--gpus=1 asks for CUDA.*use --gpus=0'):
            calc_metrics.resolve_processes(1, 'auto')


@pytest.fixture
def fake_metric(monkeypatch):
    """Record how the metric is asked to run instead of computing it."""
    calls = []

    def fake_calc_metric(metric, **kwargs):
        calls.append(dict(metric=metric, num_gpus=kwargs['num_gpus'], device=torch.device(kwargs['device'])))
        return dnnlib.EasyDict(results=dnnlib.EasyDict({metric: 1.0}), metric=metric, total_time=0.0,
                               total_time_str='0s', num_gpus=kwargs['num_gpus'])

    monkeypatch.setattr(metric_main, 'calc_metric', fake_calc_metric)
    return calls


def test_gpus_zero_is_one_cpu_process(network_and_data, fake_metric):
    network, data = network_and_data
    result = CliRunner().invoke(calc_metrics.main, ['--network', network, '--data', data, '--gpus', '0',
                                                    '--verbose', 'false'])
    assert result.exit_code == 0, result.output
    assert fake_metric == [dict(metric='fid50k_full', num_gpus=1, device=torch.device('cpu'))]


def _spawn_nothing(record):
    """A stand-in for torch.multiprocessing.spawn that starts no process: it calls `record(nprocs, args)` and
    returns a context whose join() says every process has ended (distributed.spawn is start() plus join())."""
    def spawn(fn, args, nprocs, join=True):
        record(nprocs, args)
        return types.SimpleNamespace(join=lambda: True)
    return spawn


def test_gpus_n_with_device_cpu_spawns_n_cpu_processes(network_and_data, fake_metric, monkeypatch):
    spawned = []
    monkeypatch.setattr(torch.multiprocessing, 'spawn', _spawn_nothing(lambda nprocs, args: spawned.append((nprocs, args[0]))))
    network, data = network_and_data
    with pytest.raises(FileNotFoundError):  # The stand-in spawn writes no results file.
        calc_metrics.calc_metrics(network, data=data, gpus=3, device='cpu', verbose=False)
    [(nprocs, args)] = spawned
    assert nprocs == 3 and args.num_gpus == 3 and args.device_type == 'cpu' and args.G is None


def test_spawned_ranks_adopt_as_the_parent_did(network_and_data, tmp_path, fake_metric, monkeypatch):
    from test_legacy_adopt import official_format_pickle

    spawned = []
    monkeypatch.setattr(torch.multiprocessing, 'spawn', _spawn_nothing(lambda nprocs, args: spawned.append(args[0])))
    official = tmp_path / 'official.pkl'
    official.write_bytes(official_format_pickle(dict(G_ema=make_generator())))
    _, data = network_and_data
    for adopt in (True, False):
        with pytest.raises(FileNotFoundError):
            calc_metrics.calc_metrics(str(official), data=data, gpus=2, device='cpu', verbose=False, adopt=adopt)
    assert [args.adopt for args in spawned] == [True, False]
    G = calc_metrics.load_snapshot(str(official), adopt=spawned[0].adopt, verify=False)['G_ema']
    assert type(G).__module__ == 'training.networks'


def run_script(args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')  # No CUDA.
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'calc_metrics.py')] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, message', [
    ([], 'Error: --gpus=1 asks for CUDA, but PyTorch sees no CUDA device; use --gpus=0 to compute in one CPU '
         'process, or --device=cpu to run 1 process(es) on the CPU'),
    (['--gpus=0', '--device=cuda'], 'Error: --gpus=0 means one CPU process, which contradicts --device=cuda'),
])
def test_cuda_requests_without_cuda_fail_in_one_line(network_and_data, tmp_path, args, message):
    network, data = network_and_data
    result = run_script([f'--network={network}', f'--data={data}'] + args, tmp_path)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == [message]


def test_data_errors_come_before_device_errors(network_and_data, tmp_path):
    network, _ = network_and_data
    # Without CUDA, --device=cuda is refused too, but only once the options and the data are known to be fine.
    result = CliRunner().invoke(calc_metrics.main, ['--network', network, '--data', str(tmp_path / 'nothing'),
                                                    '--device', 'cuda'])
    assert result.exit_code == 1
    assert 'Cannot open the dataset' in result.output and 'CUDA' not in result.output


def test_help_ends_with_examples():
    text = CliRunner().invoke(calc_metrics.main, ['--help']).output
    examples = text[text.index('Examples:'):]
    assert text.rstrip().endswith(examples.rstrip())
    assert '\n    python calc_metrics.py --network=net.pkl --data=data.zip --gpus=0' in examples
    assert '0 = one CPU process' in text


# A parent script that adds a cheap metric: spawned ranks run the parent's main file too (without its
# `__main__` block), so they know the metric as well.
RANK_SUM_SCRIPT = '''\
import sys
import torch
sys.path.insert(0, {repo!r})
import calc_metrics
from metrics import metric_main


def rank_sum(opts):
    """Sum of rank + 1 over the group, and this rank's torch threads: proves the group and the CPU split."""
    total = torch.tensor([opts.rank + 1.0])
    torch.distributed.all_reduce(total)
    return dict(rank_sum=total.item(), threads=torch.get_num_threads())


metric_main.register_metric(rank_sum)
if __name__ == '__main__':
    calc_metrics.main()
'''


def test_gpus_two_on_the_cpu_runs_two_processes_in_one_group(network_and_data, tmp_path):
    # The real path of `calc_metrics.py --gpus=2 --device=cpu`: torch_utils.distributed.spawn from the script
    # (its functions live in __main__), a gloo group through the rendezvous file, results back from rank 0.
    network, data = network_and_data
    script = tmp_path / 'calc_with_rank_sum.py'
    script.write_text(RANK_SUM_SCRIPT.format(repo=REPO_ROOT))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, str(script), f'--network={network}', f'--data={data}', '--gpus=2',
                             '--device=cpu', '--metrics=rank_sum', '--verbose=false'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    assert len(lines) == 1  # Rank 0 reports; rank 1 prints nothing.
    assert lines[0]['metric'] == 'rank_sum' and lines[0]['num_gpus'] == 2
    assert lines[0]['results'] == dict(rank_sum=3.0, threads=max(1, (os.cpu_count() or 1) // 2))
