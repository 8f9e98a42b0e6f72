"""train.py --reg=ggdr|glead|lecam and their combinations (SPEC §5): the options trees and run names of the
paper's rows with every --arch, the methods' flag errors (one line, before any work, nothing created), LPIPS
weights found before the run, short CPU trainings that write snapshots generate.py reads (LeCam with GGDR among them), and a regularizer
defined by a test that costs one class and one registry row. (Exact resume with each, on one and two processes:
tests/test_regularizers.py.)"""

import json
import os
from unittest import mock

import pytest
import torch
from click.testing import CliRunner
from test_train_e2e import TINY_FLAGS, dataset_zip  # noqa: F401 (a fixture)
from test_train_options import ARCHS, build, cli, stand_ins
from test_training_loop import BATCH, make_image_folder, tiny_options

import generate
import train
from torch_utils import training_stats
from training import checkpoint, lpips, regularizers
from training.decoder import FeatureDecoder
from training.flags import Option
from training.regularizers.term import Regularizer
from training.training_loop import training_loop

pytestmark = pytest.mark.usefixtures('one_thread')

PAPER256 = dict(cfg='paper256', metrics='none')


@pytest.fixture
def fake():
    """The option builder's stand-ins (test_train_options): a 256x256 dataset without image files."""
    with stand_ins() as data:
        yield data


def _decoder(args):
    return args['D_kwargs'].get('decoder_kwargs')


def _terms(args):
    return args['loss_kwargs'].get('d_terms')

# ----------------------------------------------------------------------------
# Options trees.


@pytest.mark.parametrize('arch', ARCHS)
def test_no_regularizer_leaves_the_tree_as_it_was(fake, arch):
    _desc, args = build(arch=arch, **PAPER256)
    assert _decoder(args) is None and _terms(args) is None


@pytest.mark.parametrize('arch', ARCHS)
def test_ggdr_tree_and_run_name(fake, arch):
    desc, args = build(arch=arch, reg='ggdr', **PAPER256)
    assert _decoder(args) == dict(class_name='training.decoder.FeatureDecoder', out_res=64)
    assert _terms(args) == [dict(class_name='training.regularizers.GGDRTerm', res=64, weight=10.0)]
    block = dict(squeeze='-squeeze-r8').get(arch, '' if arch == 'skip' else f'-{arch}')
    assert desc == f'fakedata-paper256{block}-ggdr64'
    # The decoder ends where G's feature is, with G's channels there (same cbase/cmax).
    synthesis = args['G_kwargs']['synthesis_kwargs']
    assert args['D_kwargs']['channel_base'] == synthesis['channel_base']


def test_ggdr_follows_the_resolution_rule_and_its_flags(fake):
    fake.resolution = 32
    desc, args = build(cfg='cifar', arch='squeeze', reg='ggdr', metrics='none')
    assert _terms(args)[0]['res'] == 8 and desc.endswith('-squeeze-r8-ggdr8')  # resolution / 4 (SPEC §5).
    desc, args = build(cfg='cifar', reg='ggdr', ggdr_res=16, ggdr_weight=5, metrics='none')
    assert _terms(args)[0] == dict(class_name='training.regularizers.GGDRTerm', res=16, weight=5.0)
    assert desc.endswith('-ggdr16w5')


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('res_g, branch', [(64, 'gfeat'), (32, 'gfwimage')])
def test_glead_tree_and_run_name(fake, tmp_path, arch, res_g, branch):
    weights = _combined_weights(tmp_path)
    desc, args = build(arch=arch, reg='glead', glead_res_g=res_g, glead_fake=branch, glead_lpips=weights, **PAPER256)
    # SPEC §5: the decoder ends at 64; feat_proj1 gives C[res_g] channels (256 at 64, 512 at 32), w has w_dim.
    assert _decoder(args) == dict(class_name='training.decoder.FeatureDecoder', out_res=64,
                                  heads=dict(img_channels=3, feat_channels={64: 256, 32: 512}[res_g], w_dim=512))
    assert _terms(args) == [dict(class_name='training.regularizers.GLeaDTerm', res_g=res_g, fake=branch,
                                 real_weight=10.0, fake_weight=None, distance='lpips', lpips_weights=weights)]
    assert desc.endswith(f'-glead{res_g}' + ('' if branch == 'gfeat' else '-gfwimage'))


