"""Every input checked, the way users give it: each script runs as `python <script> ...` in a subprocess, and
bad input gets one `Error:` line (no traceback, no word twice), a non-zero exit status, and nothing created or
lost. The failing commands are independent, so `results` starts them all at once and the tests read them.

Also here: the label rules of dataset.json, the layer count that bounds --freezed, a full disk before the
first training state, and the wording of errors built from other errors (DataLoader workers, failed runs)."""

import collections
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from test_dnnlib import disk_full_open
from test_train_cli_errors import TINY, _png, make_snapshot, make_zip
from test_training_loop import _train, make_image_folder

import dataset_tool
from dnnlib import util
from runner import options, run_dir
from runner.errors import RunFailed
from training import checkpoint, dataset, snapshot_io
from training.networks import Discriminator
from training.training_loop import TrainingStopped, one_line

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO_ROOT, PYTHONWARNINGS='ignore')


def start(script, args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)], cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def assert_clean_wording(text):
    """No word twice where a message is built from another: no '..' ending a sentence (a '..' of a path is
    fine) and no exception type named twice on one line ('... (ValueError)' after 'ValueError: ...')."""
    assert not re.search(r'(?<![./])\.\.(?![./])', text), text
    for line in text.splitlines():
        for name in set(re.findall(r'\b\w+(?:Error|Exception)\b', line)):
            assert line.count(name) == 1, line


def assert_one_error(result, expected):
    returncode, stdout, stderr = result
    assert returncode != 0, stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stdout + stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, stderr[-3000:]
    for text in expected:
        assert text in stderr, stderr[-3000:]
    assert_clean_wording(stderr)

# ----------------------------------------------------------------------------
# Inputs.


def with_labels(source, path, labels_json):
    """A copy of the dataset zip `source` with `labels_json` (raw text: JSON allows NaN and Infinity) as its
    dataset.json."""
    shutil.copy(source, path)
    with zipfile.ZipFile(path, 'a') as archive:
        archive.writestr('dataset.json', labels_json)
    return str(path)


def vector_labels(bad_index, bad_value, num_images=16):
    entries = [f'["img{i:03d}.png", [0.5, {bad_value if i == bad_index else 0.25}]]' for i in range(num_images)]
    return '{"labels": [' + ', '.join(entries) + ']}'


def class_labels(bad_index, bad_value, num_images=16):
    labels = [[f'img{i:03d}.png', bad_value if i == bad_index else i % 3] for i in range(num_images)]
    return json.dumps({'labels': labels})


def make_macos_zip(path, num_images=4):
    """A zip as macOS Finder's "Compress" makes it: the images, plus `__MACOSX/._<name>` AppleDouble files
    (resource forks, not images), plus a `._` file that a copy to a non-Mac disk left beside an image."""
    rnd = np.random.RandomState(1)
    apple_double = b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ' + bytes(60)
    with zipfile.ZipFile(path, 'w') as archive:
        for i in range(num_images):
            archive.writestr(f'photos/img{i}.png', _png((rnd.rand(16, 16, 3) * 255).astype(np.uint8)))
        archive.writestr('__MACOSX/photos/._img0.png', apple_double)
        archive.writestr('__MACOSX/photos/._img1.png', apple_double)
        archive.writestr('photos/._img2.png', apple_double)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('inputs')
    f = dict(root=root, data=make_zip(root / 'data.zip'), net=make_snapshot(root / 'net.pkl'))
    f['labels_nan'] = with_labels(f['data'], root / 'labels_nan.zip', vector_labels(3, 'NaN'))
    f['labels_2_70'] = with_labels(f['data'], root / 'labels_2_70.zip', class_labels(2, 2 ** 70))
    f['labels_1e12'] = with_labels(f['data'], root / 'labels_1e12.zip', class_labels(9, 10 ** 12))
    (root / 'a-file').write_text('x')
    f['target'] = root / 'target.png'
    f['target'].write_bytes(_png(np.zeros([16, 16, 3], dtype=np.uint8)))
    # A zip that is not TorchScript under the Inception file's name (a torch.save checkpoint), and a TorchScript
    # stand-in that passes the readiness check (the CPU note needs the default metric to be ready).
    (root / 'zip-detector').mkdir()
    torch.save(dict(weight=torch.zeros(3)), root / 'zip-detector' / 'inception-2015-12-05.pt')
    (root / 'stub-detector').mkdir()
    with warnings.catch_warnings():  # Recent torch marks torch.jit as deprecated; the detectors are TorchScript.
        warnings.simplefilter('ignore', category=DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Identity()), str(root / 'stub-detector' / 'inception-2015-12-05.pt'))
    f['macos_zip'] = make_macos_zip(root / 'from-a-mac.zip')
    with zipfile.ZipFile(f['macos_zip']) as archive:
        archive.extractall(root / 'from-a-mac')
    f['macos_dir'] = str(root / 'from-a-mac')
    return f


