"""train.py: the options tree of every preset and architecture, run descriptions and directories, flag errors,
resuming, process launch.

The option builder is tested against stand-ins for what lives in other modules (the dataset, the metric
registry, the augmentation preset table, CUDA), so these tests need no image files and no GPU; see
`stand_ins()`. The golden option trees under tests/golden/train_options/ were produced by this module and
checked by hand against the official formulas; to rewrite them after an intended change:

    PYTHONPATH=. python tests/test_train_options.py --regenerate
"""

import contextlib
import json
import os
import socket
import sys
from unittest import mock

import click
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from runner import metric_plan
from runner import options as option_builder
from runner import run_dir as run_dirs
from training import checkpoint, networks
from training.augment import AUGPIPE_SPECS

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'train_options')
ARCHS = ('orig', 'skip', 'resnet', 'squeeze')
# The resolution each golden preset is built for (only `auto` depends on it).
GOLDEN_RESOLUTIONS = dict(auto=256, stylegan2=1024, paper256=256, paper512=512, paper1024=1024, cifar=32)

# ----------------------------------------------------------------------------
# Stand-ins.

# The official augmentation presets, composed from their groups: blit, geometric, color, filter, noise, cutout.
_BLIT = dict(xflip=1, rotate90=1, xint=1)
_GEOM = dict(scale=1, rotate=1, aniso=1, xfrac=1)
_COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
OFFICIAL_AUGPIPE_SPECS = dict(
    blit=_BLIT, geom=_GEOM, color=_COLOR, filter=dict(imgfilter=1), noise=dict(noise=1), cutout=dict(cutout=1),
    bg={**_BLIT, **_GEOM},
    bgc={**_BLIT, **_GEOM, **_COLOR},
    bgcf={**_BLIT, **_GEOM, **_COLOR, 'imgfilter': 1},
    bgcfn={**_BLIT, **_GEOM, **_COLOR, 'imgfilter': 1, 'noise': 1},
    bgcfnc={**_BLIT, **_GEOM, **_COLOR, 'imgfilter': 1, 'noise': 1, 'cutout': 1},
)


class FakeData:
    """What `train.inspect_dataset` would find in a dataset; tests change the fields they need."""

    def __init__(self):
        self.name, self.resolution, self.has_labels, self.size = 'fakedata', 256, False, 1000
        self.num_channels = 3
        self.seen = []
        self.detector_checks = []   # (metrics, detector_dir) of every check_metrics_ready call.
        self.snapshot = None        # What inspect_snapshot finds; None = fits the data.

    def __call__(self, training_set_kwargs):
        self.seen.append(dict(training_set_kwargs))
        return dnnlib.EasyDict(name=self.name, resolution=self.resolution, has_labels=self.has_labels,
                               size=self.size, num_channels=self.num_channels, label_dim=10 if self.has_labels else 0)

    def check_metrics_ready(self, metrics, detector_dir):
        self.detector_checks.append((list(metrics), detector_dir))

    def inspect_snapshot(self, path_or_url):
        if self.snapshot is not None:
            return self.snapshot
        net = dnnlib.EasyDict(img_resolution=self.resolution, img_channels=self.num_channels, c_dim=0)
        return dnnlib.EasyDict(networks=dict(G=net, D=net, G_ema=net))


@contextlib.contextmanager
def stand_ins(data=None, cuda_devices=0):
    """Replace the hooks of the option builder (runner/options.py) into other modules: dataset, CUDA,
    checkpoints; and train.py's check of the metrics' files."""
    data = data or FakeData()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(option_builder, 'inspect_dataset', data))
        stack.enter_context(mock.patch.object(option_builder, '_cuda_device_count', lambda: cuda_devices))
        stack.enter_context(mock.patch.object(metric_plan, 'check_metrics_ready', data.check_metrics_ready))
        stack.enter_context(mock.patch.object(option_builder, 'inspect_snapshot', data.inspect_snapshot))
        yield data


@pytest.fixture
def fake_data():
    with stand_ins() as data:
        yield data


def build(**opts):
    """setup_training_options on the CPU (unless told otherwise), as plain JSON data."""
    opts.setdefault('data', 'fakedata')
    opts.setdefault('device', 'cpu')
    run_desc, args = train.setup_training_options(**opts)
    return run_desc, json.loads(json.dumps(args))


def cli(args, **kwargs):
    return CliRunner().invoke(train.main, args, **kwargs)


# ----------------------------------------------------------------------------
# Golden option trees: every preset x every synthesis architecture.


def golden_case(cfg, arch):
    """The options of one golden file, and the tree the builder makes from them (inside stand_ins())."""
    data = FakeData()
    data.resolution = GOLDEN_RESOLUTIONS[cfg]
    opts = dict(data='fakedata', cfg=cfg, arch=arch, gpus=1, device='cpu')
    with stand_ins(data):
        run_desc, args = build(**opts)
    return dict(opts=opts, resolution=data.resolution, run_desc=run_desc, args=args)


def golden_path(cfg, arch):
    return os.path.join(GOLDEN_DIR, f'{cfg}-{arch}.json')


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('cfg', train.CFG_NAMES)
def test_golden_options(cfg, arch):
    with open(golden_path(cfg, arch)) as f:
        golden = json.load(f)
    case = golden_case(cfg, arch)
    assert case['run_desc'] == golden['run_desc']
    assert case['args'] == golden['args']


def regenerate_goldens():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for cfg in train.CFG_NAMES:
        for arch in ARCHS:
            with open(golden_path(cfg, arch), 'w') as f:
                json.dump(golden_case(cfg, arch), f, indent=2)
                f.write('\n')
            print(f'wrote {golden_path(cfg, arch)}')


# ----------------------------------------------------------------------------
# Formulas and the preset table.


