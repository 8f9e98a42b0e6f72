"""TensorFlow pickles of the StyleGAN2 / StyleGAN2-ADA TensorFlow releases, converted without TensorFlow.

There is no TensorFlow here, so the tests write TensorFlow-format pickles themselves: a small exporter turns a
tiny network of ours into the `dnnlib.tflib.network.Network` records such a pickle holds (static kwargs,
components, named variables in the TensorFlow layouts), following the TensorFlow releases' scope names and
layouts, written out independently of the converter's tables. Converting back must give every tensor and the
generated images exactly.
"""

import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from test_legacy import REPO_ROOT, make_generator

import legacy
from torch_utils import misc
from training import adoption, networks, snapshot_dict, snapshot_io, tf_import, weights_only

pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------
# The exporter: our networks -> TensorFlow-format records.


class Network:
    """Pickles as the TensorFlow releases' `dnnlib.tflib.network.Network`: a class reference and a state dict."""

    def __init__(self, **state):
        self.state = state

    def __getstate__(self):
        return self.state


@contextlib.contextmanager
def tflib_importable():
    """Make `dnnlib.tflib.network.Network` resolvable for pickle.dumps, only while pickling."""
    tflib = types.ModuleType('dnnlib.tflib')
    network_module = types.ModuleType('dnnlib.tflib.network')
    network_module.Network = Network
    tflib.network = network_module
    saved = Network.__module__
    Network.__module__ = 'dnnlib.tflib.network'
    sys.modules['dnnlib.tflib'], sys.modules['dnnlib.tflib.network'] = tflib, network_module
    try:
        yield
    finally:
        Network.__module__ = saved
        del sys.modules['dnnlib.tflib'], sys.modules['dnnlib.tflib.network']


def tf_pickle(obj):
    """Pickle bytes as the TensorFlow releases wrote them (Python 3.6/3.7, NumPy 1.x): protocol 2, with arrays
    rebuilt by numpy.core.multiarray (NumPy 2 writes numpy._core)."""
    with tflib_importable():
        data = pickle.dumps(obj, protocol=2)
    return data.replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')


def arr(tensor):
    return np.array(tensor.detach().cpu().numpy(), dtype=np.float32)


def tf_conv(weight, transposed=False):
    """Ours [out, in, kh, kw] -> TensorFlow [kh, kw, in, out]. TensorFlow's upsampling convolution is a
    transposed convolution whose kernel is the spatial flip of ours."""
    w = arr(weight).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(w[::-1, ::-1]) if transposed else w


def tf_dense(weight):
    return arr(weight).T.copy()  # Ours [out, in] -> TensorFlow [in, out].


def modulated(layer, scope, transposed=False):
    """Variables of a modulated conv (weight, bias, mod_weight, mod_bias[, noise_strength])."""
    out = [(f'{scope}/weight', tf_conv(layer.weight, transposed)), (f'{scope}/bias', arr(layer.bias)),
           (f'{scope}/mod_weight', tf_dense(layer.affine.weight)),
           (f'{scope}/mod_bias', arr(layer.affine.bias) - 1)]  # TensorFlow adds the 1 at run time.
    if getattr(layer, 'use_noise', False):
        out.append((f'{scope}/noise_strength', arr(layer.noise_strength)))
    return out