@pytest.fixture(scope='module')
def finished_run(files):
    """A tiny run that trained its whole length (0.016 kimg), with its snapshot and training state."""
    result = finish(start('train.py', [f'--outdir={files["root"] / "finished"}', f'--data={files["data"]}', *TINY],
                          files['root']))
    assert result[0] == 0, result[2][-3000:]
    (path,) = (files['root'] / 'finished').iterdir()
    return path


def _legacy_cases(f):
    """legacy.py with --dest naming its --source: the same path, a symlink to it, another spelling of it."""
    source = f['root'] / 'legacy_dest_other_path' / 'src.pkl'
    return {
        'legacy_dest_is_source':  ['legacy.py', ['--source=src.pkl', '--dest=src.pkl']],
        'legacy_dest_is_symlink': ['legacy.py', ['--source=src.pkl', '--dest=link.pkl']],
        'legacy_dest_other_path': ['legacy.py', [f'--source=file://{source}', '--dest=sub/../src.pkl']],
    }


# name: (script, arguments, substrings of the error). Each case runs in its own folder `<root>/<name>`, which
# holds nothing else afterwards (outputs would be created there), except what `_prepare` put in.
def make_cases(f, run):
    no_metrics = [arg for arg in TINY if not arg.startswith('--metrics')]
    train = ['--outdir=runs', *TINY]
    cases = {
        'labels_nan':       ('train.py', [*train, f'--data={f["labels_nan"]}'],
                             ['"dataset.json" in', 'labels_nan.zip', '"img003.png"', 'NaN', 'not a finite float32']),
        'labels_2_70':      ('train.py', [*train, f'--data={f["labels_2_70"]}'],
                             ['labels_2_70.zip', '"img002.png" is class 1180591620717411303424', 'renumber']),
        'labels_1e12':      ('train.py', [*train, f'--data={f["labels_1e12"]}'],
                             ['"img009.png" is class 1000000000000', 'below 1000']),
        'generate_trunc_nan':   ('generate.py', [f'--network={f["net"]}', '--seeds=0', '--trunc=nan', '--outdir=out'],
                                 ["Invalid value for '--trunc'", 'nan is not a finite number']),
        'generate_trunc_inf':   ('generate.py', [f'--network={f["net"]}', '--seeds=0', '--trunc=inf', '--outdir=out'],
                                 ["Invalid value for '--trunc'", 'inf is not a finite number']),
        'style_mixing_trunc':   ('style_mixing.py', [f'--network={f["net"]}', '--rows=0', '--cols=1', '--trunc=-inf',
                                                     '--outdir=out'], ['-inf is not a finite number']),
        'generate_seed_flood':  ('generate.py', [f'--network={f["net"]}', '--seeds=0-4294967295', '--outdir=out'],
                                 ["'--seeds'", 'more than 1,000,000 numbers']),
        'generate_outdir_under_a_file':     ('generate.py', [f'--network={f["net"]}', '--seeds=0',
                                                             f'--outdir={f["root"] / "a-file" / "out"}'],
                                             ["'--outdir'", 'a-file" is a file, not a directory']),
        'style_mixing_outdir_under_a_file': ('style_mixing.py', [f'--network={f["net"]}', '--rows=0', '--cols=1',
                                                                 f'--outdir={f["root"] / "a-file" / "out"}'],
                                             ['a-file" is a file, not a directory']),
        'projector_outdir_under_a_file':    ('projector.py', [f'--network={f["net"]}', f'--target={f["target"]}',
                                                              f'--outdir={f["root"] / "a-file" / "out"}'],
                                             ['a-file" is a file, not a directory']),
        'dataset_tool_tar':     ('dataset_tool.py', [f'--source={f["data"]}', '--dest=out.tar'],
                                 ['"out.tar" names a .tar archive', 'a .zip archive and a folder']),
        'dataset_tool_width':   ('dataset_tool.py', [f'--source={f["data"]}', '--dest=out.zip', '--width=1073741824',
                                                     '--height=1073741824'], ['--width must be between 1 and 8192']),
        'calc_metrics_cpu_flood': ('calc_metrics.py', [f'--network={f["net"]}', f'--data={f["data"]}', '--gpus=100000',
                                                       '--device=cpu', '--metrics=fid2k'],
                                   ['--gpus=100000 with --device=cpu', 'give at most']),
        'calc_metrics_zip_detector': ('calc_metrics.py', [f'--network={f["net"]}', f'--data={f["data"]}', '--gpus=0',
                                                          '--metrics=fid2k', f'--detector-dir={f["root"] / "zip-detector"}'],
                                      ['zip-detector/inception-2015-12-05.pt" is a zip archive but not a TorchScript']),
        'train_zip_detector':   ('train.py', ['--outdir=runs', f'--data={f["data"]}', *no_metrics, '--metrics=fid2k',
                                              f'--detector-dir={f["root"] / "zip-detector"}'],
                                 ['--metrics:', 'zip-detector/inception-2015-12-05.pt" is a zip archive but not a '
                                  'TorchScript']),
        'train_freezed':        ('train.py', [*train, f'--data={f["data"]}', '--freezed=100'],
                                 ['--freezed=100: the discriminator at 16x16 has 5 layers that can be frozen',
                                  'give at most 5']),
        'resume_below_progress': ('train.py', [f'--resume={run}', '--kimg=0.008'],
                                  [f'the run in "{run}" has already trained 0.016 kimg, so --kimg=0.008 is reached',
                                   'network-snapshot-000000.016.pkl', 'Nothing was written',
                                   'give a --kimg above 0.016']),
        'resume_a_finished_run': ('train.py', [f'--resume={run}'],
                                  ['has already trained 0.016 kimg, so its length of 0.016 kimg is reached']),
    }
    legacy_cases = {name: (script, args, ['is the source file', 'give another --dest'])
                    for name, (script, args) in _legacy_cases(f).items()}
    return {**cases, **legacy_cases}


