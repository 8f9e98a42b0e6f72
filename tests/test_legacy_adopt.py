"""Adoption: networks of official-format snapshots rebuilt as this code base's classes (training/adoption.py).

An official snapshot's networks come from the module source stored in the pickle, not from training.networks.
The tests make such pickles from tiny snapshots of ours by loading them through an import hook that changes
the stored source: by default in the way the official code differs from ours on the CPU (its fp16 blocks
compute in float16 there), so the embedded and the adopted networks really are different code.
"""

import inspect
import io
import pickle
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from test_legacy import make_discriminator, make_generator, make_snapshot
from test_persistence import _import_source

import calc_metrics
import generate
import legacy
import projector
import style_mixing
from torch_utils import misc, persistence
from training import adoption, augment, networks, snapshot_io

pytestmark = pytest.mark.usefixtures('one_thread')

# Our blocks compute fp16 only on CUDA; the official ones wherever use_fp16 is set, the CPU included.
OURS_FP16_RULE = "    if use_fp16 and not force_fp32 and ref.device.type == 'cuda':"
OFFICIAL_FP16_RULE = "    if use_fp16 and not force_fp32:"


def official_fp16_rule(src):
    assert OURS_FP16_RULE in src
    return src.replace(OURS_FP16_RULE, OFFICIAL_FP16_RULE)


def embedded(obj, patch=official_fp16_rule, module=networks):
    """`obj` pickled and loaded again with the stored source of `module` changed by `patch`: its networks and
    all their layers are then instances of classes made from that source, as those of an official snapshot are."""
    source = inspect.getsource(module)

    def hook(meta):
        if meta.module_src == source:
            meta.module_src = patch(meta.module_src)
        return meta

    persistence.import_hook(hook)
    try:
        return pickle.loads(pickle.dumps(obj))
    finally:
        persistence.remove_import_hook(hook)


def official_format_pickle(obj, **kwargs):
    """Bytes of a pickle whose networks carry the changed source (a reloaded network pickles its own source)."""
    return pickle.dumps(embedded(obj, **kwargs))


def is_embedded(net):
    return type(net).__module__.startswith('_imported_module_')


@torch.no_grad()
def fp32_outputs(data):
    """G and G_ema (const noise, with and without truncation) and D outputs, forced to fp32."""
    gen = torch.Generator().manual_seed(5)
    out = dict()
    for key in ('G', 'G_ema'):
        G = data[key]
        z = torch.randn([4, G.z_dim], generator=gen)
        c = torch.nn.functional.one_hot(torch.arange(4) % max(G.c_dim, 1), max(G.c_dim, 1)).float()[:, :G.c_dim]
        out[key] = G(z, c, noise_mode='const', force_fp32=True)
        out[key + '_trunc'] = G(z, c, truncation_psi=0.7, noise_mode='const', force_fp32=True)
    D = data['D']
    img = torch.randn([4, D.img_channels, D.img_resolution, D.img_resolution], generator=gen)
    c = torch.nn.functional.one_hot(torch.arange(4) % max(D.c_dim, 1), max(D.c_dim, 1)).float()[:, :D.c_dim]
    out['D'] = D(img, c, force_fp32=True)
    return out


@pytest.fixture(scope='module')
def fp16_snapshot():
    """A tiny snapshot whose two highest resolutions are fp16 blocks, with an augment pipe."""
    snapshot = make_snapshot(num_fp16_res=2)
    snapshot['augment_pipe'] = augment.AugmentPipe(xflip=1, rotate90=1, brightness=1).eval().requires_grad_(False)
    snapshot['augment_pipe'].p.fill_(0.375)
    return snapshot


# ----------------------------------------------------------------------------