@pytest.mark.parametrize('res, gpus, mb, mbstd, channel_base, lr, gamma, ema', [
    (256, 1, 16, 4, 16384, 0.0025, 0.8192, 5.0),
    (1024, 8, 32, 4, 32768, 0.002, 6.5536, 10.0),
    (32, 2, 64, 4, 16384, 0.0025, 0.0032, 20.0),
    (512, 3, 24, 4, 32768, 0.0025, 0.0002 * 512 ** 2 / 24, 7.5),
    (4, 1, 32, 4, 16384, 0.0025, 0.0002 * 16 / 32, 10.0),
])
def test_auto_formulas(fake_data, res, gpus, mb, mbstd, channel_base, lr, gamma, ema):
    fake_data.resolution = res
    run_desc, args = build(cfg='auto', gpus=gpus)
    assert run_desc == f'fakedata-auto{gpus}'
    assert args['num_gpus'] == gpus
    assert args['batch_size'] == mb and args['batch_gpu'] == mb // gpus
    assert args['D_kwargs']['epilogue_kwargs']['mbstd_group_size'] == mbstd
    assert args['G_kwargs']['synthesis_kwargs']['channel_base'] == args['D_kwargs']['channel_base'] == channel_base
    assert args['G_opt_kwargs']['lr'] == args['D_opt_kwargs']['lr'] == lr
    assert args['loss_kwargs']['r1_gamma'] == pytest.approx(gamma, rel=1e-12)
    assert args['ema_kimg'] == pytest.approx(ema) and args['ema_rampup'] == 0.05
    assert args['G_kwargs']['mapping_kwargs']['num_layers'] == 2


# SPEC section 3: (batch, gamma, ema kimg, mapping layers, channel_base, lr, mbstd group).
SPEC_PRESETS = dict(
    stylegan2=(32, 10, 10, 8, 32768, 0.002, 4),
    paper256=(64, 1, 20, 8, 16384, 0.0025, 8),
    paper512=(64, 0.5, 20, 8, 32768, 0.0025, 8),
    paper1024=(32, 2, 10, 8, 32768, 0.002, 4),
    cifar=(64, 0.01, 500, 2, 32768, 0.0025, 32),
)


@pytest.mark.parametrize('cfg', list(SPEC_PRESETS))
def test_presets_match_spec(fake_data, cfg):
    batch, gamma, ema, layers, channel_base, lr, mbstd = SPEC_PRESETS[cfg]
    run_desc, args = build(cfg=cfg, gpus=train.PRESETS[cfg].ref_gpus)
    assert run_desc == f'fakedata-{cfg}'
    assert args['batch_size'] == batch and args['batch_gpu'] == batch // train.PRESETS[cfg].ref_gpus
    assert args['loss_kwargs']['r1_gamma'] == gamma
    assert args['ema_kimg'] == ema
    assert args['G_kwargs']['mapping_kwargs']['num_layers'] == layers
    assert args['G_kwargs']['synthesis_kwargs']['channel_base'] == channel_base
    assert args['G_opt_kwargs'] == dict(class_name='torch.optim.Adam', lr=lr, betas=[0.0, 0.99], eps=1e-8)
    assert args['D_kwargs']['epilogue_kwargs']['mbstd_group_size'] == mbstd
    assert args['ema_rampup'] == (0.05 if cfg == 'cifar' else None)
    assert args['total_kimg'] == (100000 if cfg == 'cifar' else 25000)
    if cfg == 'cifar':
        assert args['loss_kwargs'] == dict(class_name='training.loss.StyleGAN2Loss', r1_gamma=0.01, pl_weight=0,
                                           style_mixing_prob=0)
        assert args['D_kwargs']['architecture'] == 'orig'
    else:
        assert 'architecture' not in args['D_kwargs']


def test_common_fields(fake_data):
    _, args = build()
    assert list(args) == ['training_set_kwargs', 'data_loader_kwargs', 'G_kwargs', 'D_kwargs', 'G_opt_kwargs',
                          'D_opt_kwargs', 'augment_kwargs', 'loss_kwargs', 'metrics', 'random_seed', 'num_gpus',
                          'batch_size', 'batch_gpu', 'ema_kimg', 'ema_rampup', 'G_reg_interval', 'D_reg_interval',
                          'augment_p', 'ada_target', 'ada_kimg', 'total_kimg', 'kimg_per_tick',
                          'image_snapshot_ticks', 'network_snapshot_ticks', 'resume_pkl', 'resume_state',
                          'cudnn_benchmark', 'allow_tf32', 'device_type', 'detector_dir', 'state_kimg',
                          'stop_snapshot']
    assert args['training_set_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset', path='fakedata',
                                               use_labels=False, max_size=1000, xflip=False, resolution=256,
                                               random_seed=0)
    assert args['data_loader_kwargs'] == dict(pin_memory=True, num_workers=3, prefetch_factor=2)
    assert args['G_kwargs']['z_dim'] == args['G_kwargs']['w_dim'] == 512
    synthesis = args['G_kwargs']['synthesis_kwargs']
    assert synthesis == dict(channel_base=16384, channel_max=512, num_fp16_res=4, conv_clamp=256, architecture='skip')
    assert (args['D_kwargs']['num_fp16_res'], args['D_kwargs']['conv_clamp']) == (4, 256)
    assert args['metrics'] == ['fid50k_full'] and args['random_seed'] == 0
    assert (args['G_reg_interval'], args['D_reg_interval'], args['kimg_per_tick']) == (4, 16, 4)
    assert args['augment_kwargs'] == dict(class_name='training.augment.AugmentPipe', **OFFICIAL_AUGPIPE_SPECS['bgc'])
    assert (args['augment_p'], args['ada_target'], args['ada_kimg']) == (0.0, 0.6, 500)
    assert args['image_snapshot_ticks'] == args['network_snapshot_ticks'] == 50
    assert args['resume_pkl'] is None and args['resume_state'] is None
    assert args['cudnn_benchmark'] is True and args['allow_tf32'] is False
    # The dataset was opened with labels on, to learn whether it has them.
    assert fake_data.seen[-1]['use_labels'] is True
    # The feature network of every metric was looked for before anything else happens.
    assert fake_data.detector_checks[-1] == (['fid50k_full'], None)
    assert args['detector_dir'] is None and args['device_type'] in ('cpu', 'cuda')