def _prepare(folder, name):
    """Inputs that a case finds in its own folder; returns what must be there, unchanged, afterwards."""
    if not name.startswith('legacy_'):
        return {}
    make_snapshot(folder / 'src.pkl')
    os.symlink('src.pkl', folder / 'link.pkl')
    (folder / 'sub').mkdir()
    return {'src.pkl': (folder / 'src.pkl').read_bytes(), 'link.pkl': None, 'sub': None}


def _tree(path):
    """Every file below `path` with its contents (a run directory's complete state)."""
    return {os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), 'rb').read()
            for root, _dirs, names in os.walk(path) for name in names}


@pytest.fixture(scope='module')
def results(files, finished_run):
    cases = make_cases(files, finished_run)
    run_before = _tree(finished_run)
    processes, kept = {}, {}
    for name, (script, args, _expected) in cases.items():
        folder = files['root'] / name
        folder.mkdir()
        kept[name] = _prepare(folder, name)
        processes[name] = start(script, args, folder)
    out = {name: finish(process) for name, process in processes.items()}
    return dict(results=out, cases=cases, kept=kept, run_before=run_before, run_after=_tree(finished_run))


CASE_NAMES = list(make_cases(collections.defaultdict(str, root=pathlib.Path('root')), 'run'))


def _case_folder_is_as_prepared(folder, kept):
    assert sorted(os.listdir(folder)) == sorted(kept), os.listdir(folder)
    for name, content in kept.items():
        if content is not None:
            assert (folder / name).read_bytes() == content, name


@pytest.mark.parametrize('name', CASE_NAMES)
def test_bad_input_gives_one_error_line_and_creates_nothing(files, results, name):
    assert_one_error(results['results'][name], results['cases'][name][2])
    _case_folder_is_as_prepared(files['root'] / name, results['kept'][name])
    assert (files['root'] / 'a-file').read_text() == 'x'


def test_a_refused_resume_leaves_the_run_as_it_was(results):
    # Not a byte of the finished run changed: no snapshot, no state, no log line, no stats record.
    assert results['run_after'] == results['run_before']

# ----------------------------------------------------------------------------
# What is accepted, and said once.


