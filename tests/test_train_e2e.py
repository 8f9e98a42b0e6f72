"""train.py end to end on the CPU: dataset_tool -> train.py -> every file of SPEC §3 -> generate.py; continuing
the run from its directory; and a two-process (gloo) run through `--gpus=2 --device=cpu`."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
import train
from training import checkpoint

pytestmark = pytest.mark.usefixtures('one_thread')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small network and two training steps of 8 images per tick.
TINY_FLAGS = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map=2', '--batch=8', '--gpus=0', '--metrics=none',
              '--workers=0', '--kimg=0.016', '--tick=0.008', '--snap=1', '--aug=ada', '--augpipe=bgc']


@pytest.fixture(scope='module')
def dataset_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('e2e')
    images = root / 'images'
    images.mkdir()
    rnd = np.random.RandomState(0)
    labels = []
    for i in range(16):
        PIL.Image.fromarray((rnd.rand(16, 16, 3) * 255).astype(np.uint8)).save(images / f'{i:02d}.png')
        labels.append([f'{i:02d}.png', i % 2])
    (images / 'dataset.json').write_text(json.dumps({'labels': labels}))
    result = CliRunner().invoke(dataset_tool.main, [f'--source={images}', f'--dest={root / "tiny.zip"}'])
    assert result.exit_code == 0, result.output
    return str(root / 'tiny.zip')


def _run_train(args):
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize('arch_flags', [['--arch=skip'], ['--arch=squeeze', '--squeeze-r=4']])
def test_train_writes_every_file_and_generate_reads_the_snapshot(tmp_path, dataset_zip, arch_flags):
    _run_train([f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', '--cond=1', *TINY_FLAGS, *arch_flags])
    (run_dir,) = (tmp_path / 'runs').iterdir()
    expected_desc = 'tiny-cond-cifar' + ('-squeeze-r4' if 'squeeze' in arch_flags[0] else '')
    assert run_dir.name == f'00000-{expected_desc}-cbase256-cmax16-map2-kimg0.016-batch8-ada-bgc'
    files = set(os.listdir(run_dir))
    # Ticks of 8 images: each snapshot and grid has its own name (kimg to the image), sorting in training order.
    assert {'training_options.json', 'log.txt', 'reals.png', 'fakes_init.png', 'fakes000000.008.png',
            'fakes000000.016.png', 'network-snapshot-000000.008.pkl', 'network-snapshot-000000.016.pkl',
            'stats.jsonl', checkpoint.STATE_FILE_NAME} <= files

    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['G_kwargs']['synthesis_kwargs']['architecture'] == arch_flags[0].split('=')[1]
    log = (run_dir / 'log.txt').read_text()
    assert 'tick 1' in log and '"G_kwargs"' in log  # The options summary and the status lines.
    lines = (run_dir / 'stats.jsonl').read_text().splitlines()
    assert len(lines) == 2 and 'Loss/D/loss' in json.loads(lines[-1])

    result = CliRunner().invoke(generate.main, [f'--network={run_dir / "network-snapshot-000000.016.pkl"}',
                                                '--seeds=0-1', '--class=1', f'--outdir={tmp_path / "out"}'])
    assert result.exit_code == 0, result.output
    with PIL.Image.open(tmp_path / 'out' / 'seed0001.png') as image:
        assert image.size == (16, 16) and image.mode == 'RGB'


def test_resume_continues_the_run_in_its_directory(tmp_path, dataset_zip):
    _run_train([f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *TINY_FLAGS, '--arch=squeeze'])
    (run_dir,) = (tmp_path / 'runs').iterdir()
    first = checkpoint.load_training_state(str(run_dir / checkpoint.STATE_FILE_NAME))
    assert first['progress']['cur_nimg'] == 16
    _run_train([f'--resume={run_dir}', '--kimg=0.032'])  # As the README writes it: no --gpus, no --device.
    assert list((tmp_path / 'runs').iterdir()) == [run_dir]  # No new run directory.
    second = checkpoint.load_training_state(str(run_dir / checkpoint.STATE_FILE_NAME))
    assert second['progress']['cur_nimg'] == 32
    records = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    # Appended, not replaced; every tick once, each with only its own values (not an earlier run's in this
    # process).
    assert [(r['Progress/kimg']['num'], round(r['Progress/kimg']['mean'] * 1000)) for r in records] == \
        [(1, 8), (1, 16), (1, 24), (1, 32)]


@pytest.mark.slow
def test_two_cpu_processes(tmp_path, dataset_zip):
    flags = [f for f in TINY_FLAGS if not f.startswith('--gpus')]
    _run_train([f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *flags, '--gpus=2', '--device=cpu'])
    (run_dir,) = (tmp_path / 'runs').iterdir()
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['num_gpus'] == 2 and options['batch_gpu'] == 4
    state = checkpoint.load_training_state(str(run_dir / checkpoint.STATE_FILE_NAME))
    assert state['progress']['cur_nimg'] == 16
    assert all(torch.isfinite(t).all() for t in state['networks']['G_ema'].values())


def test_train_evaluates_requested_metrics(tmp_path, dataset_zip):
    from metrics import metric_main

    def tiny_test_metric(opts):
        return dict(tiny_test_metric=float(opts.G.img_resolution))
    metric_main.register_metric(tiny_test_metric)
    try:
        flags = [f for f in TINY_FLAGS if not f.startswith('--metrics')]
        _run_train([f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *flags, '--metrics=tiny_test_metric'])
    finally:
        metric_main.unregister_metric('tiny_test_metric')
    (run_dir,) = (tmp_path / 'runs').iterdir()
    lines = (run_dir / 'metric-tiny_test_metric.jsonl').read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])['results'] == {'tiny_test_metric': 16.0}


def test_unknown_metric_is_refused_before_training(tmp_path, dataset_zip):
    flags = [f for f in TINY_FLAGS if not f.startswith('--metrics')]
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *flags,
                                             '--metrics=fid50k_fulll'])
    assert result.exit_code != 0 and "unknown metric 'fid50k_fulll'" in result.output
    assert not (tmp_path / 'runs').exists()


@pytest.mark.slow
def test_torchrun_on_the_cpu(tmp_path, dataset_zip):
    # The multi-node path: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; rank 0 makes the run dir.
    flags = [f for f in TINY_FLAGS if not f.startswith('--gpus')]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO_ROOT, 'train.py'), f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}',
           '--device=cpu', *flags]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (run_dir,) = (tmp_path / 'runs').iterdir()
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['num_gpus'] == 2
    state = checkpoint.load_training_state(str(run_dir / checkpoint.STATE_FILE_NAME))
    assert state['progress']['cur_nimg'] == 16
