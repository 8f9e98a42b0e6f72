"""Bad input to train.py, run as a user runs it (`python train.py ...` in a subprocess): one clear error, a
non-zero exit code, no traceback on the console, no run directory left behind by a failed start, and nothing
of an existing run lost.

The failing starts are independent, so `cli_results` launches them all at once (one thread each) and the
tests read their results."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from test_legacy_adopt import official_format_pickle

from training import snapshot_io
from training.networks import Discriminator, Generator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map-depth=2', '--batch=8', '--gpus=0', '--metrics=none',
        '--workers=0', '--kimg=0.016', '--tick=0.008', '--snap=1', '--aug=noaug']


def _png(array) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='PNG')
    return buffer.getvalue()


def make_zip(path, num_images=16, broken=None, gray=None):
    """A dataset zip of random 16x16 RGB images; `broken` / `gray` name images that are cut short / grayscale."""
    rnd = np.random.RandomState(0)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(num_images):
            name = f'img{i:03d}.png'
            data = _png((rnd.rand(16, 16, 3) * 255).astype(np.uint8))
            if name == broken:
                data = data[:40]
            if name == gray:
                data = _png((rnd.rand(16, 16) * 255).astype(np.uint8))
            archive.writestr(name, data)
    return str(path)


def make_snapshot(path, resolution=16, channels=3):
    """A stock snapshot of the networks that TINY (the cifar preset, made small) builds."""
    G = Generator(z_dim=512, w_dim=512, c_dim=0, img_resolution=resolution, img_channels=channels,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=256, channel_max=16))
    D = Discriminator(c_dim=0, img_resolution=resolution, img_channels=channels, channel_base=256, channel_max=16,
                      architecture='orig')
    snapshot_io.save_network_pkl(dict(training_set_kwargs=None, G=G.eval(), D=D.eval(), G_ema=G.eval(),
                                 augment_pipe=None), str(path))
    return str(path)


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT, PYTHONWARNINGS='ignore')


def run_train(args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'train.py'), *args], capture_output=True,
                          text=True, timeout=300, env=_env(), cwd=str(cwd))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    f = dict(root=root, data=make_zip(root / 'data.zip'))
    f['broken_data'] = make_zip(root / 'broken.zip', broken='img005.png')
    f['gray_data'] = make_zip(root / 'gray.zip', gray='img009.png')
    f['res32'] = make_snapshot(root / 'res32.pkl', resolution=32)
    f['gray_pkl'] = make_snapshot(root / 'gray.pkl', channels=1)
    good = make_snapshot(root / 'good.pkl')
    (root / 'truncated.pkl').write_bytes(open(good, 'rb').read()[:5000])
    f['truncated'] = str(root / 'truncated.pkl')
    (root / 'notes.pkl').write_text('these are my notes, not a snapshot\n')
    f['text'] = str(root / 'notes.pkl')
    (root / 'a-file').write_text('x')
    detectors = root / 'detectors'
    detectors.mkdir()
    (detectors / 'inception-2015-12-05.pt').write_text('<html>404 Not Found</html>')
    f['detectors'] = str(detectors)
    (root / 'cut.zip').write_bytes(open(f['data'], 'rb').read()[:300])
    f['cut_zip'] = str(root / 'cut.zip')
    return f


# name: (arguments after --outdir, substrings of the error). Each case runs in its own folder `<root>/<name>`.
CASES = {
    'resume_other_resolution': (lambda f: [f'--data={f["data"]}', *TINY, '--arch=squeeze', f'--resume={f["res32"]}'],
                                ['makes 32x32 images, but the training data is 16x16']),
    'resume_other_channels':   (lambda f: [f'--data={f["data"]}', *TINY, f'--resume={f["gray_pkl"]}'],
                                ['has 1 image channel(s), but the training data has 3']),
    'resume_truncated':        (lambda f: [f'--data={f["data"]}', *TINY, f'--resume={f["truncated"]}'],
                                ['--resume: cannot use', 'truncated or corrupt']),
    'resume_not_a_snapshot':   (lambda f: [f'--data={f["data"]}', *TINY, f'--resume={f["text"]}'],
                                ['--resume: cannot use', 'text starting with']),
    'resume_missing':          (lambda f: [f'--data={f["data"]}', *TINY, f'--resume={f["root"]}/nothing.pkl'],
                                ['--resume:', 'does not exist']),
    'gamma_nan':               (lambda f: [f'--data={f["data"]}', *TINY, '--gamma=nan'],
                                ["Invalid value for '--gamma'", 'nan is not a finite number']),
    'kimg_inf':                (lambda f: [f'--data={f["data"]}', *TINY[:-4], '--kimg=inf'],
                                ["Invalid value for '--kimg'", 'inf is not a finite number']),
    'missing_detector':        (lambda f: [f'--data={f["data"]}', *[a for a in TINY if '--metrics' not in a],
                                           '--metrics=fid50k_full', f'--detector-dir={f["detectors"]}'],
                                ['--metrics:', 'inception-2015-12-05.pt', 'not a TorchScript file']),
    'data_cut_short':          (lambda f: [f'--data={f["cut_zip"]}', *TINY], ['--data:', 'cut.zip']),
    'data_missing_on_a_cpu':   (lambda f: [f'--data={f["root"]}/none.zip', *[a for a in TINY if '--gpus' not in a]],
                                ['--data:', 'none.zip', 'does not exist']),
    'corrupt_image':           (lambda f: [f'--data={f["broken_data"]}', *TINY],
                                ['Training stopped during setup: ', 'img005.png', 'Removed the run directory']),
    'gray_image_in_rgb_data':  (lambda f: [f'--data={f["gray_data"]}', *TINY],
                                ['Training stopped during setup: ', 'img009.png', 'with 1 channel(s)']),
}


@pytest.fixture(scope='module')
def cli_results(files):
    processes = {}
    for name, (make_args, _expected) in CASES.items():
        folder = files['root'] / name
        folder.mkdir()
        outdir = folder / 'runs'
        processes[name] = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, 'train.py'), f'--outdir={outdir}', *make_args(files)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(folder))
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_fails_before_any_run_directory_exists(files, cli_results, name):
    returncode, stdout, stderr = cli_results[name]
    assert returncode != 0, stdout[-2000:]
    for expected in CASES[name][1]:
        assert expected in stderr, stderr[-3000:]
    assert 'Traceback' not in stdout + stderr, stderr[-3000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1, stderr[-3000:]
    runs = files['root'] / name / 'runs'
    assert not runs.exists() or os.listdir(runs) == [], os.listdir(runs)


def test_a_failed_start_keeps_its_log_outside_the_removed_run_directory(cli_results):
    _returncode, _stdout, stderr = cli_results['corrupt_image']
    kept_log = stderr.strip().rsplit(' ', 1)[-1]
    with open(kept_log) as f:
        log = f.read()
    assert 'Traceback' in log and 'img005.png' in log
    os.remove(kept_log)


def test_outdir_under_a_regular_file(files, tmp_path):
    result = run_train([f'--outdir={files["root"] / "a-file" / "runs"}', f'--data={files["data"]}', *TINY], tmp_path)
    assert result.returncode != 0 and 'is a file, not a directory' in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert open(files['root'] / 'a-file').read() == 'x'


def test_dry_run_needs_no_gpu(files, tmp_path):
    result = run_train([f'--outdir={tmp_path / "runs"}', f'--data={files["data"]}', '--cfg=paper256', '--gpus=8',
                        '--metrics=none', '--dry-run'], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'Processes:          8 (cuda)' in result.stdout and 'Dry run; exiting.' in result.stdout
    assert not (tmp_path / 'runs').exists()


def test_resume_of_a_run_whose_data_moved_or_broke(files, tmp_path):
    data = shutil.copy(files['data'], tmp_path / 'data.zip')
    result = run_train([f'--outdir={tmp_path / "runs"}', f'--data={data}', *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / 'runs').iterdir()
    kept = {name: (run_dir / name).read_bytes() for name in os.listdir(run_dir) if name.endswith(('.pkl', '.pt'))}
    assert 'network-snapshot-000000.016.pkl' in kept

    # Moved: reported before any work, in one line.
    os.rename(data, tmp_path / 'moved.zip')
    result = run_train([f'--resume={run_dir}', '--kimg=0.032'], tmp_path)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert '--resume: the training data of this run cannot be read' in result.stderr and 'data.zip' in result.stderr

    # Back, but with a broken image that only the training processes meet: one line naming the file, the
    # traceback in log.txt, the run directory and its snapshots and state untouched.
    make_zip(tmp_path / 'data.zip', broken='img011.png')
    result = run_train([f'--resume={run_dir}', '--kimg=0.032'], tmp_path)
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    (error_line,) = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert 'img011.png' in error_line and 'is intact' in error_line and str(run_dir / 'log.txt') in error_line
    assert 'Traceback of rank 0' in (run_dir / 'log.txt').read_text()
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_fine_tune_an_official_format_snapshot_into_squeeze_from_the_command_line(files, tmp_path):
    # A stock snapshot whose networks come from embedded source, as an official pickle's do.
    with open(make_snapshot(tmp_path / 'ours.pkl'), 'rb') as f:
        snapshot = snapshot_io.load_network_pkl(f)
    official = tmp_path / 'official.pkl'
    official.write_bytes(official_format_pickle(snapshot))
    result = run_train([f'--outdir={tmp_path / "runs"}', f'--data={files["data"]}', *TINY, '--arch=squeeze',
                        f'--resume={official}'], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / 'runs').iterdir()
    assert run_dir.name.endswith('-squeeze-r8-cbase256-cmax16-map2-kimg0.016-batch8-noaug-resumecustom')
    log = (run_dir / 'log.txt').read_text()
    for text in (result.stdout, log):
        assert 'G: ' in text and 'tensors' in text and 'copied' in text
        assert 'synthesis.b8: conv0, resample_filter copied; torgb partly copied; squeeze, excite, blend new' in text
        assert 'D: ' in text and 'G_ema: as G' in text
    assert 'copied whole: mapping' in log and '\nD: 24 tensors (16,065 values) copied\n' in log
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['resume_pkl'] == str(official)
    G = snapshot_io.load_network(str(run_dir / 'network-snapshot-000000.016.pkl'))
    assert G.synthesis.architecture == 'squeeze'
    assert torch.isfinite(G(torch.randn([1, G.z_dim]), torch.zeros([1, 0]))).all()