def test_macos_metadata_is_skipped_with_one_note(files, tmp_path):
    processes = {kind: start('dataset_tool.py', [f'--source={files[f"macos_{kind}"]}', f'--dest=out-{kind}.zip'],
                             tmp_path) for kind in ('zip', 'dir')}
    for kind, process in processes.items():
        returncode, _stdout, stderr = finish(process)
        assert returncode == 0 and 'Traceback' not in stderr, stderr[-3000:]
        notes = [line for line in stderr.splitlines() if line.startswith('note:')]
        assert len(notes) == 1 and 'skipped 3 macOS metadata file(s)' in notes[0], stderr
        with zipfile.ZipFile(tmp_path / f'out-{kind}.zip') as archive:
            images = sorted(name for name in archive.namelist() if name.endswith('.png'))
        assert len(images) == 4, images
    # Training reads such an archive directly, without the metadata files.
    data = dataset.ImageFolderDataset(files['macos_zip'])
    assert len(data) == 4 and data._image_fnames == [f'photos/img{i}.png' for i in range(4)]


def test_a_cpu_run_with_the_default_metric_says_what_it_costs(files, tmp_path):
    result = finish(start('train.py', ['--outdir=runs', f'--data={files["data"]}', '--gpus=0', '--dry-run',
                                       f'--detector-dir={files["root"] / "stub-detector"}'], tmp_path))
    assert result[0] == 0, result[2][-3000:]
    (note,) = [line for line in result[2].splitlines() if line.startswith('note: on the CPU')]
    # 50,000 generated + the 16 real images at 9 images/s: 5557 s; later snapshots only generate (5556 s).
    assert '--metrics=fid50k_full takes about 1h 32m 37s at the first snapshot and 1h 32m 36s at each later' in note
    assert '50,000 generated and 16 real images' in note and 'about 9 images/s as measured on 2 CPU cores' in note
    assert '--metrics=fid2k takes about' in note and '--metrics=none skips them' in note
    assert not os.path.exists(tmp_path / 'runs')

# ----------------------------------------------------------------------------
# The label rules of dataset.json (the one place every script's dataset goes through).


@pytest.mark.parametrize('labels, message', [
    ([0, 1, float('nan')], None),   # Mixed kinds are refused by the existing rule; NaN is not an int.
    ([[0.0, 1.0], [float('inf'), 0.0], [0.0, 0.0]], '"b.png" is [Infinity, 0.0]'),
    ([[0.0], [10 ** 400], [0.0]], '"b.png" is [1000000'),
    ([[0.0], [-1e39], [0.0]], 'beyond +-3.4e38'),
    ([0, 2 ** 70, 1], '"b.png" is class 1180591620717411303424'),
    ([0, 1, -1], '"c.png" is negative'),
    ([0, 1, 1000], '"c.png" is class 1000, which would make one-hot labels of 1001 values for 3 image(s)'),
])
def test_labels_that_are_refused(labels, message):
    with pytest.raises(ValueError) as error:
        dataset.labels_to_array(labels, ['a.png', 'b.png', 'c.png'], '"dataset.json" in "x.zip"')
    assert str(error.value).startswith('"dataset.json" in "x.zip"')
    assert message is None or message in str(error.value)


def test_labels_that_are_accepted():
    # 999 classes for 3 images is sparse, but within the 1,000 that a subset of ImageNet may use.
    assert dataset.labels_to_array([0, 999, 5], ['a', 'b', 'c'], 'w').tolist() == [0, 999, 5]
    # Dense enough: 10 classes per image beyond 1,000 classes (2,000 images may use class 19,999).
    names = [f'{i}.png' for i in range(2000)]
    assert dataset.labels_to_array([19999] + [0] * 1999, names, 'w')[0] == 19999
    with pytest.raises(ValueError, match='below 20000'):
        dataset.labels_to_array([20000] + [0] * 1999, names, 'w')
    # Never more than MAX_CLASSES, however many images.
    assert dataset.MAX_CLASSES == 100_000
    vectors = dataset.labels_to_array([[-3e38, 1e-45], [0.5, 2.0]], ['a', 'b'], 'w')
    assert vectors.dtype == np.float32 and np.isfinite(vectors).all()


@pytest.mark.parametrize('value', ['NaN', '-Infinity', '1e39'])
def test_calc_metrics_and_train_read_labels_through_the_same_check(tmp_path, value):
    # calc_metrics.py and train.py both open datasets as ImageFolderDataset; the check runs when it is made, on
    # the JSON as written (Python's json reads NaN and Infinity).
    path = with_labels(make_zip(tmp_path / 'data.zip'), tmp_path / 'bad.zip', vector_labels(3, value))
    with pytest.raises(ValueError, match=r'"img003.png" is \[0.5, .*not a finite float32'):
        dataset.ImageFolderDataset(path, use_labels=True)
    assert len(dataset.ImageFolderDataset(path, use_labels=False)) == 16  # Labels unused: not read.