def export_generator(G, release='ada', name='G', static_kwargs=None):
    """A Generator of ours as the TensorFlow G_main record with its mapping and synthesis components."""
    mapping_vars = []
    for idx in range(G.mapping.num_layers):
        fc = getattr(G.mapping, f'fc{idx}')
        mapping_vars += [(f'Dense{idx}/weight', tf_dense(fc.weight)), (f'Dense{idx}/bias', arr(fc.bias))]
    if G.c_dim:
        mapping_vars += [('LabelEmbed/weight', tf_dense(G.mapping.embed.weight)),
                         ('LabelEmbed/bias', arr(G.mapping.embed.bias))]

    synthesis_vars, noise = [], []
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f'b{res}')
        log2 = int(np.log2(res))
        if res == 4:
            synthesis_vars.append(('4x4/Const/const', arr(block.const)[np.newaxis]))
            layers = [(block.conv1, '4x4/Conv', 0, False)]
        else:
            layers = [(block.conv0, f'{res}x{res}/Conv0_up', log2 * 2 - 5, True),
                      (block.conv1, f'{res}x{res}/Conv1', log2 * 2 - 4, False)]
        for layer, scope, layer_idx, up in layers:
            synthesis_vars += modulated(layer, scope, transposed=up)
            if layer.use_noise:
                noise.append((f'noise{layer_idx}', arr(layer.noise_const)[np.newaxis, np.newaxis]))
        if hasattr(block, 'torgb'):
            synthesis_vars += modulated(block.torgb, f'{res}x{res}/ToRGB')
        if hasattr(block, 'skip'):
            synthesis_vars.append((f'{res}x{res}/Skip/weight', tf_conv(block.skip.weight, transposed=True)))
    synthesis_vars = sorted(noise) + synthesis_vars

    syn = G.init_kwargs.synthesis_kwargs
    kwargs = dict(latent_size=G.z_dim, label_size=G.c_dim, dlatent_size=G.w_dim, resolution=G.img_resolution,
                  num_channels=G.img_channels, fmap_base=syn['channel_base'] // 2, fmap_max=syn['channel_max'],
                  mapping_layers=G.mapping.num_layers, mapping_fmaps=G.w_dim, architecture=syn.get('architecture', 'skip'),
                  truncation_psi=0.5, style_mixing_prob=0.9)  # The last two only steer TensorFlow's graph.
    if G.c_dim:
        kwargs['label_fmaps'] = G.mapping.embed.out_features
    for key in ('num_fp16_res', 'conv_clamp'):
        if key in syn:
            kwargs[key] = syn[key]
    if 'resample_filter' in syn:
        kwargs['resample_kernel'] = list(syn['resample_filter'])
    kwargs.update(static_kwargs or {})
    module = 'training.networks_stylegan2' if release == 'stylegan2' else 'training.networks'
    synthesis_func = 'G_synthesis_stylegan2' if release == 'stylegan2' else 'G_synthesis'
    top_vars = [('dlatent_avg', arr(G.mapping.w_avg))] + ([('lod', np.float32(0))] if release == 'stylegan2' else [])

    def record(net_name, func, variables, components=None, extra=None):
        return Network(version=4 if release == 'stylegan2' else 5, name=net_name,
                       static_kwargs=dict(kwargs, **(extra or {})), components=components or {},
                       build_module_src='# TensorFlow source (not needed)', build_func_name=f'{module}.{func}',
                       variables=variables)

    return record(name, 'G_main', top_vars, components=dict(
        synthesis=record(f'{name}_synthesis', synthesis_func, synthesis_vars),
        mapping=record(f'{name}_mapping', 'G_mapping', mapping_vars, extra=dict(dlatent_broadcast=G.num_ws))))