def test_glead_with_mse_needs_no_file(fake):
    desc, args = build(reg='glead', glead_recon='mse', glead_real_weight=2, glead_fake_weight=1, **PAPER256)
    term = _terms(args)[0]
    assert (term['distance'], term['lpips_weights'], term['real_weight'], term['fake_weight']) == ('mse', None, 2, 1)
    assert desc.endswith('-glead64-mse')


@pytest.mark.parametrize('res, res_g', [(32, 8), (128, 32), (256, 64), (512, 64), (1024, 64)])
def test_glead_defaults_follow_the_authors_above_256(fake, res, res_g):
    # resolution / 4 (at least 8) up to 256x256; the authors' 64 above, where the decoder ends too (item 6).
    fake.resolution = res
    desc, args = build(reg='glead', glead_recon='mse', **PAPER256)
    assert _terms(args)[0]['res_g'] == res_g and desc.endswith(f'-glead{res_g}-mse')
    assert _decoder(args)['out_res'] == max(res_g, min(64, res // 4))


@pytest.mark.parametrize('arch', ARCHS)
def test_lecam_combines_with_ggdr_tree_and_run_name(fake, arch):
    desc, args = build(arch=arch, reg='lecam,ggdr', **PAPER256)
    # LeCam reads only D's logits: GGDR's decoder, and the terms in the order --reg lists them.
    assert _decoder(args) == dict(class_name='training.decoder.FeatureDecoder', out_res=64)
    assert _terms(args) == [dict(class_name='training.regularizers.lecam.LeCamTerm', weight=3e-7, decay=0.99),
                            dict(class_name='training.regularizers.GGDRTerm', res=64, weight=10.0)]
    block = dict(squeeze='-squeeze-r8').get(arch, '' if arch == 'skip' else f'-{arch}')
    assert desc == f'fakedata-paper256{block}-lecam-ggdr64'


def test_lecam_flags(fake):
    desc, args = build(reg='lecam', lecam_weight=1e-6, lecam_decay=0.9, **PAPER256)
    assert _terms(args) == [dict(class_name='training.regularizers.lecam.LeCamTerm', weight=1e-6, decay=0.9)]
    assert _decoder(args) is None and desc.endswith('-lecamw1e-06d0.9')


def _combined_weights(tmp_path):
    """A combined LPIPS file of the published shapes (random values; the lin weights non-negative)."""
    path = tmp_path / 'lpips_alex.pt'
    if not path.exists():
        torch.manual_seed(0)
        shapes = {**lpips.TRUNK_SHAPES, **lpips.LIN_SHAPES}
        lpips.save_combined({name: torch.rand(shape) for name, shape in shapes.items()}, path)
    return str(path)


def test_every_arch_with_every_reg_builds_a_matching_decoder(fake, tmp_path):
    # The decoder the tree describes really has G's feature shape at the resolution the term reads.
    from training.networks import Generator
    fake.resolution = 32
    for arch in ARCHS:
        for reg in ('ggdr', 'glead'):
            extra = dict(glead_recon='mse') if reg == 'glead' else dict()
            _desc, args = build(cfg='cifar', cbase=512, cmax=32, arch=arch, reg=reg, metrics='none', **extra)
            synthesis = dict(args['G_kwargs']['synthesis_kwargs'], num_fp16_res=0)
            G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=32, img_channels=3,
                          synthesis_kwargs=synthesis)
            term = _terms(args)[0]
            res = term.get('res') or term.get('res_g')
            _img, features = G.synthesis(torch.zeros([1, G.num_ws, 8]), return_features=[res])
            channels = {r: min(512 // r, 32) for r in (4, 8, 16, 32)}
            decoder = FeatureDecoder(channels, 32, **{k: v for k, v in _decoder(args).items() if k != 'class_name'})
            out_channels = decoder.heads.feat_proj1.out_channels if reg == 'glead' else decoder.out_channels
            assert out_channels == features[res].shape[1], (arch, reg)

# ----------------------------------------------------------------------------
# Errors: one line, before any work.


@pytest.mark.parametrize('flags, message', [
    (['--reg=ggdr', '--glead-fake=gfwimage'], '--glead-fake applies only to --reg=glead (got --reg=ggdr)'),
    (['--ggdr-res=16'], '--ggdr-res applies only to --reg=ggdr (got --reg=none)'),
    (['--reg=ggdr', '--ggdr-res=512'], '--ggdr-res must be a power of two between 8 and 256'),
    (['--reg=ggdr', '--ggdr-res=24'], '--ggdr-res must be a power of two between 8 and 256'),
    (['--reg=glead', '--glead-recon=mse', '--glead-res-g=256'], '--glead-res-g must be a power of two between 8 and 128'),
    (['--reg=glead', '--glead-lpips=/nonexistent/alex.pt'], '--glead-recon=lpips:'),
    (['--reg=glead', '--glead-fake=image'], "Invalid value for '--glead-fake'"),
    (['--reg=ggdr', '--lecam-weight=0.1'], '--lecam-weight applies only to --reg=lecam (got --reg=ggdr)'),
    (['--reg=lecam,ggdr', '--lecam-decay=1'], '--lecam-decay must be below 1, got 1'),
    (['--reg=lecam,lecam'], "Invalid value for '--reg': lecam is listed twice"),
])
def test_flag_errors_are_one_line_and_create_nothing(fake, tmp_path, flags, message):
    result = cli([f'--outdir={tmp_path / "runs"}', '--data=fakedata', '--cfg=paper256', '--metrics=none',
                  '--gpus=0', *flags])
    assert result.exit_code == 2 if 'Invalid value' in message else result.exit_code == 1, result.output
    assert message in result.output
    assert 'Traceback' not in result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_lpips_without_weights_offline_names_the_fix(fake, tmp_path):
    offline = OSError('Could not download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth: the host '
                      'name "download.pytorch.org" cannot be resolved (no network or no name server).\nplace it at')
    with mock.patch.object(regularizers.dnnlib.util, 'open_url', side_effect=offline):
        result = cli([f'--outdir={tmp_path / "runs"}', '--data=fakedata', '--cfg=paper256', '--metrics=none',
                      '--gpus=0', '--reg=glead'])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert 'cannot be resolved' in line and '--glead-lpips=TRUNK.pth,LIN.pth' in line and '--glead-recon=mse' in line
    assert not os.path.exists(tmp_path / 'runs')


def test_a_wrong_lpips_file_is_refused_before_the_run(fake, tmp_path):
    bad = tmp_path / 'bad.pt'
    torch.save({'features.0.weight': torch.zeros(1)}, bad)
    result = cli([f'--outdir={tmp_path / "runs"}', '--data=fakedata', '--cfg=paper256', '--metrics=none',
                  '--gpus=0', '--reg=glead', f'--glead-lpips={bad}'])
    assert result.exit_code == 1 and '--glead-recon=lpips:' in result.output and 'bad.pt' in result.output
    assert not os.path.exists(tmp_path / 'runs')

# ----------------------------------------------------------------------------
# Short CPU trainings.


@pytest.mark.parametrize('reg_flags, desc, stats', [
    (['--reg=lecam,ggdr', '--lecam-weight=0.1'], '-squeeze-r4-lecamw0.1-ggdr8-',
     ['Loss/D/ggdr', 'Loss/D/lecam_real', 'Loss/D/lecam_fake']),
    (['--reg=glead', '--glead-recon=mse'], '-squeeze-r4-glead8-mse-', ['Loss/D/glead_real'])])
def test_squeeze_with_a_regularizer_trains_and_snapshots(tmp_path, dataset_zip, reg_flags, desc, stats):  # noqa: F811
    result = CliRunner().invoke(train.main, [
        f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *TINY_FLAGS, '--arch=squeeze', '--squeeze-r=4',
        *reg_flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / 'runs').iterdir()
    assert desc in run_dir.name
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['D_kwargs']['decoder_kwargs']['out_res'] == 8
    record = json.loads((run_dir / 'stats.jsonl').read_text().splitlines()[-1])
    assert all(record[stat]['num'] > 0 for stat in stats), record.keys()
    result = CliRunner().invoke(generate.main, [f'--network={run_dir / "network-snapshot-000000.016.pkl"}',
                                                '--seeds=0', f'--outdir={tmp_path / "out"}'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / 'out' / 'seed0000.png')


def test_dry_run_shows_the_regularizer(fake, tmp_path):
    result = cli([f'--outdir={tmp_path / "runs"}', '--data=fakedata', '--cfg=paper256', '--metrics=none',
                  '--arch=squeeze', '--reg=ggdr', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert '"decoder_kwargs"' in result.output and '"training.regularizers.GGDRTerm"' in result.output
    assert '00000-fakedata-paper256-squeeze-r8-ggdr64' in result.output
    assert not os.path.exists(tmp_path / 'runs')

# ----------------------------------------------------------------------------
# A regularizer costs one class and one registry row.


class ToyTerm(Regularizer):
    """Registered by the test below only: D's logits of reals pulled towards 0, with a count of its passes."""

    name = 'toy'
    help = 'toy (a test)'
    options = (Option('toy_weight', float, 0.5, 'Toy: weight of the logit penalty', min=0, tree='weight',
                      desc='w{value:g}'),)
    on_reals = True

    def __init__(self, G_synthesis, device, weight=0.5):
        del G_synthesis, device
        self.weight = weight
        self.passes = 0

    def real_loss(self, record):
        if not record.main:
            return None
        self.passes += 1
        loss = record.logits.square().flatten() * self.weight
        training_stats.report('Loss/D/toy', loss)
        return loss

    def state_dict(self):
        return dict(passes=self.passes)

    def load_state_dict(self, state):
        self.passes = state['passes']


def test_a_registered_regularizer_brings_its_flag_and_trains(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(regularizers.REGULARIZERS, 'toy', f'{__name__}.ToyTerm')
    command = train.make_main()
    help_text = CliRunner().invoke(command, ['--help']).output
    assert '--toy-weight FLOAT RANGE' in help_text and 'Toy: weight of the logit penalty (--reg=toy)' in help_text
    assert 'toy (a test)' in help_text
    base = [f'--outdir={tmp_path / "runs"}', '--data=fakedata', '--cfg=paper256', '--metrics=none', '--gpus=0']
    result = CliRunner().invoke(command, base + ['--reg=lecam,toy', '--toy-weight=2', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert f'"{__name__}.ToyTerm"' in result.output and '00000-fakedata-paper256-lecam-toyw2' in result.output
    # At its default the value is in the tree, but not in the run name.
    desc, args = build(reg='toy', **PAPER256)
    assert _terms(args) == [dict(class_name=f'{__name__}.ToyTerm', weight=0.5)] and desc.endswith('-toy')
    # Only with its own --reg, in one line before any work; the range comes from the declaration.
    result = CliRunner().invoke(command, base + ['--reg=ggdr', '--toy-weight=2'])
    assert result.exit_code == 1 and '--toy-weight applies only to --reg=toy (got --reg=ggdr)' in result.output
    result = CliRunner().invoke(command, base + ['--reg=toy', '--toy-weight=-1'])
    assert result.exit_code == 2 and 'x>=0' in result.output
    assert not os.path.exists(tmp_path / 'runs')
    # The tree's term trains: it adds its loss, reports its statistic and its state goes into the training state.
    opts = tiny_options(tmp_path / 'run', make_image_folder(tmp_path / 'data'), steps=1)
    opts['loss_kwargs']['d_terms'] = _terms(args)
    os.makedirs(tmp_path / 'run')
    collector = training_stats.Collector(regex='Loss/D/toy')
    state = training_loop(**opts)
    collector.update()
    assert collector.num('Loss/D/toy') == BATCH
    assert state.optim.loss.state_dict()['d_terms'] == {'0.toy': dict(passes=2)}  # One Dmain step of two rounds.
    saved = checkpoint.load_training_state(checkpoint.find_state_file(str(tmp_path / 'run')))
    assert saved['loss']['d_terms'] == {'0.toy': dict(passes=2)}