@pytest.mark.parametrize('dest, suffix', [('out.tar.gz', '.tar.gz'), ('OUT.TGZ', '.tgz'), ('data.7z', '.7z')])
def test_dataset_tool_names_the_archive_it_cannot_write(tmp_path, dest, suffix):
    with pytest.raises(ValueError, match=f'names a {re.escape(suffix)} archive'):
        dataset_tool.check_dest(str(tmp_path / dest))
    dataset_tool.check_dest(str(tmp_path / 'faces.v2'))  # A folder may have a dot in its name.

# ----------------------------------------------------------------------------
# --freezed counts the layers of the discriminator as it numbers them.


@pytest.mark.parametrize('architecture', ['orig', 'skip', 'resnet'])
def test_freezable_layer_count_matches_the_network(architecture):
    for resolution in (8, 32):
        D = Discriminator(c_dim=0, img_resolution=resolution, img_channels=3, channel_base=64, channel_max=8,
                          architecture=architecture)
        layers = sum(getattr(D, f'b{res}').num_layers for res in D.block_resolutions)
        assert options.freezable_d_layers(dict(architecture=architecture), resolution) == layers
    # The default (no 'architecture' key) is Discriminator's default, resnet.
    assert options.freezable_d_layers({}, 32) == 4 + 3 + 3

# ----------------------------------------------------------------------------
# A full disk before the first training state: the snapshot just written is complete, and the message says how
# to go on from it.


@pytest.fixture(scope='module')
def labelled_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def test_a_full_disk_at_the_first_training_state_names_the_complete_snapshot(tmp_path, labelled_folder,
                                                                             monkeypatch):
    run = tmp_path / 'run'
    monkeypatch.setattr(util, 'open', disk_full_open(1000, 'training-state'), raising=False)
    torch.set_num_threads(1)
    with pytest.raises(TrainingStopped) as error:
        _train(run, labelled_folder, steps=1)
    snapshot = run / 'network-snapshot-000000.008.pkl'
    assert str(error.value) == (
        f'No space left on device while writing training-state.pt; no training state had been saved yet, but the '
        f'snapshot {snapshot} is complete: free some space and continue from its weights with python train.py '
        f'--resume={snapshot} and the other options of this run; that starts a new run directory, with the '
        f'counters and optimizer moments reset')
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert not os.path.exists(run / checkpoint.STATE_FILE_NAME)
    G = snapshot_io.load_network(str(snapshot))  # Complete: it loads and runs.
    assert torch.isfinite(G(torch.zeros([1, G.z_dim]), torch.eye(G.c_dim)[:1])).all()

# ----------------------------------------------------------------------------
# Errors built from other errors name each thing once.


class _BrokenItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, idx):
        raise ValueError(f'Cannot read image "img{idx}.png": broken data stream')


def test_an_error_from_a_data_loader_worker_names_its_type_once():
    # A worker's error comes back with the worker's traceback in its message, whose last line repeats the type.
    loader = torch.utils.data.DataLoader(_BrokenItems(), batch_size=2, num_workers=1)
    with pytest.raises(ValueError) as error:
        next(iter(loader))
    assert 'Original Traceback' in str(error.value)
    line = f'Training stopped: {one_line(error.value)} ({type(error.value).__name__})'
    assert line == 'Training stopped: Cannot read image "img0.png": broken data stream (ValueError)'
    assert_clean_wording(line)


@pytest.mark.parametrize('message', ['Training diverged at 0.1 kimg: ... or --fp32.', 'Training stopped: x'])
def test_a_failed_run_message_ends_each_sentence_once(tmp_path, message):
    folder = tmp_path / '00000-run'
    folder.mkdir()
    (folder / checkpoint.STATE_FILE_NAME).write_bytes(b'kept')  # Saved progress: the directory stays.
    kept = run_dir.finish_failed_run(RunFailed(message), str(folder), is_new_run=True)
    assert kept.message == f'{message.rstrip(".")}. The traceback is in {folder / "log.txt"}'
    (tmp_path / 'new').mkdir()  # Nothing saved: the directory goes, the log is kept elsewhere.
    removed = run_dir.finish_failed_run(RunFailed(message), str(tmp_path / 'new'), is_new_run=True)
    assert removed.message.startswith(f'{message.rstrip(".")}. Removed the run directory ')
    os.remove(removed.message.rsplit(' ', 1)[-1])