def test_switches(fake_data):
    fake_data.has_labels = True
    run_desc, args = build(fp32=True, nhwc=True, nobench=True, allow_tf32=True, freezed=10, workers=0, seed=7,
                           snap=5, metrics='fid50k_full,kid50k_full', cond=True, subset=100, mirror=True)
    assert run_desc == 'fakedata-cond-subset100-mirror-auto1-freezed10'
    synthesis, D = args['G_kwargs']['synthesis_kwargs'], args['D_kwargs']
    assert synthesis['num_fp16_res'] == D['num_fp16_res'] == 0
    assert synthesis['conv_clamp'] is None and D['conv_clamp'] is None
    assert synthesis['fp16_channels_last'] is True and D['block_kwargs']['fp16_channels_last'] is True
    assert D['block_kwargs']['freeze_layers'] == 10
    assert args['cudnn_benchmark'] is False and args['allow_tf32'] is True
    assert args['data_loader_kwargs'] == dict(pin_memory=True, num_workers=0)  # No prefetch_factor without workers.
    assert args['random_seed'] == 7 and args['training_set_kwargs']['random_seed'] == 7
    assert args['image_snapshot_ticks'] == args['network_snapshot_ticks'] == 5
    assert args['metrics'] == ['fid50k_full', 'kid50k_full']
    tsk = args['training_set_kwargs']
    assert (tsk['use_labels'], tsk['max_size'], tsk['xflip']) == (True, 100, True)
    assert build(metrics='none')[1]['metrics'] == []
    assert build(metrics=[])[1]['metrics'] == []


def test_options_build_networks_of_the_spec_size(fake_data):
    # The trees are valid constructor arguments, and give the parameter counts of SPEC section 1.
    def count(args, which):
        kwargs = dict(args[which], c_dim=0, img_resolution=fake_data.resolution, img_channels=3)
        return sum(p.numel() for p in dnnlib.util.construct_class_by_name(**kwargs).parameters())
    fake_data.resolution = 32
    _, args = build(cfg='cifar', arch='squeeze')
    assert count(args, 'G_kwargs') == 15_552_084
    _, args = build(cfg='cifar')
    assert count(args, 'D_kwargs') == 20_720_641
    fake_data.resolution = 256
    _, args = build(cfg='paper256', arch='squeeze', squeeze_r=8)
    assert count(args, 'G_kwargs') == 21_788_217


# ----------------------------------------------------------------------------
# Run descriptions and directories.


@pytest.mark.parametrize('opts, desc', [
    (dict(cfg='paper256', arch='squeeze'), 'fakedata-paper256-squeeze-r8'),
    (dict(cfg='paper256', arch='squeeze', squeeze_r=16, squeeze_noblend=True, squeeze_torgb='conv0'),
     'fakedata-paper256-squeeze-r16-noblend-torgbconv0'),
    (dict(cfg='paper256', arch='skip'), 'fakedata-paper256'),
    (dict(cfg='stylegan2', arch='resnet', mirror=True), 'fakedata-mirror-stylegan2-resnet'),
    (dict(gamma=0.5, kimg=1000, batch=32), 'fakedata-auto1-gamma0.5-kimg1000-batch32'),
    (dict(aug='ada'), 'fakedata-auto1-ada'),
    (dict(aug='noaug'), 'fakedata-auto1-noaug'),
    (dict(aug='fixed', p=0.25), 'fakedata-auto1-fixed-p0.25'),
    (dict(target=0.7, augpipe='bgcfnc'), 'fakedata-auto1-target0.7-bgcfnc'),
    (dict(augpipe='bgc'), 'fakedata-auto1-bgc'),
    (dict(resume='ffhq256', freezed=4), 'fakedata-auto1-resumeffhq256-freezed4'),
    (dict(resume='https://example.com/net.pkl'), 'fakedata-auto1-resumecustom'),
    (dict(resume='noresume'), 'fakedata-auto1-noresume'),
    (dict(gpus=0), 'fakedata-auto1'),
    (dict(gpus=4), 'fakedata-auto4'),
    (dict(fp32=True, nhwc=True, nobench=True, allow_tf32=True, workers=1, snap=10, seed=3), 'fakedata-auto1'),
    # StyleGAN3's flags: --batch-gpu changes memory use only; --desc comes last.
    (dict(cfg='paper256', glr=0.002, dlr=0.001, mbstd_group=4, map_depth=2, batch_gpu=4, desc='try1'),
     'fakedata-paper256-map2-glr0.002-dlr0.001-mbstd4-try1'),
    (dict(detector_dir='/data/detectors', tick=1), 'fakedata-auto1'),
])
def test_run_desc(fake_data, opts, desc):
    assert build(**opts)[0] == desc


def test_stylegan3_flags(fake_data):
    _, args = build(cfg='paper256', glr=0.002, dlr=0.001, mbstd_group=2, map_depth=3, batch_gpu=4, gpus=2)
    assert (args['G_opt_kwargs']['lr'], args['D_opt_kwargs']['lr']) == (0.002, 0.001)
    assert args['D_kwargs']['epilogue_kwargs']['mbstd_group_size'] == 2
    assert args['G_kwargs']['mapping_kwargs']['num_layers'] == 3
    assert (args['batch_size'], args['batch_gpu'], args['num_gpus']) == (64, 4, 2)  # Eight rounds per step.
    with pytest.raises(train.UserError, match='--batch-gpu'):
        build(cfg='paper256', batch_gpu=5)
    with pytest.raises(train.UserError, match=r'minibatch-std group of D \(3\) must divide the per-GPU batch \(4\)'):
        build(cfg='paper256', mbstd_group=3, batch_gpu=4)
    with pytest.raises(train.UserError, match='--desc may hold'):
        build(desc='a/b')
    # --map is the alias the README used to document; both spellings reach the same option.
    for flag in ('--map=3', '--map-depth=3'):
        result = cli(['--outdir=x', '--data=fakedata', '--gpus=0', '--dry-run', '--metrics=none', flag])
        assert result.exit_code == 0 and '"num_layers": 3' in result.output, result.output


@pytest.mark.parametrize('name', ['gamma', 'kimg', 'p', 'target', 'tick', 'glr', 'dlr'])
@pytest.mark.parametrize('value', ['nan', 'inf'])
def test_non_finite_numbers_are_refused(fake_data, name, value):
    # Checked once, by the click type (FiniteFloatRange); the builder takes the values click accepts.
    argv = ['--outdir=x', '--data=fakedata', '--gpus=0', '--dry-run', f'--{name}={value}']
    result = cli(argv + (['--aug=fixed'] if name == 'p' else []))
    # inf of a bounded option (--p, --target) already fails the range check.
    assert result.exit_code == 2 and f"Invalid value for '--{name}': {value} is not" in result.output, result.output