@pytest.mark.parametrize('c_dim', [0, 3])
def test_adopted_networks_are_our_classes_and_compute_the_same(c_dim):
    snapshot = make_snapshot(c_dim=c_dim, num_fp16_res=2)
    official = embedded(snapshot)
    assert all(is_embedded(official[key]) for key in ('G', 'D', 'G_ema'))
    assert is_embedded(official['G'].synthesis.b16.conv1) and is_embedded(official['D'].b4.mbstd)

    adopted = adoption.adopt_snapshot(official)
    assert type(adopted['G']) is networks.Generator and type(adopted['G_ema']) is networks.Generator
    assert type(adopted['D']) is networks.Discriminator
    assert adopted['training_set_kwargs'] == snapshot['training_set_kwargs'] and adopted['augment_pipe'] is None
    assert all(is_embedded(official[key]) for key in ('G', 'D', 'G_ema'))  # The input dict is left alone.
    for key in ('G', 'D', 'G_ema'):
        net = adopted[key]
        assert net.init_kwargs == official[key].init_kwargs
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        for (name, a), (_, b) in zip(misc.named_params_and_buffers(net),
                                     misc.named_params_and_buffers(official[key]), strict=True):
            assert torch.equal(a, b), name

    ours, theirs = fp32_outputs(adopted), fp32_outputs(official)
    for key in ours:
        diff = (ours[key] - theirs[key]).abs().max().item()
        assert diff <= 1e-4, (key, diff)


def test_embedded_fp16_blocks_run_in_float16_on_the_cpu_and_adopted_ones_do_not(fp16_snapshot):
    # Why adoption matters: the official classes compute their fp16 blocks in float16 even on the CPU.
    official = embedded(fp16_snapshot)
    adopted = adoption.adopt_snapshot(official)
    z = torch.randn([4, 16], generator=torch.Generator().manual_seed(1))
    c = torch.zeros([4, 0])
    with torch.no_grad():
        reference = fp16_snapshot['G_ema'](z, c, noise_mode='const', force_fp32=True)
        ours = adopted['G_ema'](z, c, noise_mode='const')
        theirs = official['G_ema'](z, c, noise_mode='const')
    assert torch.equal(ours, reference)
    assert (theirs - reference).abs().max() > 1e-3  # float16 rounding.


def test_augment_pipe_is_adopted_with_its_probability(fp16_snapshot):
    official = embedded(fp16_snapshot, patch=lambda src: src + '\n# Official copy.\n', module=augment)
    assert is_embedded(official['augment_pipe'])
    pipe, note = adoption.adopt_network(official['augment_pipe'], name='augment_pipe')
    assert note is None and type(pipe) is augment.AugmentPipe
    assert pipe.p.item() == 0.375 and pipe.init_kwargs == fp16_snapshot['augment_pipe'].init_kwargs
    images = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    a = pipe(images)
    torch.manual_seed(3)
    b = official['augment_pipe'](images)
    assert torch.equal(a, b)


def test_networks_of_our_classes_are_left_alone():
    G = make_generator()
    assert adoption.adopt_network(G) == (G, None)
    assert adoption.adopt_network(None) == (None, None)


def test_loading_functions_adopt_only_when_asked(fp16_snapshot, tmp_path):
    path = tmp_path / 'official.pkl'
    path.write_bytes(official_format_pickle(fp16_snapshot))
    # load_network_pkl keeps the official behaviour for third-party callers; the scripts' load_network adopts.
    data = snapshot_io.load_network_pkl(open(path, 'rb'))
    assert all(is_embedded(data[key]) for key in ('G', 'D', 'G_ema'))
    data = snapshot_io.load_network_pkl(open(path, 'rb'), adopt=True)
    assert type(data['G']) is networks.Generator and type(data['G_ema']) is networks.Generator
    assert type(data['D']) is networks.Discriminator and type(data['augment_pipe']) is augment.AugmentPipe
    assert type(snapshot_io.load_network(str(path))) is networks.Generator
    assert type(snapshot_io.load_network(str(path), key='D')) is networks.Discriminator
    assert is_embedded(snapshot_io.load_network(str(path), adopt=False))

    fp16 = snapshot_io.load_network(str(path), force_fp16=True)
    assert type(fp16) is networks.Generator and fp16.init_kwargs.synthesis_kwargs.num_fp16_res == 4