def export_discriminator(D, release='ada', static_kwargs=None):
    """A Discriminator of ours as the TensorFlow D_main (or D_stylegan2) record."""
    variables = []
    for res in D.block_resolutions + [4]:
        block = getattr(D, f'b{res}')
        scope = f'{res}x{res}'
        if hasattr(block, 'fromrgb'):
            variables += [(f'{scope}/FromRGB/weight', tf_conv(block.fromrgb.weight)),
                          (f'{scope}/FromRGB/bias', arr(block.fromrgb.bias))]
        if res > 4:
            variables += [(f'{scope}/Conv0/weight', tf_conv(block.conv0.weight)),
                          (f'{scope}/Conv0/bias', arr(block.conv0.bias)),
                          (f'{scope}/Conv1_down/weight', tf_conv(block.conv1.weight)),  # Blur, then conv: no flip.
                          (f'{scope}/Conv1_down/bias', arr(block.conv1.bias))]
            if hasattr(block, 'skip'):
                variables.append((f'{scope}/Skip/weight', tf_conv(block.skip.weight)))
    variables += [('4x4/Conv/weight', tf_conv(D.b4.conv.weight)), ('4x4/Conv/bias', arr(D.b4.conv.bias)),
                  ('4x4/Dense0/weight', tf_dense(D.b4.fc.weight)), ('4x4/Dense0/bias', arr(D.b4.fc.bias)),
                  ('Output/weight', tf_dense(D.b4.out.weight)), ('Output/bias', arr(D.b4.out.bias))]
    if D.c_dim:
        variables += [('LabelEmbed/weight', tf_dense(D.mapping.embed.weight)),
                      ('LabelEmbed/bias', arr(D.mapping.embed.bias))]
        for idx in range(D.mapping.num_layers):
            fc = getattr(D.mapping, f'fc{idx}')
            variables += [(f'Mapping{idx}/weight', tf_dense(fc.weight)), (f'Mapping{idx}/bias', arr(fc.bias))]

    init = D.init_kwargs
    epilogue = init.get('epilogue_kwargs') or {}
    kwargs = dict(label_size=D.c_dim, resolution=D.img_resolution, num_channels=D.img_channels,
                  fmap_base=init['channel_base'] // 2, fmap_max=init['channel_max'],
                  architecture=init.get('architecture', 'resnet'), mbstd_group_size=epilogue.get('mbstd_group_size', 4))
    if D.c_dim:
        kwargs.update(mapping_layers=D.mapping.num_layers, mapping_fmaps=D.b4.cmap_dim,
                      mapping_lrmul=(init.get('mapping_kwargs') or {}).get('lr_multiplier', 0.01))
    for key in ('num_fp16_res', 'conv_clamp'):
        if key in init:
            kwargs[key] = init[key]
    kwargs.update(static_kwargs or {})
    module, func = ('training.networks_stylegan2', 'D_stylegan2') if release == 'stylegan2' else ('training.networks', 'D_main')
    return Network(version=4 if release == 'stylegan2' else 5, name='D', static_kwargs=kwargs, components={},
                   build_module_src='# TensorFlow source (not needed)', build_func_name=f'{module}.{func}',
                   variables=variables)


def export_snapshot(snapshot, release='ada'):
    return (export_generator(snapshot['G'], release), export_discriminator(snapshot['D'], release),
            export_generator(snapshot['G_ema'], release, name='Gs'))


# ----------------------------------------------------------------------------
# Configurations.