def test_feature_networks_are_checked_with_the_detector_dir(fake_data):
    build(metrics='fid50k_full,pr50k3_full', detector_dir='/data/detectors')
    assert fake_data.detector_checks[-1] == (['fid50k_full', 'pr50k3_full'], '/data/detectors')
    count = len(fake_data.detector_checks)
    build(metrics='none')
    build(check_files=False)  # Under torchrun the other ranks leave this to rank 0.
    assert len(fake_data.detector_checks) == count + 1 and fake_data.detector_checks[-1] == ([], None)


def test_resume_snapshot_must_fit_the_data(fake_data, tmp_path):
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(b'')
    net = dnnlib.EasyDict(img_resolution=512, img_channels=3, c_dim=0)
    fake_data.snapshot = dnnlib.EasyDict(networks=dict(G_ema=net))
    with pytest.raises(train.UserError, match='makes 512x512 images, but the training data is 256x256'):
        build(resume=str(pkl))
    net.img_resolution, net.img_channels = 256, 1
    with pytest.raises(train.UserError, match='has 1 image channel.s., but the training data has 3'):
        build(resume=str(pkl))
    net.img_channels, net.c_dim = 3, 10  # Another label count is a transfer, not a mistake.
    assert build(resume=str(pkl))[1]['resume_pkl'] == str(pkl)
    fake_data.snapshot = dnnlib.EasyDict(networks={})
    with pytest.raises(train.UserError, match='holds none of the networks'):
        build(resume=str(pkl))
    build(resume=str(pkl), check_files=False)  # Not opened at all.