# ----------------------------------------------------------------------------
# What stays embedded, with a note.


FOREIGN_SOURCE = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class MyD(torch.nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = torch.nn.Linear(width, 1)

        def forward(self, img, c):
            return self.fc(img.flatten(1)[:, :self.fc.in_features])

    @persistence.persistent_class
    class Discriminator(torch.nn.Module):
        def __init__(self, depth=3):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones([depth]))
''')


@pytest.fixture
def foreign_module(tmp_path):
    module = _import_source(tmp_path, 'custom_d_module', FOREIGN_SOURCE)
    yield module
    sys.modules.pop('custom_d_module', None)


def test_a_class_we_do_not_have_stays_embedded_with_a_note(foreign_module, capsys):
    G = make_generator()
    data = pickle.loads(official_format_pickle(dict(G_ema=G, D=foreign_module.MyD())))
    foreign = data['D']
    adopted = adoption.adopt_snapshot(data)
    assert type(adopted['G_ema']) is networks.Generator
    assert adopted['D'] is foreign
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Kept the snapshot's own class for D ({adoption._class_origin(type(foreign))}): this code base "
                     f"has no class named MyD (training.networks, training.augment)"]
    assert 'MyD' in lines[0]
    assert adoption.adopt_snapshot(data, verbose=False)['D'] is foreign
    assert capsys.readouterr().out == ''


def test_constructor_arguments_our_class_rejects_keep_the_embedded_class(foreign_module):
    D = foreign_module.Discriminator(depth=2)
    net, note = adoption.adopt_network(D, name='D')
    assert net is D
    assert note.startswith("Kept the snapshot's own class for D (custom_d_module.Discriminator")
    assert "training.networks.Discriminator rejects its constructor arguments (TypeError:" in note
    assert 'depth' in note and '\n' not in note


def test_tensors_that_do_not_fit_keep_the_embedded_class():
    def extra_parameter(src):
        anchor = '        self.mapping = MappingNetwork(z_dim=z_dim'
        assert anchor in src
        return src.replace(anchor, '        self.extra = torch.nn.Parameter(torch.zeros([2]))\n' + anchor)

    embedded_class = type(embedded(make_generator(), patch=extra_parameter))
    G = embedded_class(**make_generator().init_kwargs)  # A network made by the fork's own code.
    net, note = adoption.adopt_network(G, name='G_ema')
    assert net is G
    assert 'its tensors do not fit training.networks.Generator: only the snapshot has extra' in note


def test_changed_code_with_the_same_names_keeps_the_embedded_class():
    # A fork that changed what a layer computes but kept every name: only the outputs tell.
    def doubled_rgb(src):
        line = '        return bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)'
        assert line in src
        return src.replace(line, line.replace('return ', 'return 2 * '))

    G = embedded(make_generator(), patch=doubled_rgb)
    net, note = adoption.adopt_network(G, name='G_ema')
    assert net is G and 'computes other outputs (max |difference|' in note
    forced, note = adoption.adopt_network(G, name='G_ema', verify=False)
    assert type(forced) is networks.Generator and note is None

    def unscaled_projection(src):
        assert '* (1 / np.sqrt(self.cmap_dim))' in src
        return src.replace('* (1 / np.sqrt(self.cmap_dim))', '* 1')

    D = embedded(make_discriminator(c_dim=3), patch=unscaled_projection)
    net, note = adoption.adopt_network(D, name='D')
    assert net is D and 'computes other outputs' in note


# ----------------------------------------------------------------------------
# The scripts adopt by default; --adopt=0 keeps the embedded classes.


@pytest.fixture(scope='module')
def official_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp('official') / 'official.pkl'
    path.write_bytes(official_format_pickle(make_snapshot(num_fp16_res=2)))
    return str(path)


@pytest.fixture
def loaded_types(monkeypatch):
    """The classes of the networks the scripts get from snapshot_io.load_network."""
    seen = []
    real = snapshot_io.load_network

    def spy(*args, **kwargs):
        net = real(*args, **kwargs)
        seen.append(type(net))
        return net

    monkeypatch.setattr(snapshot_io, 'load_network', spy)
    return seen


@pytest.mark.parametrize('flag, expect_ours', [([], True), (['--adopt', 'true'], True), (['--adopt=0'], False)])
def test_generate_and_style_mixing_adopt_by_default(official_pkl, tmp_path, loaded_types, flag, expect_ours):
    result = CliRunner().invoke(generate.main, ['--network', official_pkl, '--seeds', '1', '--device', 'cpu',
                                                '--outdir', str(tmp_path / 'gen')] + flag)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(style_mixing.main, ['--network', official_pkl, '--rows', '1', '--cols', '2',
                                                    '--styles', '0-1', '--device', 'cpu',
                                                    '--outdir', str(tmp_path / 'mix')] + flag)
    assert result.exit_code == 0, result.output
    assert [t is networks.Generator for t in loaded_types] == [expect_ours] * 2


def test_generate_images_of_adopted_and_embedded_networks_agree(official_pkl, tmp_path):
    outs = []
    for flag in (['--adopt', '1'], ['--adopt', '0']):
        outdir = tmp_path / flag[1]
        result = CliRunner().invoke(generate.main, ['--network', official_pkl, '--seeds', '3', '--device', 'cpu',
                                                    '--outdir', str(outdir)] + flag)
        assert result.exit_code == 0, result.output
        outs.append(np.asarray(PIL.Image.open(outdir / 'seed0003.png'), dtype=np.int32))
    # The embedded network computes its fp16 blocks in float16 on the CPU: a pixel may round differently.
    assert np.abs(outs[0] - outs[1]).max() <= 2


def test_projector_adopts_by_default(official_pkl, tmp_path, loaded_types, monkeypatch):
    monkeypatch.setattr(projector, 'project', lambda G, target, **kwargs: torch.zeros([1, G.num_ws, G.w_dim]))
    monkeypatch.setattr(projector, '_load_vgg16', lambda device, detector_dir=None: None)
    monkeypatch.setattr(projector, 'find_vgg16', lambda detector_dir=None: 'vgg16.pt')
    target = tmp_path / 't.png'
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(target)
    for flag in ([], ['--adopt=false']):
        result = CliRunner().invoke(projector.main, ['--network', official_pkl, '--target', str(target),
                                                     '--save-video', '0', '--num-steps', '1', '--device', 'cpu',
                                                     '--outdir', str(tmp_path / 'out')] + flag)
        assert result.exit_code == 0, result.output
    assert [t is networks.Generator for t in loaded_types] == [True, False]


def test_calc_metrics_adopts_by_default(official_pkl):
    assert type(calc_metrics.load_snapshot(official_pkl)['G_ema']) is networks.Generator
    assert is_embedded(calc_metrics.load_snapshot(official_pkl, adopt=False)['G_ema'])


def test_script_help_documents_the_adopt_flag():
    for command in (generate.main, style_mixing.main, projector.main, calc_metrics.main, legacy.convert_network_pickle):
        result = CliRunner().invoke(command, ['--help'])
        assert result.exit_code == 0
        assert '--adopt BOOL' in result.output and 'embedded' in result.output, command.name


def test_adopted_official_pickle_survives_a_round_trip(official_pkl):
    data = snapshot_io.load_network_pkl(open(official_pkl, 'rb'), adopt=True)
    again = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(data)))
    assert type(again['G_ema']) is networks.Generator  # Our source now, so it maps back to our classes.