def perturbed(net, seed):
    """`net` with every tensor but the resampling filters (which TensorFlow pickles do not store) moved off its
    initial value, so that a tensor the conversion misses shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in misc.named_params_and_buffers(net):
            if not name.endswith('resample_filter'):
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return net.eval().requires_grad_(False)


def tiny_snapshot(G_kwargs=None, D_kwargs=None, c_dim=0):
    """16x16 networks; z_dim = w_dim = 16, as make_generator builds them."""
    G_kwargs, D_kwargs = dict(G_kwargs or {}), dict(D_kwargs or {})
    G = perturbed(networks.Generator(**dict(make_generator(c_dim=c_dim, **G_kwargs).init_kwargs)), 1)
    G_ema = perturbed(networks.Generator(**dict(G.init_kwargs)), 2)
    D = networks.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=128, channel_max=32,
                               **D_kwargs)
    return dict(G=G, D=perturbed(D, 3), G_ema=G_ema)


CONFIGS = {
    # StyleGAN2-ADA TensorFlow defaults: skip G, resnet D with mbstd over the whole batch.
    'ada': dict(D_kwargs=dict(epilogue_kwargs=dict(mbstd_group_size=None))),
    # Conditional, with the ADA D's default of no label mapping layers (its lr multiplier 0.1 then unused).
    'ada-conditional': dict(c_dim=3, D_kwargs=dict(mapping_kwargs=dict(num_layers=0),
                                                    epilogue_kwargs=dict(mbstd_group_size=2))),
    'ada-conditional-mapped': dict(c_dim=3, D_kwargs=dict(mapping_kwargs=dict(num_layers=2, lr_multiplier=0.1))),
    # Residual G (an upsampling skip conv, toRGB only at the end), skip D (fromRGB everywhere), mixed precision.
    'ada-resnet-G-skip-D': dict(G_kwargs=dict(architecture='resnet', num_fp16_res=2, conv_clamp=256),
                                D_kwargs=dict(architecture='skip', num_fp16_res=2, conv_clamp=256)),
    'ada-orig': dict(G_kwargs=dict(architecture='orig'), D_kwargs=dict(architecture='orig')),
}


@torch.no_grad()
def assert_identical(converted, original):
    for key in ('G', 'D', 'G_ema'):
        ours, theirs = converted[key], original[key]
        assert type(ours) is type(theirs)
        a, b = dict(misc.named_params_and_buffers(ours)), dict(misc.named_params_and_buffers(theirs))
        assert a.keys() == b.keys(), key
        for name in a:
            assert torch.equal(a[name], b[name]), f'{key}.{name}'
        assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    gen = torch.Generator().manual_seed(9)
    for key in ('G', 'G_ema'):
        G, G0 = converted[key], original[key]
        z = torch.randn([4, G.z_dim], generator=gen)
        c = torch.nn.functional.one_hot(torch.arange(4) % max(G.c_dim, 1), max(G.c_dim, 1)).float()[:, :G.c_dim]
        assert G.num_ws == G0.num_ws
        for psi in (1, 0.6):
            assert torch.equal(G(z, c, truncation_psi=psi, noise_mode='const', force_fp32=True),
                               G0(z, c, truncation_psi=psi, noise_mode='const', force_fp32=True)), key
    D, D0 = converted['D'], original['D']
    img = torch.randn([4, 3, 16, 16], generator=gen)
    c = torch.nn.functional.one_hot(torch.arange(4) % max(D.c_dim, 1), max(D.c_dim, 1)).float()[:, :D.c_dim]
    assert torch.equal(D(img, c), D0(img, c))


# ----------------------------------------------------------------------------


@pytest.mark.parametrize('config', list(CONFIGS))
def test_tf_pickle_converts_to_the_same_tensors_and_images(config):
    original = tiny_snapshot(**CONFIGS[config])
    data = snapshot_io.load_network_pkl(io.BytesIO(tf_pickle(export_snapshot(original))))
    assert set(data) == {'training_set_kwargs', 'G', 'D', 'G_ema', 'augment_pipe'}
    assert data['training_set_kwargs'] is None and data['augment_pipe'] is None
    assert_identical(data, original)


def test_stylegan2_release_pickle_with_its_defaults():
    # The StyleGAN2 release: other build functions, a `lod` variable, and D's minibatch-std group defaulting to 4.
    original = tiny_snapshot()
    tf_G, tf_D, tf_Gs = export_snapshot(original, release='stylegan2')
    del tf_D.state['static_kwargs']['mbstd_group_size']
    data = snapshot_io.load_network_pkl(io.BytesIO(tf_pickle((tf_G, tf_D, tf_Gs))))
    assert data['D'].b4.mbstd.group_size == 4
    assert_identical(data, original)


def test_layout_rules_on_single_tensors():
    # The rules on their own, apart from the exporter: TensorFlow [kh, kw, in, out] kernels, the upsampling
    # kernel flipped, the TensorFlow numbering of noise maps, the +1 of style biases.
    G = make_generator()
    sources = tf_import.generator_tf_sources(G)
    w = np.arange(3 * 3 * 2 * 5, dtype=np.float32).reshape(3, 3, 2, 5)  # [kh, kw, in, out]
    tf_name, convert_layout = sources['synthesis.b8.conv0.weight']
    assert tf_name == 'synthesis/8x8/Conv0_up/weight'
    converted = convert_layout(w)
    assert converted.shape == (5, 2, 3, 3) and converted[4, 1, 0, 0] == w[2, 2, 1, 4]  # Flipped.
    tf_name, convert_layout = sources['synthesis.b8.conv1.weight']
    assert tf_name == 'synthesis/8x8/Conv1/weight' and convert_layout(w)[4, 1, 0, 0] == w[0, 0, 1, 4]
    assert sources['synthesis.b8.conv0.noise_const'][0] == 'synthesis/noise1'
    assert sources['synthesis.b16.conv1.noise_const'][0] == 'synthesis/noise4'
    assert sources['synthesis.b4.conv1.affine.bias'][1](np.zeros(3, np.float32)).tolist() == [1, 1, 1]


def test_single_network_pickle_and_force_fp16():
    original = tiny_snapshot()
    data = snapshot_io.load_network_pkl(io.BytesIO(tf_pickle(export_generator(original['G_ema'], name='Gs'))))
    assert set(data) == {'training_set_kwargs', 'G_ema', 'augment_pipe'}
    assert torch.equal(data['G_ema'].mapping.w_avg, original['G_ema'].mapping.w_avg)
    fp16 = snapshot_io.load_network_pkl(io.BytesIO(tf_pickle(export_snapshot(original))), force_fp16=True)
    assert fp16['G'].init_kwargs.synthesis_kwargs.num_fp16_res == 4 and fp16['D'].init_kwargs.num_fp16_res == 4


def _convert(tf_obj):
    return snapshot_io.load_network_pkl(io.BytesIO(tf_pickle(tf_obj)))


def _modified(edit, release='ada'):
    """The exported tiny snapshot with `edit(G, D)` applied to the records of G and D."""
    tf_G, tf_D, tf_Gs = export_snapshot(tiny_snapshot(), release)
    edit(tf_G, tf_D)
    return (tf_G, tf_D, tf_Gs)


def _set(record, **kwargs):
    record.state['static_kwargs'].update(kwargs)


def _drop_variable(record, name):
    record.state['variables'] = [(n, v) for n, v in record.state['variables'] if n != name]


@pytest.mark.parametrize('edit, message', [
    (lambda G, D: _set(G, frobnicate=3), 'generator: static kwarg frobnicate=3 (unknown to this converter'),
    (lambda G, D: _set(D, use_pagan=True), 'discriminator: static kwarg use_pagan=True (PA-GAN'),
    (lambda G, D: _set(G, architecture='squeeze'), "static kwarg architecture='squeeze' (StyleGAN2 networks are orig"),
    (lambda G, D: _set(G, fmap_decay=0.5), 'static kwarg fmap_decay=0.5'),
    (lambda G, D: _set(G, nonlinearity='gelu'), "static kwarg nonlinearity='gelu' (valid activations: linear"),
    (lambda G, D: _set(D, fmap_base=8), 'static kwarg fmap_base=8 (the TensorFlow 4x4/Dense0 layer'),
    (lambda G, D: G.state['components']['synthesis'].state.update(
        build_func_name='training.networks_stylegan2.G_synthesis_stylegan_revised'),
     'synthesis network G_synthesis_stylegan_revised; only the StyleGAN2 config E/F ones'),
    (lambda G, D: D.state.update(build_func_name='training.networks_stylegan.D_basic'), 'built by D_basic'),
    (lambda G, D: G.state.update(version=3), 'version 3; only StyleGAN2'),
    (lambda G, D: _drop_variable(G.state['components']['synthesis'], '8x8/Conv1/weight'),
     'has no variable "synthesis/8x8/Conv1/weight" (for synthesis.b8.conv1.weight)'),
    (lambda G, D: D.state['variables'].append(('8x8/Extra/weight', np.zeros(3, np.float32))),
     'no place for: 8x8/Extra/weight'),
    (lambda G, D: _set(G, fmap_max=16), 'variable "synthesis/4x4/Const/const" has shape [1, 32, 4, 4]'),
])
def test_unsupported_tf_pickles_fail_with_a_clear_message(edit, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _convert(_modified(edit))


def test_conditional_networks_of_the_stylegan2_release_are_refused():
    snapshot = tiny_snapshot(c_dim=3)
    with pytest.raises(ValueError, match='label_size=3.*LabelConcat'):
        tf_import.convert_tf_generator(snapshot_io._SnapshotUnpickler(io.BytesIO(
            tf_pickle(export_generator(snapshot['G'], release='stylegan2')))).load())


def test_other_tensorflow_objects_are_refused_by_name():
    tensorflow = types.ModuleType('tensorflow')

    class Session:
        pass

    Session.__module__, Session.__qualname__ = 'tensorflow', 'Session'
    tensorflow.Session = Session
    sys.modules['tensorflow'] = tensorflow
    try:
        data = pickle.dumps(Session(), protocol=2)
    finally:
        del sys.modules['tensorflow']
    with pytest.raises(ValueError, match='refers to "tensorflow.Session", which cannot be read without TensorFlow'):
        snapshot_io.load_network_pkl(io.BytesIO(data))


# ----------------------------------------------------------------------------
# The top-level legacy.py: importable as official code expects, and the official command line.


@pytest.fixture(scope='module')
def tf_pkl(tmp_path_factory):
    original = tiny_snapshot(**CONFIGS['ada-conditional-mapped'])
    path = tmp_path_factory.mktemp('tf') / 'stylegan2-tiny-config-f.pkl'
    path.write_bytes(tf_pickle(export_snapshot(original)))
    return str(path), original


def test_import_legacy_works_like_the_official_module(tf_pkl):
    path, original = tf_pkl
    with open(path, 'rb') as f:
        data = legacy.load_network_pkl(f)
    assert_identical(data, original)
    assert legacy._TFNetworkStub is tf_import.TFNetworkStub and legacy.convert_tf_generator is tf_import.convert_tf_generator
    assert legacy.adopt_network is adoption.adopt_network and legacy.NETWORK_KEYS == snapshot_dict.NETWORK_KEYS
    assert type(legacy.load_network(path)) is networks.Generator
    # Every name it exports is the training package's object, except the command line, which lives only here.
    homes = [snapshot_io, adoption, tf_import, weights_only, snapshot_dict]
    commands = {'cli', 'convert_command', 'convert_network_pickle', 'main'}
    for name in legacy.__all__:
        found = [module.__name__ for module in homes if getattr(module, name, None) is getattr(legacy, name)]
        assert (found == []) == (name in commands), (name, found)


def run_script(args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_legacy_command_line_converts_a_tf_pickle(tf_pkl, tmp_path):
    path, original = tf_pkl
    result = run_script([os.path.join(REPO_ROOT, 'legacy.py'), f'--source={path}', '--dest=out.pkl'], tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'Done.' in result.stdout
    data = snapshot_io.load_network_pkl(open(tmp_path / 'out.pkl', 'rb'))
    assert_identical(data, original)


def test_legacy_command_line_errors_are_one_line(tmp_path):
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(tf_pickle(_modified(lambda G, D: _set(D, use_spectral_norm=True))))
    for source, message in [(str(bad), 'Error: Cannot convert the TensorFlow discriminator: static kwarg '
                                       'use_spectral_norm=True (spectral normalization is a comparison method; '
                                       'only use_spectral_norm=False converts)'),
                            (str(tmp_path / 'missing.pkl'), 'Error: ')]:
        result = run_script([os.path.join(REPO_ROOT, 'legacy.py'), f'--source={source}', '--dest=out.pkl'], tmp_path)
        assert result.returncode == 1
        assert 'Traceback' not in result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(message), line
        assert not (tmp_path / 'out.pkl').exists()
    assert 'missing.pkl' in line


def test_convert_tf_pickle_to_weights_only(tf_pkl, tmp_path):
    path, original = tf_pkl
    snapshot_io.convert(path, str(tmp_path / 'tf.pt'))
    assert_identical(weights_only.load_weights_only(str(tmp_path / 'tf.pt')), original)