def test_outdir_checks(tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(train.UserError, match='is a file, not a directory'):
        train.check_outdir(str(tmp_path / 'file' / 'runs' / 'deeper'))
    train.check_outdir(str(tmp_path / 'new' / 'runs'))  # Made later, under a writable folder.
    assert not (tmp_path / 'new').exists()
    monkeypatch.setattr(train.os, 'access', lambda path, mode: False)
    with pytest.raises(train.UserError, match='is not writable'):
        train.check_outdir(str(tmp_path / 'new' / 'runs'))


def test_run_dir_numbering(tmp_path):
    outdir = str(tmp_path / 'runs')
    assert train.next_run_dir(outdir, 'x') == os.path.join(outdir, '00000-x')
    os.makedirs(os.path.join(outdir, '00000-fakedata-auto1'))
    os.makedirs(os.path.join(outdir, '00007-other'))
    os.makedirs(os.path.join(outdir, 'notes'))
    (tmp_path / 'runs' / '00099-a-file').write_text('')  # Only directories count.
    assert train.next_run_dir(outdir, 'fakedata-paper256-squeeze-r8') == \
        os.path.join(outdir, '00008-fakedata-paper256-squeeze-r8')


def test_dry_run_prints_tree_and_creates_nothing(fake_data, tmp_path):
    outdir = tmp_path / 'runs'
    result = cli(['--outdir', str(outdir), '--data', 'fakedata', '--cfg', 'paper256', '--arch', 'squeeze',
                  '--gpus=0', '--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output
    tree = json.loads(text[text.index('{'):text.index('\n}\n') + 2])
    assert tree['G_kwargs']['synthesis_kwargs']['architecture'] == 'squeeze'
    assert tree['G_kwargs']['synthesis_kwargs']['squeeze_r'] == 8
    assert os.path.join(str(outdir), '00000-fakedata-paper256-squeeze-r8') in text
    assert not outdir.exists()


def test_launch_writes_options_and_numbers_runs(fake_data, tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(train, 'launch_training', lambda args, device_type: launched.append((args, device_type)))
    outdir = tmp_path / 'runs'
    for _ in range(2):
        result = cli(['--outdir', str(outdir), '--data', 'fakedata', '--cfg=paper256', '--arch=squeeze', '--gpus=0'])
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['00000-fakedata-paper256-squeeze-r8', '00001-fakedata-paper256-squeeze-r8']
    args, device_type = launched[1]
    assert device_type == 'cpu' and args.run_dir == str(outdir / '00001-fakedata-paper256-squeeze-r8')
    with open(os.path.join(args.run_dir, 'training_options.json')) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(args))
    assert list(written) == list(args)  # Written in the order built, not sorted.
    assert written['G_kwargs']['synthesis_kwargs']['squeeze_r'] == 8


def test_existing_run_dir_is_not_overwritten(fake_data, tmp_path, monkeypatch):
    _, args = train.setup_training_options(data='fakedata', device='cpu')
    monkeypatch.setattr(run_dirs, 'next_run_dir', lambda outdir, desc: os.path.join(outdir, '00000-taken'))
    os.makedirs(tmp_path / '00000-taken')
    with pytest.raises(train.UserError, match='already exists'):
        train.prepare_run_dir(args, str(tmp_path), 'taken')


# ----------------------------------------------------------------------------
# Errors: each bad flag gives its own message, exit code != 0 and no traceback.


@pytest.mark.parametrize('argv, message', [
    (['--cfg=paper256', '--batch=30', '--gpus=4', '--device=cpu'], 'must be a multiple of the number of GPUs (4)'),
    (['--cfg=stylegan2', '--gpus=3', '--device=cpu'], 'must be a multiple of the number of GPUs (3)'),
    (['--cfg=stylegan2', '--gpus=6', '--device=cpu'], 'must be a multiple of the number of GPUs (6)'),
    (['--cfg=paper256', '--batch=24', '--gpus=2', '--device=cpu'], 'minibatch-std group of D (8)'),
    (['--p=0.3'], '--p can only be given with --aug=fixed'),
    (['--aug=ada', '--p=0.3'], '--p can only be given with --aug=fixed'),
    (['--aug=fixed'], '--aug=fixed requires --p'),
    (['--aug=noaug', '--target=0.5'], '--target can only be given with --aug=ada'),
    (['--aug=noaug', '--augpipe=bgc'], '--augpipe cannot be given with --aug=noaug'),
    (['--cond=1'], '--cond=1 needs labels'),
    (['--subset=1001'], '--subset must be between 1 and the dataset size (1000)'),
    (['--resume=/no/such/file.pkl'], '"/no/such/file.pkl" does not exist'),
    (['--squeeze-r=4'], '--squeeze-r applies only to --arch=squeeze'),
    (['--arch=resnet', '--squeeze-noblend=1'], '--squeeze-noblend applies only to --arch=squeeze'),
    (['--squeeze-torgb=conv0'], '--squeeze-torgb applies only to --arch=squeeze'),
    (['--device=cuda', '--gpus=0'], 'contradicts --device=cuda'),
    (['--metrics=fid50k_full,bogus'], "unknown metric 'bogus'"),
    (['--metrics=none,fid50k_full'], '"none" cannot be combined'),
    (['--cfg=paper9000'], "'paper9000' is not one of"),
    (['--arch=skipp'], "'skipp' is not one of"),
    (['--squeeze-r=0', '--arch=squeeze'], '0 is not in the range x>=1'),
    (['--mirror=maybe'], "'maybe' is not a valid boolean"),
    (['--workers=-1'], 'not in the range x>=0'),
])
def test_bad_flags(fake_data, tmp_path, argv, message):
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--gpus=0', '--dry-run'] + argv)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert 'Traceback' not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize('argv, message', [
    (['--gpus=2'], 'use --gpus=0'),
    (['--device=cuda', '--gpus=1'], 'PyTorch sees no CUDA device'),
])
def test_cuda_is_needed_by_the_run_not_by_the_dry_run(fake_data, tmp_path, argv, message):
    # A login node without GPUs prepares a GPU job: --dry-run takes --gpus at its word.
    result = cli(['--outdir', str(tmp_path / 'runs'), '--data=fakedata', '--dry-run'] + argv)
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    result = cli(['--outdir', str(tmp_path / 'runs'), '--data=fakedata'] + argv)
    assert result.exit_code != 0 and message in result.output and 'Traceback' not in result.output
    assert not (tmp_path / 'runs').exists()


def test_data_errors_come_before_device_errors(fake_data, tmp_path):
    fake_data.resolution = 48
    result = cli(['--outdir', str(tmp_path / 'runs'), '--data=fakedata', '--gpus=1'])
    assert result.exit_code != 0 and '--data' in result.output and 'CUDA' not in result.output, result.output
    assert not (tmp_path / 'runs').exists()


def test_missing_data_and_bad_resolution(fake_data, tmp_path):
    result = cli(['--outdir', str(tmp_path), '--gpus=0', '--dry-run'])
    assert result.exit_code != 0 and '--data is required' in result.output
    fake_data.resolution = 48
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--dry-run', '--gpus=0'])
    assert result.exit_code != 0 and 'training needs a power of two' in result.output


def test_missing_outdir_for_a_real_run(fake_data):
    result = cli(['--data=fakedata', '--gpus=0'])
    assert result.exit_code != 0 and '--outdir is required' in result.output


def test_augpipe_presets_are_the_real_table():
    # The golden trees were made with this table; the builder reads training/augment.py's own.
    assert {name: dict(spec) for name, spec in AUGPIPE_SPECS.items()} == OFFICIAL_AUGPIPE_SPECS
    assert set(train.AUGPIPE_NAMES) == set(AUGPIPE_SPECS)


@pytest.mark.parametrize('spelling, value', [
    ('--mirror', True), ('--mirror=1', True), ('--mirror=true', True), ('--mirror=yes', True),
    ('--mirror=0', False), ('--mirror=false', False), ('--mirror=no', False),
])
def test_bool_spellings(fake_data, tmp_path, spelling, value):
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--gpus=0', '--dry-run', spelling])
    assert result.exit_code == 0, result.output
    assert ('"xflip": true' in result.output) == value
    assert ('-mirror-auto1' in result.output) == value


def test_bool_flag_followed_by_another_option(fake_data, tmp_path):
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--mirror', '--fp32', '--gpus=0', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert '"xflip": true' in result.output and '"num_fp16_res": 0' in result.output


# ----------------------------------------------------------------------------
# Resuming.


@pytest.mark.parametrize('name', list(train.RESUME_PRESETS))
def test_resume_presets(fake_data, name):
    run_desc, args = build(resume=name)
    assert run_desc == f'fakedata-auto1-resume{name}'
    assert args['resume_pkl'].startswith('https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/'
                                         'transfer-learning-source-nets/')
    assert args['resume_pkl'].endswith('.pkl') and args['resume_state'] is None
    assert args['ema_rampup'] is None and args['ada_kimg'] == 100


def test_resume_custom_pkl(fake_data, tmp_path):
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(b'')
    run_desc, args = build(resume=str(pkl))
    assert run_desc == 'fakedata-auto1-resumecustom' and args['resume_pkl'] == str(pkl)


def write_state(run_dir, options):
    """A real training-state file (training/checkpoint.py) holding `options` and no weights."""
    checkpoint.save_training_state(str(run_dir / 'training-state.pt'),
                                   dict(options=options, progress={}, networks={}, optimizers={}))


@pytest.fixture
def stored_run(fake_data, tmp_path):
    """A run directory with a training state; tests that change `stored` write it again with write_state."""
    _, stored = build(cfg='paper256', arch='squeeze', gpus=8)
    run_dir = tmp_path / '00003-fakedata-paper256-squeeze-r8'
    run_dir.mkdir()
    # What the training loop records besides these options: where it ran, and per-process values.
    stored.update(run_dir='/somewhere/else/00003-fakedata-paper256-squeeze-r8', rank=0, device=None, ada_interval=4)
    write_state(run_dir, stored)
    return run_dir, stored


def test_resume_state_continues_the_run(stored_run, capsys):
    run_dir, stored = stored_run
    run_desc, args = build(resume=str(run_dir), data=None)
    assert run_desc == 'fakedata-paper256-squeeze-r8'
    assert args['run_dir'] == str(run_dir)
    assert args['resume_state'] == str(run_dir / 'training-state.pt')
    assert 'rank' not in args and 'device' not in args  # The launcher passes these to each process.
    for key in stored:
        if key not in ('run_dir', 'resume_state', 'rank', 'device'):
            assert args[key] == stored[key], key
    # Without --gpus the stored process count stays; the state's file itself works as well as its directory.
    run_desc, args = train.setup_training_options(resume=str(run_dir / 'training-state.pt'), device='cpu')
    assert (args.num_gpus, args.batch_gpu) == (8, 8)
    assert 'ignored' not in capsys.readouterr().err


def test_resume_state_overrides(stored_run, capsys):
    run_dir, stored = stored_run
    _, args = build(resume=str(run_dir), kimg=30000, snap=7, metrics='kid50k_full', workers=0, gpus=4,
                    cfg='cifar', gamma=3.0, mirror=True)
    assert args['total_kimg'] == 30000
    assert args['image_snapshot_ticks'] == args['network_snapshot_ticks'] == 7
    assert args['metrics'] == ['kid50k_full']
    assert args['data_loader_kwargs'] == dict(pin_memory=True, num_workers=0)
    assert (args['num_gpus'], args['batch_size'], args['batch_gpu']) == (4, 64, 8)
    # Flags that the state fixes are reported and ignored.
    err = capsys.readouterr().err
    assert '--mirror, --cfg, --gamma ignored' in err
    assert args['loss_kwargs'] == stored['loss_kwargs'] and args['training_set_kwargs'] == stored['training_set_kwargs']
    # More processes than the stored per-GPU batch allows: each gets an equal share.
    _, args = build(resume=str(run_dir), gpus=16)
    assert (args['num_gpus'], args['batch_gpu']) == (16, 4)
    _, args = build(resume=str(run_dir), gpus=0)
    assert (args['num_gpus'], args['batch_gpu']) == (1, 8)


def test_resume_state_continues_on_the_device_it_ran_on(stored_run, tmp_path):
    # A run started with --gpus=0 recorded device_type 'cpu'; `--resume=<run dir>` alone continues it there,
    # on a machine without CUDA (the stand-in sees none).
    run_dir, stored = stored_run
    stored.update(device_type='cpu', num_gpus=1, batch_gpu=64)
    write_state(run_dir, stored)
    run_desc, args, launch = train.build_training_plan(resume=str(run_dir))
    assert launch == dict(num_gpus=1, device_type='cpu') and args.device_type == 'cpu'
    # A recorded CUDA run still asks for CUDA; --device=cpu moves it.
    stored.update(device_type='cuda')
    write_state(run_dir, stored)
    with pytest.raises(train.UserError, match='PyTorch sees no CUDA device'):
        train.build_training_plan(resume=str(run_dir))
    assert train.build_training_plan(resume=str(run_dir), device='cpu')[2].device_type == 'cpu'
    # --batch-gpu may change on resume (the out-of-memory fix).
    _, args, _ = train.build_training_plan(resume=str(run_dir), device='cpu', batch_gpu=16)
    assert (args.batch_size, args.batch_gpu) == (64, 16)


def test_resume_state_on_moved_data(stored_run, fake_data, capsys):
    run_dir, stored = stored_run
    _, args = build(resume=str(run_dir), data='/new/place/fakedata.zip')
    assert args['training_set_kwargs']['path'] == '/new/place/fakedata.zip'
    assert fake_data.seen[-2]['path'] == '/new/place/fakedata.zip' and fake_data.seen[-2]['max_size'] is None
    assert 'continuing on the data at "/new/place/fakedata.zip" (was "fakedata")' in capsys.readouterr().err
    fake_data.size, fake_data.resolution = 999, 128
    with pytest.raises(train.UserError, match=r'does not match the data this run was trained on \("fakedata"\): '
                                              r'128x128 images instead of 256x256; 999 images instead of 1000'):
        build(resume=str(run_dir), data='/elsewhere.zip')


def test_resume_state_under_torchrun(stored_run):
    run_dir, _ = stored_run
    dist = dict(rank=1, world_size=2, local_rank=1, master_addr='localhost', master_port=1234)
    _, args = build(resume=str(run_dir), data=None, distributed=dist)
    assert (args['num_gpus'], args['batch_gpu']) == (2, 8)


def test_resume_state_that_is_not_one(fake_data, tmp_path):
    (tmp_path / 'not-a-state.pt').write_bytes(b'junk')
    with pytest.raises(train.UserError, match='neither a .pkl snapshot nor a training-state file'):
        build(resume=str(tmp_path / 'not-a-state.pt'))


def test_resume_state_errors(stored_run, tmp_path):
    run_dir, _ = stored_run
    with pytest.raises(train.UserError, match='choose --gpus and --batch-gpu to divide it'):
        build(resume=str(run_dir), gpus=5)
    with pytest.raises(train.UserError, match="unknown metric 'bogus'"):
        build(resume=str(run_dir), metrics='bogus')
    empty = tmp_path / 'empty-run'
    empty.mkdir()
    with pytest.raises(train.UserError, match='holds no training-state.pt'):
        build(resume=str(empty))
    other = tmp_path / 'weights.bin'
    other.write_bytes(b'')
    with pytest.raises(train.UserError, match='neither a .pkl snapshot nor a training-state file'):
        build(resume=str(other))


def test_resume_state_from_the_command_line(stored_run, tmp_path, monkeypatch):
    run_dir, _ = stored_run
    launched = []
    monkeypatch.setattr(train, 'launch_training', lambda args, device_type: launched.append(args))
    result = cli(['--resume', str(run_dir), '--kimg=123', '--cfg=cifar', '--outdir', str(tmp_path / 'x'),
                  '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert '--cfg ignored' in result.output and '--outdir ignored' in result.output
    assert launched[0].run_dir == str(run_dir) and launched[0].total_kimg == 123
    with open(run_dir / 'training_options.json') as f:
        assert json.load(f)['resume_state'] == str(run_dir / 'training-state.pt')
    assert not (tmp_path / 'x').exists()
    assert sorted(os.listdir(tmp_path)) == sorted(['00003-fakedata-paper256-squeeze-r8'])


# ----------------------------------------------------------------------------
# Devices and torchrun.


def test_distributed_env():
    assert train.distributed_env({}) is None
    assert train.distributed_env({'MASTER_ADDR': 'h', 'MASTER_PORT': '1234', 'PATH': '/bin'}) is None
    env = dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='node0', MASTER_PORT='29500')
    assert train.distributed_env(env) == dict(rank=3, world_size=8, local_rank=1, master_addr='node0',
                                              master_port=29500)
    with pytest.raises(train.UserError, match='LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set'):
        train.distributed_env(dict(RANK='0', WORLD_SIZE='2'))
    with pytest.raises(train.UserError, match='not an integer'):
        train.distributed_env({**env, 'RANK': 'zero'})
    with pytest.raises(train.UserError, match='Inconsistent'):
        train.distributed_env({**env, 'RANK': '8'})


def test_resolve_launch(monkeypatch):
    monkeypatch.setattr(option_builder, '_cuda_device_count', lambda: 0)
    assert train.resolve_launch(0) == dict(num_gpus=1, device_type='cpu')
    assert train.resolve_launch(3, 'cpu') == dict(num_gpus=3, device_type='cpu')
    with pytest.raises(train.UserError, match='use --gpus=0'):
        train.resolve_launch(None)
    monkeypatch.setattr(option_builder, '_cuda_device_count', lambda: 2)
    assert train.resolve_launch(None) == dict(num_gpus=1, device_type='cuda')
    assert train.resolve_launch(2, 'cuda') == dict(num_gpus=2, device_type='cuda')
    with pytest.raises(train.UserError, match='only 2 visible'):
        train.resolve_launch(3)
    # Under torchrun the world size counts processes on every node; only the local rank needs a local GPU.
    dist = dict(rank=9, world_size=12, local_rank=1, master_addr='n', master_port=1)
    assert train.resolve_launch(None, None, dist) == dict(num_gpus=12, device_type='cuda')
    with pytest.raises(train.UserError, match='disagrees with torchrun'):
        train.resolve_launch(4, None, dist)
    with pytest.raises(train.UserError, match='only 2 visible'):
        train.resolve_launch(None, None, {**dist, 'local_rank': 2})


def test_torchrun_dry_run_uses_world_size(fake_data, tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('MASTER_ADDR', 'localhost')
    monkeypatch.setenv('MASTER_PORT', '29500')
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert '00000-fakedata-auto4' in result.output and '"num_gpus": 4' in result.output
    monkeypatch.setenv('RANK', '2')
    result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run'])
    assert result.exit_code == 0 and result.output == ''  # Only rank 0 prints.


# ----------------------------------------------------------------------------
# Launching processes (with a stand-in training loop).


def _record_loop(rank, device, run_dir, num_gpus, **_kwargs):
    """Stand-in training loop: checks the process setup and leaves a file per rank."""
    from torch_utils import training_stats
    if num_gpus > 1:
        assert torch.distributed.get_world_size() == num_gpus and torch.distributed.get_rank() == rank
        total = torch.tensor([rank + 1.0])
        torch.distributed.all_reduce(total)
        assert total.item() == num_gpus * (num_gpus + 1) / 2
        assert training_stats._state.sync_device == device
    else:
        assert training_stats._state.sync_device is None
    assert device == torch.device('cpu')
    print(f'rank {rank} of {num_gpus} ran')
    with open(os.path.join(run_dir, f'rank{rank}.txt'), 'w') as f:
        f.write('ok')


def _failing_loop(rank, device, run_dir, num_gpus, **_kwargs):
    if rank == 1:
        raise RuntimeError('rank 1 fails on purpose')
    torch.distributed.barrier()  # Rank 0 would wait here forever: the launcher must end it.


def _tiny_args(run_dir, num_gpus):
    return dnnlib.EasyDict(run_dir=str(run_dir), num_gpus=num_gpus, random_seed=0)


def test_launch_one_process_in_place(tmp_path):
    train.launch_training(_tiny_args(tmp_path, 1), 'cpu', loop=f'{__name__}._record_loop')
    assert (tmp_path / 'rank0.txt').read_text() == 'ok'
    assert 'rank 0 of 1 ran' in (tmp_path / 'log.txt').read_text()


def test_launch_two_cpu_processes(tmp_path):
    train.launch_training(_tiny_args(tmp_path, 2), 'cpu', loop=f'{__name__}._record_loop')
    assert sorted(os.listdir(tmp_path)) == ['log.txt', 'rank0.txt', 'rank1.txt']
    log = (tmp_path / 'log.txt').read_text()
    assert 'rank 0 of 2 ran' in log and 'rank 1' not in log  # Only rank 0 logs to the file.


def test_failing_rank_ends_all_ranks(tmp_path):
    # The launch returns instead of leaving rank 0 waiting at the barrier, and reports the rank that failed
    # first (rank 1's own error, not rank 0 noticing its peer died), in one line; the traceback goes to log.txt.
    with pytest.raises(train.RunFailed, match='rank 1 fails on purpose'):
        train.launch_training(_tiny_args(tmp_path, 2), 'cpu', loop=f'{__name__}._failing_loop')


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _torchrun_rank(rank, world_size, port, outdir):
    """What torchrun would start: the rendezvous in the environment, then train.py's torchrun path."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    dist = train.distributed_env(os.environ)
    args = dnnlib.EasyDict(num_gpus=world_size, random_seed=0)
    train.launch_torchrun(args, outdir, 'tiny', 'cpu', dist, loop=f'{__name__}._record_loop')


def test_torchrun_rank0_makes_the_run_dir_for_all(tmp_path):
    outdir = tmp_path / 'runs'
    torch.multiprocessing.spawn(_torchrun_rank, args=(2, _free_port(), str(outdir)), nprocs=2)
    assert os.listdir(outdir) == ['00000-tiny']
    assert sorted(os.listdir(outdir / '00000-tiny')) == ['.run.lock', 'log.txt', 'rank0.txt', 'rank1.txt',
                                                         'training_options.json']


def test_torchrun_run_dir_failure_ends_every_rank(tmp_path):
    outdir = tmp_path / 'a-file'
    outdir.write_text('')  # Rank 0 cannot make a directory here; rank 1 must not wait for it.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException,
                       match='File exists|could not prepare the run directory'):
        torch.multiprocessing.spawn(_torchrun_rank, args=(2, _free_port(), str(outdir)), nprocs=2)


# ----------------------------------------------------------------------------
# The real dataset class.


def test_inspect_real_dataset(tmp_path):
    import numpy as np
    import PIL.Image
    for i in range(3):
        PIL.Image.fromarray(np.full([8, 8, 3], i * 40, dtype=np.uint8)).save(tmp_path / f'img{i}.png')
    kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=str(tmp_path), use_labels=True,
                  max_size=None, xflip=False, resolution=None, random_seed=0)
    info = train.inspect_dataset(kwargs)
    assert info == dict(name=tmp_path.name, resolution=8, has_labels=False, size=3, num_channels=3, label_dim=0)
    with pytest.raises(click.ClickException, match='--data: '):
        train.inspect_dataset({**kwargs, 'path': str(tmp_path / 'missing')})


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    if sys.argv[1:] == ['--regenerate']:
        regenerate_goldens()
    else:
        print(__doc__)
        sys.exit(1)


def test_help_ends_with_examples_whose_flags_exist():
    result = cli(['--help'])
    assert result.exit_code == 0
    help_text, examples = result.output.split('Examples:')
    commands = [line.strip() for line in examples.splitlines() if line.strip().startswith('python train.py')]
    assert len(commands) >= 5 and result.output.rstrip().endswith('--metrics=none')
    # Every flag an example uses is an option of the script.
    for flag in {word.split('=')[0] for command in commands for word in command.split() if word.startswith('--')}:
        assert f'  {flag} ' in help_text or f'  {flag}, ' in help_text or f', {flag} ' in help_text, flag


def test_precision(fake_data):
    _, fp16 = build(cfg='paper256')
    assert 'precision' not in fp16['G_kwargs']['synthesis_kwargs'] and 'precision' not in fp16['D_kwargs']
    _, bf16 = build(cfg='paper256', precision='bf16')
    assert bf16['G_kwargs']['synthesis_kwargs']['precision'] == bf16['D_kwargs']['precision'] == 'bf16'
    assert bf16['G_kwargs']['synthesis_kwargs']['num_fp16_res'] == 4 and bf16['D_kwargs']['conv_clamp'] == 256
    _, fp32 = build(cfg='paper256', precision='fp32')
    assert fp32 == build(cfg='paper256', fp32=True)[1]
    assert fp32['G_kwargs']['synthesis_kwargs']['num_fp16_res'] == 0 and fp32['D_kwargs']['conv_clamp'] is None
    with pytest.raises(train.UserError, match='--fp32 contradicts --precision=bf16'):
        build(fp32=True, precision='bf16')
    # The option tree builds networks of this code base (the keyword exists there).
    from training import networks
    assert set(train.PRECISIONS) - {'fp32'} == set(networks.PRECISIONS)


# ----------------------------------------------------------------------------
# A synthesis block brings its own flags.


class ToyBlock(networks.SynthesisBlock):
    """Registered by the test below only: one user option, nothing else changed."""
    user_options = (networks.BlockOption('toy_gain', float, 1.0, 'Toy: gain of the block output', min=0,
                                         desc='-gain{value:g}'),)
    block_options = ('toy_gain',)


def test_a_registered_block_brings_its_flag_without_an_edit_to_train_py(fake_data, tmp_path, monkeypatch):
    monkeypatch.setitem(networks.SYNTHESIS_BLOCKS, 'toy', ToyBlock)
    command = train.make_main()
    help_text = CliRunner().invoke(command, ['--help']).output
    assert '--toy-gain FLOAT RANGE' in help_text and 'Toy: gain of the block output (--arch=toy)' in help_text
    base = ['--outdir', str(tmp_path), '--data=fakedata', '--gpus=0', '--dry-run']
    result = CliRunner().invoke(command, base + ['--arch=toy', '--toy-gain=2.5'])
    assert result.exit_code == 0, result.output
    assert '"toy_gain": 2.5' in result.output and '00000-fakedata-auto1-toy-gain2.5' in result.output
    # At its default the value is in the tree, but not in the run name.
    run_desc, args = build(arch='toy')
    assert run_desc == 'fakedata-auto1-toy' and args['G_kwargs']['synthesis_kwargs']['toy_gain'] == 1.0
    # Only with its own architecture; and the squeeze flags do not apply to it.
    result = CliRunner().invoke(command, base + ['--arch=skip', '--toy-gain=2'])
    assert result.exit_code != 0 and '--toy-gain applies only to --arch=toy (got --arch=skip)' in result.output
    result = CliRunner().invoke(command, base + ['--arch=toy', '--squeeze-r=4'])
    assert '--squeeze-r applies only to --arch=squeeze (got --arch=toy)' in result.output
    # The range comes from the declaration.
    result = CliRunner().invoke(command, base + ['--arch=toy', '--toy-gain=-1'])
    assert result.exit_code == 2 and 'x>=0' in result.output
    # The command made at import knows nothing of it.
    assert '--toy-gain' not in cli(['--help']).output

# ----------------------------------------------------------------------------
# Every option declared once (runner.options.OPTIONS and the registries' declarations).


def test_a_misspelt_keyword_to_the_builder_is_an_error_naming_it(fake_data):
    with pytest.raises(TypeError, match='gama, sqeeze_r'):
        train.build_training_plan(data='fakedata', device='cpu', gama=123.0, sqeeze_r=4)
    with pytest.raises(TypeError, match='ggdr_weigth'):
        train.setup_training_options(data='fakedata', device='cpu', reg='ggdr', ggdr_weigth=3.0)


def _other_value(option):
    """A valid value of `option` other than its default."""
    if option.choices:
        return next(choice for choice in option.choices if choice != option.default)
    if option.type is float:
        return 0.5 if option.max is not None and option.max <= 1 else 3.5
    if option.type is int:
        return (option.default or 0) + 2
    assert option.type is str, option
    return '/tmp/elsewhere'


@pytest.mark.parametrize('option', [option for option in option_builder.OPTIONS if option.tree],
                         ids=lambda option: option.name)
def test_each_declared_option_lands_where_it_says(fake_data, option):
    # The declaration alone gives the flag (with its check) and the place in the tree.
    value = not option.default if option.type is bool else _other_value(option)
    flag_value = str(int(value)) if option.type is bool else str(value)
    _desc, args = build(**{option.name: value, 'cfg': 'paper256'})
    assert value is not None and value != option.default
    for path in option.tree_paths:
        node = args
        for key in path.split('.'):
            node = node[key]
        assert node == value, path
    result = cli(['--outdir=/nonexistent', '--data=fakedata', '--device=cpu', '--dry-run', '--cfg=paper256',
                  f'{option.flag}={flag_value}'])
    assert result.exit_code == 0, result.output
    if option.min is not None and option.type in (int, float):
        result = cli(['--data=fakedata', '--dry-run', f'{option.flag}={option.min - 1}'])
        assert result.exit_code == 2 and f"Invalid value for '{option.flag}'" in result.output


def test_the_table_and_the_registries_make_every_flag_of_the_help():
    help_text = cli(['--help']).output
    names = [option.flag for option, _applies_to in option_builder.command_line_options()]
    assert len(names) == len(set(names))
    for flag in names:
        assert f'  {flag} ' in help_text or f'  {flag}, ' in help_text, flag
