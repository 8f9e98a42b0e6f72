"""training.snapshot_io and training.weights_only: snapshot pickles, the weights-only format, conversion between
them (also from the command line, legacy.py), clear errors."""

import copy
import inspect
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import legacy
from torch_utils import misc, persistence
from training import networks, snapshot_io, weights_only

pytestmark = pytest.mark.usefixtures('one_thread')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SYNTHESIS = dict(channel_base=128, channel_max=32)


def _perturbed(net, seed):
    """`net` with every float tensor moved off its initial value, so a copy that misses a tensor shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in misc.params_and_buffers(net):
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return net.eval().requires_grad_(False)


def make_generator(c_dim=0, img_channels=3, seed=0, **synthesis_kwargs):
    torch.manual_seed(seed)
    G = networks.Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=16, img_channels=img_channels,
                           mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(TINY_SYNTHESIS, **synthesis_kwargs))
    return _perturbed(G, seed + 100)


def make_discriminator(c_dim=0, seed=0):
    torch.manual_seed(seed)
    D = networks.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=128, channel_max=32)
    return _perturbed(D, seed + 200)


def make_snapshot(c_dim=0, **synthesis_kwargs):
    G = make_generator(c_dim=c_dim, **synthesis_kwargs)
    return dict(
        training_set_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='data.zip',
                                              resolution=16, use_labels=c_dim > 0, max_size=10, xflip=False),
        G                   = G,
        D                   = make_discriminator(c_dim=c_dim),
        G_ema               = _perturbed(copy.deepcopy(G), 300),
        augment_pipe        = None,
    )


def _inputs(c_dim, batch=2):
    gen = torch.Generator().manual_seed(7)
    z = torch.randn([batch, 16], generator=gen)
    c = torch.nn.functional.one_hot(torch.arange(batch) % c_dim, c_dim).float() if c_dim else torch.zeros([batch, 0])
    return z, c


@torch.no_grad()
def outputs(data):
    """Deterministic outputs of every network of a snapshot: G and G_ema with and without truncation, D."""
    result = dict()
    for key in ('G', 'G_ema'):
        if key in data:
            G = data[key]
            z, c = _inputs(G.c_dim)
            result[key] = G(z, c, noise_mode='const')
            result[key + '_trunc'] = G(z, c, truncation_psi=0.5, noise_mode='const')
    if 'D' in data:
        D = data['D']
        z, c = _inputs(D.c_dim)
        img = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(8))
        result['D'] = D(img, c)
    return result


def assert_same_outputs(a, b, exact=True):
    out_a, out_b = outputs(a), outputs(b)
    assert out_a.keys() == out_b.keys() and out_a
    for key in out_a:
        if exact:
            assert torch.equal(out_a[key], out_b[key]), key
        else:
            torch.testing.assert_close(out_a[key], out_b[key], msg=key)


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(key)
            yield from _walk(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value)


def _metas(data):
    """The persistent-object records of a pickle, by class name, without rebuilding the objects."""
    found = dict()

    class MetaUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                def record(meta):
                    found.setdefault(meta['class_name'], meta)
                    return None
                return record
            return super().find_class(module, name)

    MetaUnpickler(io.BytesIO(data)).load()
    return found


@pytest.fixture(scope='module')
def snapshot():
    return make_snapshot()


# ----------------------------------------------------------------------------
# Pickles.


def test_pickle_round_trip(snapshot):
    data = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(snapshot)))
    assert list(data) == list(snapshot)
    assert data['training_set_kwargs'] == snapshot['training_set_kwargs']
    assert data['augment_pipe'] is None
    for key in ('G', 'D', 'G_ema'):
        assert type(data[key]) is type(snapshot[key]) and data[key] is not snapshot[key]
        assert data[key].init_kwargs == snapshot[key].init_kwargs
    assert_same_outputs(data, snapshot)


def test_pickle_from_embedded_source_converts_to_our_classes(snapshot, tmp_path):
    # An official snapshot's networks come from a module made from the source stored in the pickle, not from
    # training.networks. Changing the stored source a little (an import hook) puts us in that situation.
    def hook(meta):
        meta.module_src = meta.module_src + '\n# Loaded from a snapshot.\n'
        return meta

    persistence.import_hook(hook)
    try:
        data = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(snapshot)))
    finally:
        persistence.remove_import_hook(hook)
    G = data['G_ema']
    assert type(G).__module__.startswith('_imported_module_') and type(G).__name__ == 'Generator'
    assert_same_outputs(data, snapshot)

    path = tmp_path / 'official.pt'
    weights_only.save_weights_only(data, str(path))
    record = torch.load(path, weights_only=True)
    assert record['networks']['G_ema']['class_name'] == 'training.networks.Generator'
    assert record['networks']['D']['class_name'] == 'training.networks.Discriminator'
    ours = weights_only.load_weights_only(str(path))
    assert type(ours['G_ema']) is networks.Generator and type(ours['D']) is networks.Discriminator
    assert_same_outputs(ours, snapshot)


def test_force_fp16_rebuilds_with_training_settings_and_keeps_cpu_outputs(snapshot):
    data = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(snapshot)), force_fp16=True)
    for key in ('G', 'G_ema'):
        kwargs = data[key].init_kwargs.synthesis_kwargs
        assert kwargs.num_fp16_res == 4 and kwargs.conv_clamp == 256
        assert kwargs.channel_base == 128 and kwargs.channel_max == 32  # The rest is kept.
        assert 'num_fp16_res' not in snapshot[key].init_kwargs.synthesis_kwargs
        assert not data[key].training and not any(p.requires_grad for p in data[key].parameters())
    assert data['D'].init_kwargs.num_fp16_res == 4 and data['D'].init_kwargs.conv_clamp == 256
    assert any(getattr(m, 'use_fp16', False) for m in data['G'].modules())
    # fp16 is forced off on the CPU and the clamp does not bite at these magnitudes: the same numbers.
    assert_same_outputs(data, snapshot, exact=False)


def test_partial_snapshot_loads_with_the_official_entries(tmp_path):
    # As the official load_network_pkl: training_set_kwargs and augment_pipe are always there (None when the
    # file lacks them); other missing networks stay absent.
    G = make_generator()
    data = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(dict(G_ema=G))))
    assert data.keys() == {'G_ema', 'training_set_kwargs', 'augment_pipe'}
    assert data['training_set_kwargs'] is None and data['augment_pipe'] is None
    assert_same_outputs(data, dict(G_ema=G))
    fp16 = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(dict(G_ema=G))), force_fp16=True)
    assert fp16.keys() == {'G_ema', 'training_set_kwargs', 'augment_pipe'}

    path = tmp_path / 'g.pt'
    weights_only.save_weights_only(dict(G_ema=G), str(path))
    loaded = weights_only.load_weights_only(str(path))
    assert loaded.keys() == {'training_set_kwargs', 'G_ema'} and loaded['training_set_kwargs'] is None


# ----------------------------------------------------------------------------
# Weights-only files.


def test_weights_only_round_trip(snapshot, tmp_path):
    path = tmp_path / 'snapshot.pt'
    weights_only.save_weights_only(snapshot, str(path))
    assert os.listdir(tmp_path) == ['snapshot.pt']  # No temporary file left behind.

    record = torch.load(path, weights_only=True)  # Must not need any code from the file.
    assert record['format'] == 'stylegan2-weights' and record['version'] == 1
    assert set(record['networks']) == {'G', 'D', 'G_ema', 'augment_pipe'}
    assert record['networks']['augment_pipe'] is None
    assert record['networks']['G']['class_name'] == 'training.networks.Generator'
    assert type(record['training_set_kwargs']) is dict and record['training_set_kwargs']['path'] == 'data.zip'
    for key in ('G', 'D', 'G_ema'):
        entry = record['networks'][key]
        assert type(entry['init_kwargs']) is dict and type(entry['init_args']) is list
        assert entry['state_dict'].keys() == snapshot[key].state_dict().keys()
        for item in _walk(entry['init_kwargs']):
            assert type(item) in (dict, list, str, int, float, bool, type(None)), type(item)

    for data in [weights_only.load_weights_only(str(path)), snapshot_io.load_network_pkl(open(path, 'rb'))]:
        assert list(data) == ['training_set_kwargs', 'G', 'D', 'G_ema', 'augment_pipe']
        assert data['training_set_kwargs'] == dict(snapshot['training_set_kwargs'])
        assert data['augment_pipe'] is None
        for key in ('G', 'D', 'G_ema'):
            net = data[key]
            assert type(net) is type(snapshot[key])
            assert net.init_kwargs == snapshot[key].init_kwargs
            assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert_same_outputs(data, snapshot)


def test_weights_only_accepts_open_files_and_devices(snapshot, tmp_path):
    path = tmp_path / 'snapshot.pt'
    weights_only.save_weights_only(snapshot, str(path))
    buffer = io.BytesIO(path.read_bytes())
    data = weights_only.load_weights_only(buffer, device='cpu')
    assert data['G'].mapping.w_avg.device.type == 'cpu'
    assert_same_outputs(data, snapshot)


@pytest.mark.parametrize('variant', [dict(), dict(squeeze_blend=False), dict(squeeze_torgb='excite')])
def test_squeeze_generator_survives_both_formats(tmp_path, variant):
    snapshot = make_snapshot(architecture='squeeze', squeeze_r=8, **variant)
    expected = dict(TINY_SYNTHESIS, architecture='squeeze', squeeze_r=8, **variant)
    assert snapshot['G'].init_kwargs.synthesis_kwargs == expected

    from_pickle = snapshot_io.load_network_pkl(io.BytesIO(pickle.dumps(snapshot)))
    weights_only.save_weights_only(snapshot, str(tmp_path / 'squeeze.pt'))
    from_weights = weights_only.load_weights_only(str(tmp_path / 'squeeze.pt'))
    for data in [from_pickle, from_weights]:
        for key in ('G', 'G_ema'):
            assert data[key].init_kwargs.synthesis_kwargs == expected
            assert data[key].num_ws == snapshot[key].num_ws
        assert_same_outputs(data, snapshot)


def test_conditional_snapshot_round_trip(tmp_path):
    snapshot = make_snapshot(c_dim=4)
    weights_only.save_weights_only(snapshot, str(tmp_path / 'cond.pt'))
    data = weights_only.load_weights_only(str(tmp_path / 'cond.pt'))
    assert data['G'].c_dim == 4 and data['D'].c_dim == 4
    assert_same_outputs(data, snapshot)


def test_plain_conversion_of_init_kwargs():
    plain = weights_only.to_plain(dnnlib.EasyDict(a=(1, np.float32(0.5)), b=dnnlib.EasyDict(c=[np.int64(3)])), 'x')
    assert plain == {'a': [1, 0.5], 'b': {'c': [3]}}
    assert type(plain) is dict and type(plain['b']) is dict and type(plain['a']) is list
    assert type(plain['a'][1]) is float and type(plain['b']['c'][0]) is int
    with pytest.raises(ValueError, match=r'x\.f is a function'):
        weights_only.to_plain(dict(f=lambda: None), 'x')


def test_class_names_recorded_for_networks_from_snapshot_sources():
    def instance(name):
        return type(name, (torch.nn.Module,), {'__module__': '_imported_module_0123'})()
    assert weights_only.weights_class_name(instance('Generator')) == 'training.networks.Generator'
    assert weights_only.weights_class_name(instance('Discriminator')) == 'training.networks.Discriminator'
    assert weights_only.weights_class_name(instance('AugmentPipe')) == 'training.augment.AugmentPipe'
    assert weights_only.weights_class_name(make_generator()) == 'training.networks.Generator'


def test_save_weights_only_refuses_what_it_cannot_rebuild(tmp_path):
    G = make_generator()
    with pytest.raises(ValueError, match='persistent'):
        weights_only.save_weights_only(dict(G=G, D=torch.nn.Linear(2, 2)), str(tmp_path / 'x.pt'))
    with pytest.raises(ValueError, match="'progress'"):
        weights_only.save_weights_only(dict(G=G, progress=dict(kimg=3)), str(tmp_path / 'x.pt'))
    with pytest.raises(ValueError, match='without networks'):
        weights_only.save_weights_only(dict(training_set_kwargs=None), str(tmp_path / 'x.pt'))
    assert os.listdir(tmp_path) == []


def test_weights_only_rebuild_errors(tmp_path, snapshot):
    record = weights_only.snapshot_to_weights_only(dict(G_ema=snapshot['G_ema']))

    missing = copy.deepcopy(record)
    missing['networks']['G_ema']['class_name'] = 'training.no_such_module.Generator'
    torch.save(missing, tmp_path / 'missing.pt')
    with pytest.raises(ImportError, match=r'"G_ema".*training\.no_such_module\.Generator'):
        weights_only.load_weights_only(str(tmp_path / 'missing.pt'))

    wrong = copy.deepcopy(record)
    wrong['networks']['G_ema']['state_dict'].pop('mapping.w_avg')
    torch.save(wrong, tmp_path / 'wrong.pt')
    with pytest.raises(ValueError, match='w_avg'):
        weights_only.load_weights_only(str(tmp_path / 'wrong.pt'))

    newer = dict(record, version=2)
    torch.save(newer, tmp_path / 'newer.pt')
    with pytest.raises(ValueError, match='version 2'):
        weights_only.load_weights_only(str(tmp_path / 'newer.pt'))

    torch.save(dict(model=snapshot['G'].state_dict()), tmp_path / 'state_dict.pt')
    with pytest.raises(ValueError, match=r"not a weights-only snapshot.*\['model'\]"):
        snapshot_io.load_network_pkl(open(tmp_path / 'state_dict.pt', 'rb'))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'snapshot.pt'
    path.write_bytes(b'old contents')

    def failing_writer(f):
        f.write(b'half of the new ')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        dnnlib.util.write_atomically(str(path), failing_writer)
    assert path.read_bytes() == b'old contents'
    assert os.listdir(tmp_path) == ['snapshot.pt']


# ----------------------------------------------------------------------------
# Conversion.


def test_convert_pkl_to_pt_to_pkl(snapshot, tmp_path):
    src = tmp_path / 'snapshot.pkl'
    with open(src, 'wb') as f:
        pickle.dump(snapshot, f)
    snapshot_io.convert(str(src), str(tmp_path / 'snapshot.pt'))
    torch.load(tmp_path / 'snapshot.pt', weights_only=True)
    snapshot_io.convert(str(tmp_path / 'snapshot.pt'), str(tmp_path / 'again.pkl'))

    data = (tmp_path / 'again.pkl').read_bytes()
    metas = _metas(data)
    assert metas['Generator']['module_src'] == inspect.getsource(networks)  # Our classes, our source.
    assert metas['Discriminator']['module_src'] == inspect.getsource(networks)
    again = snapshot_io.load_network_pkl(io.BytesIO(data))
    assert list(again) == list(snapshot) and again['augment_pipe'] is None
    assert again['training_set_kwargs'] == snapshot['training_set_kwargs']
    assert_same_outputs(again, snapshot)

    with pytest.raises(ValueError, match=r'\.pkl.*\.pt'):
        snapshot_io.convert(str(src), str(tmp_path / 'snapshot.zip'))


def test_convert_command_line(snapshot, tmp_path):
    src = tmp_path / 'snapshot.pkl'
    src.write_bytes(pickle.dumps(snapshot))
    result = CliRunner().invoke(legacy.cli, ['convert', str(src), str(tmp_path / 'out.pt')])
    assert result.exit_code == 0, result.output
    assert 'G, D, G_ema' in result.output
    assert_same_outputs(weights_only.load_weights_only(str(tmp_path / 'out.pt')), snapshot)

    result = CliRunner().invoke(legacy.cli, ['convert', str(tmp_path / 'nothing.pkl'), str(tmp_path / 'x.pt')])
    assert result.exit_code == 1 and 'No such file' in result.output and 'Traceback' not in result.output


def test_convert_as_script(tmp_path):
    G = make_generator()
    (tmp_path / 'g.pkl').write_bytes(pickle.dumps(dict(G_ema=G)))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'legacy.py'), 'convert', 'g.pkl', 'g.pt'],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_same_outputs(weights_only.load_weights_only(str(tmp_path / 'g.pt')), dict(G_ema=G))


# ----------------------------------------------------------------------------
# load_network and errors on files that are not snapshots.


def test_load_network(snapshot, tmp_path):
    (tmp_path / 'snapshot.pkl').write_bytes(pickle.dumps(snapshot))
    G = snapshot_io.load_network(str(tmp_path / 'snapshot.pkl'))
    assert_same_outputs(dict(G_ema=G), dict(G_ema=snapshot['G_ema']))
    D = snapshot_io.load_network((tmp_path / 'snapshot.pkl').as_uri(), key='D')
    assert type(D) is networks.Discriminator

    (tmp_path / 'g.pkl').write_bytes(pickle.dumps(dict(G_ema=snapshot['G_ema'], augment_pipe=None)))
    with pytest.raises(ValueError, match='no network "G".*it has: G_ema'):
        snapshot_io.load_network(str(tmp_path / 'g.pkl'), key='G')
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        snapshot_io.load_network(str(tmp_path / 'missing.pkl'))


def _tensorflow_style_pickle():
    # A dnnlib.tflib Network object without any state: not a network of the StyleGAN2 TensorFlow releases.
    return b'\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01}q\x02b.'


@pytest.mark.parametrize('content, message', [
    (b'', 'empty'),
    (b'<html><body>404 Not Found</body></html>', 'text starting with'),
    (bytes([7]) + np.random.RandomState(0).bytes(200), 'unrecognised binary data starting with bytes 07'),
    (b'\x1f\x8b\x08\x00compressed', 'gzip'),
    (pickle.dumps(dict(weights=[1, 2, 3])), "without networks.*'weights'"),
    (pickle.dumps([1, 2, 3]), 'holds a list'),
    (pickle.dumps(dict(G='not a network')), 'entry "G" is a str'),
    (pickle.dumps(dict(G=None)), 'without networks'),
    (pickle.dumps(dict(G_ema=torch.nn.Linear(2, 2)))[:100], 'truncated or corrupt'),
    (_tensorflow_style_pickle(), 'TensorFlow network is a network pickle of version None'),
    (b'\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x07no_such\x94\x8c\x01x\x94\x93\x94.', 'no_such.x'),
])
def test_clear_errors_for_files_that_are_not_snapshots(content, message):
    with pytest.raises(ValueError, match=message):
        snapshot_io.load_network_pkl(io.BytesIO(content))


def test_clear_error_for_a_zip_that_is_not_a_torch_file(tmp_path):
    with zipfile.ZipFile(tmp_path / 'a.zip', 'w') as archive:
        archive.writestr('readme.txt', 'hello')
    with pytest.raises(ValueError, match='not a weights-only snapshot'):
        snapshot_io.load_network_pkl(open(tmp_path / 'a.zip', 'rb'))
