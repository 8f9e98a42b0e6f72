"""TensorFlow pickles (StyleGAN2 and StyleGAN2-ADA TensorFlow releases) read without TensorFlow and converted into
this code base's classes.

A TensorFlow pickle holds `dnnlib.tflib.network.Network` objects, pickled as their state dict: `version`,
`name`, `static_kwargs` (the constructor keywords of the network's build function), `components` (the
sub-networks, e.g. G's `mapping` and `synthesis`), `build_module_src`, `build_func_name` and `variables`
(a list of (name, numpy array) relative to the network's scope). The variables follow the TensorFlow
layouts: dense weights [in, out], conv weights [kh, kw, in, out], the 4x4 constant [1, C, 4, 4], noise
maps [1, 1, H, W]; style affine biases are stored without their +1 initialization offset; and the
TensorFlow upsampling convolution (a transposed convolution) uses its kernel flipped relative to ours
(flip_weight=False in training.networks), so upsampling kernels are flipped spatially when converted.
The downsampling convolutions of D blur first and then convolve, as ours do, and need no flip.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils.ops import bias_act
from training import networks
from training.snapshot_dict import list_some

TF_MIN_VERSION = 4  # Network pickle version of the StyleGAN2 TensorFlow releases.


class TFNetworkStub(dnnlib.EasyDict):
    """What a `dnnlib.tflib.network.Network` of a TensorFlow pickle unpickles into: its pickled state (version,
    name, static_kwargs, components, build_func_name, variables, ...) as a dict with attribute access."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


def collect_tf_params(tf_net: Any) -> Dict[str, np.ndarray]:
    """Every variable of a TensorFlow network and its components, keyed by path ('synthesis/8x8/Conv1/weight')."""
    params = dict()

    def collect(prefix: str, net: Any) -> None:
        for name, value in net.variables:
            params[prefix + name] = value
        for name, component in net.get('components', {}).items():
            collect(f'{prefix}{name}/', component)

    collect('', tf_net)
    return params


def _tf_func(tf_net: Any) -> str:
    """Last part of the build function name, e.g. 'G_main', 'G_synthesis_stylegan2', 'D_main'."""
    return str(tf_net.get('build_func_name') or '').split('.')[-1]


def _tf_kind(tf_net: Any) -> Optional[str]:
    """'G' or 'D' for a TensorFlow network, from its build function, name or components."""
    func = _tf_func(tf_net)
    if func.startswith(('G_', 'D_')):
        return func[0]
    name = str(tf_net.get('name') or '')
    if name[:1] in ('G', 'D'):
        return name[:1]
    return 'G' if 'synthesis' in tf_net.get('components', {}) else None


class _TFKwargs:
    """The static kwargs of a TensorFlow network, read one by one, so that what is left at the end is
    exactly what this converter does not understand."""

    def __init__(self, tf_net: Any, what: str):
        self.values = dict(tf_net.get('static_kwargs') or {})
        self.what = what
        self.read = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return self.values.get(name, default)

    def ignore(self, *names: str) -> None:
        """Kwargs that only steer TensorFlow's graph (dtype, truncation defaults, ...): no effect on weights."""
        self.read.update(names)

    def require(self, name: str, expected: Any, meaning: str) -> None:
        """Kwargs whose non-default values select features that training.networks does not have."""
        value = self.get(name, expected)
        if value != expected:
            self.fail(name, value, f'{meaning}; only {name}={expected!r} converts')

    def fail(self, name: str, value: Any, why: str) -> None:
        raise ValueError(f'Cannot convert the TensorFlow {self.what}: static kwarg {name}={value!r} ({why})')

    def check_all_read(self) -> None:
        unknown = sorted(set(self.values) - self.read)
        if unknown:
            name = unknown[0]
            others = f' (also unknown: {", ".join(unknown[1:])})' if len(unknown) > 1 else ''
            self.fail(name, self.values[name], f'unknown to this converter; it may select an architecture other '
                                               f'than StyleGAN2 config E/F{others}')


def _tf_channels(kw: _TFKwargs) -> Tuple[int, int, Callable[[int], int]]:
    """(channel_base, channel_max, nf): TensorFlow gives stage s = log2(res) - 1 the width
    clip(int(fmap_base / 2**s), fmap_min, fmap_max); ours is min(channel_base // res, channel_max), which is
    the same with channel_base = 2 * fmap_base when fmap_decay = 1 and fmap_min does not bind."""
    fmap_base = kw.get('fmap_base', 16384)
    fmap_max = kw.get('fmap_max', 512)
    fmap_min = kw.get('fmap_min', 1)
    kw.require('fmap_decay', 1, 'another channel progression than halving per resolution')
    if float(fmap_base) != int(fmap_base) or float(fmap_max) != int(fmap_max):
        kw.fail('fmap_base', fmap_base, 'fmap_base and fmap_max must be whole numbers')
    fmap_base, fmap_max = int(fmap_base), int(fmap_max)

    def nf(stage: int) -> int:
        return int(np.clip(int(fmap_base / (2.0 ** stage)), fmap_min, fmap_max))

    resolution = int(kw.values.get('resolution', 1024))
    if any(int(fmap_base / (2.0 ** stage)) < fmap_min for stage in range(int(np.log2(resolution)))):
        kw.fail('fmap_min', fmap_min, 'it raises some layer widths, which training.networks cannot')
    return 2 * fmap_base, fmap_max, nf


def _tf_activation(kw: _TFKwargs, name: str) -> str:
    value = kw.get(name, 'lrelu')
    if value not in bias_act.activation_funcs:
        kw.fail(name, value, f'valid activations: {", ".join(bias_act.activation_funcs)}')
    return value


def _tf_resample_filter(kw: _TFKwargs) -> list:
    value = kw.get('resample_kernel', [1, 3, 3, 1])
    return [1, 1] if value is None else [float(tap) if float(tap) != int(tap) else int(tap) for tap in value]


def _tf_architecture(kw: _TFKwargs, default: str) -> str:
    value = kw.get('architecture', default)
    if value not in ('orig', 'skip', 'resnet'):
        kw.fail('architecture', value, 'StyleGAN2 networks are orig, skip or resnet')
    return value


def _check_tf_network(tf_net: Any, what: str) -> None:
    version = tf_net.get('version')
    if not isinstance(version, int) or version < TF_MIN_VERSION:
        raise ValueError(f'The TensorFlow {what} is a network pickle of version {version!r}; only StyleGAN2 and '
                         f'StyleGAN2-ADA networks (version {TF_MIN_VERSION} and newer) convert, not StyleGAN1 or '
                         f'progressive-GAN ones')
    if not isinstance(tf_net.get('variables'), (list, tuple)):
        raise ValueError(f'The TensorFlow {what} is damaged: it has no variable list')


# Conversions of TensorFlow variable layouts to ours.


def _dense(w: np.ndarray) -> np.ndarray:
    return w.transpose()  # [in, out] -> [out, in].


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw].


def _conv_up(w: np.ndarray) -> np.ndarray:
    return w[::-1, ::-1].transpose(3, 2, 0, 1)  # The transposed-conv kernel, flipped spatially.


def _mod_bias(b: np.ndarray) -> np.ndarray:
    return b + 1  # TensorFlow adds the +1 of the style bias at run time; ours starts the bias at 1.


def _first(x: np.ndarray) -> np.ndarray:
    return x[0]  # [1, C, 4, 4] -> [C, 4, 4].


def _noise(x: np.ndarray) -> np.ndarray:
    return x[0, 0]  # [1, 1, H, W] -> [H, W].


def _modulated_layer_sources(sources: dict, ours: str, scope: str, weight: Callable) -> None:
    sources[f'{ours}.weight'] = (f'{scope}/weight', weight)
    sources[f'{ours}.bias'] = (f'{scope}/bias', None)
    sources[f'{ours}.affine.weight'] = (f'{scope}/mod_weight', _dense)
    sources[f'{ours}.affine.bias'] = (f'{scope}/mod_bias', _mod_bias)


def _dense_sources(sources: dict, ours: str, scope: str, bias: bool = True) -> None:
    sources[f'{ours}.weight'] = (f'{scope}/weight', _dense)
    if bias:
        sources[f'{ours}.bias'] = (f'{scope}/bias', None)


def _conv_sources(sources: dict, ours: str, scope: str, bias: bool = True) -> None:
    sources[f'{ours}.weight'] = (f'{scope}/weight', _conv)
    if bias:
        sources[f'{ours}.bias'] = (f'{scope}/bias', None)


def generator_tf_sources(G: networks.Generator) -> Dict[str, tuple]:
    """For every tensor of a stock Generator: (TensorFlow variable path, layout conversion or None).

    TensorFlow numbers the synthesis layers 0 (4x4) and 2*log2(res)-5, 2*log2(res)-4 (conv0, conv1 of
    res x res); the noise map of layer i is `synthesis/noise{i}`.
    """
    sources = dict()
    for idx in range(G.mapping.num_layers):
        _dense_sources(sources, f'mapping.fc{idx}', f'mapping/Dense{idx}')
    if G.c_dim > 0:
        _dense_sources(sources, 'mapping.embed', 'mapping/LabelEmbed')
    sources['mapping.w_avg'] = ('dlatent_avg', None)
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f'b{res}')
        scope = f'synthesis/{res}x{res}'
        log2 = int(np.log2(res))
        if res == 4:
            sources['synthesis.b4.const'] = ('synthesis/4x4/Const/const', _first)
            layers = [('conv1', 'Conv', 0, _conv)]
        else:
            layers = [('conv0', 'Conv0_up', 2 * log2 - 5, _conv_up), ('conv1', 'Conv1', 2 * log2 - 4, _conv)]
        for name, tf_name, layer_idx, weight in layers:
            ours = f'synthesis.b{res}.{name}'
            _modulated_layer_sources(sources, ours, f'{scope}/{tf_name}', weight)
            if getattr(block, name).use_noise:
                sources[f'{ours}.noise_strength'] = (f'{scope}/{tf_name}/noise_strength', None)
                sources[f'{ours}.noise_const'] = (f'synthesis/noise{layer_idx}', _noise)
        if hasattr(block, 'torgb'):
            _modulated_layer_sources(sources, f'synthesis.b{res}.torgb', f'{scope}/ToRGB', _conv)
        if hasattr(block, 'skip'):
            sources[f'synthesis.b{res}.skip.weight'] = (f'{scope}/Skip/weight', _conv_up)
    return sources


def discriminator_tf_sources(D: networks.Discriminator) -> Dict[str, tuple]:
    """For every tensor of a stock Discriminator: (TensorFlow variable path, layout conversion or None)."""
    sources = dict()
    for res in D.block_resolutions + [4]:
        block = getattr(D, f'b{res}')
        scope = f'{res}x{res}'
        if hasattr(block, 'fromrgb'):
            _conv_sources(sources, f'b{res}.fromrgb', f'{scope}/FromRGB')
        if res > 4:
            _conv_sources(sources, f'b{res}.conv0', f'{scope}/Conv0')
            _conv_sources(sources, f'b{res}.conv1', f'{scope}/Conv1_down')
            if hasattr(block, 'skip'):
                _conv_sources(sources, f'b{res}.skip', f'{scope}/Skip', bias=False)
    if D.c_dim > 0:
        _dense_sources(sources, 'mapping.embed', 'LabelEmbed')
        for idx in range(D.mapping.num_layers):
            _dense_sources(sources, f'mapping.fc{idx}', f'Mapping{idx}')
    _conv_sources(sources, 'b4.conv', '4x4/Conv')
    _dense_sources(sources, 'b4.fc', '4x4/Dense0')
    _dense_sources(sources, 'b4.out', 'Output')
    return sources


@torch.no_grad()
def _populate_from_tf(net: torch.nn.Module, sources: dict, tf_params: dict, what: str,
                      ignored: Tuple[str, ...] = ()) -> None:
    """Copy the TensorFlow variables into `net`; every tensor must be found and every variable used."""
    used = set()
    for name, tensor in misc.named_params_and_buffers(net):
        if name.endswith('resample_filter'):
            continue  # Built from the constructor arguments (resample_kernel).
        assert name in sources, f'no TensorFlow source known for {name}'
        tf_name, convert_layout = sources[name]
        if tf_name not in tf_params:
            raise ValueError(f'The TensorFlow {what} has no variable "{tf_name}" (for {name}); its static kwargs '
                             f'and its variables disagree, or it is not a StyleGAN2 config E/F network')
        value = np.asarray(tf_params[tf_name], dtype=np.float32)
        if convert_layout is not None:
            value = convert_layout(value)
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f'The TensorFlow {what} variable "{tf_name}" has shape {list(np.shape(tf_params[tf_name]))}, '
                             f'which does not fit {name} {list(tensor.shape)}; its static kwargs and its variables '
                             f'disagree')
        tensor.copy_(torch.from_numpy(np.array(value, dtype=np.float32, order="C")))  # A copy; keeps 0-d shapes.
        used.add(tf_name)
    unused = sorted(name for name in tf_params if name not in used and name not in ignored)
    if unused:
        raise ValueError(f'The TensorFlow {what} has variables that training.networks has no place for: '
                         f'{list_some(unused, 5)}; it is not a StyleGAN2 config E/F network')


def convert_tf_generator(tf_G: Any) -> networks.Generator:
    """A TensorFlow StyleGAN2 / StyleGAN2-ADA generator (`G` or `Gs`) as training.networks.Generator."""
    _check_tf_network(tf_G, 'generator')
    components = tf_G.get('components', {})
    if not all(name in components for name in ('mapping', 'synthesis')):
        raise ValueError('The TensorFlow generator has no mapping and synthesis components; only the StyleGAN2 '
                         'G_main layout converts')
    synthesis_func, mapping_func = _tf_func(components['synthesis']), _tf_func(components['mapping'])
    if synthesis_func not in ('G_synthesis', 'G_synthesis_stylegan2', ''):
        raise ValueError(f'The TensorFlow generator uses the synthesis network {synthesis_func}; only the '
                         f'StyleGAN2 config E/F ones (G_synthesis_stylegan2, StyleGAN2-ADA G_synthesis) convert')
    if mapping_func not in ('G_mapping', ''):
        raise ValueError(f'The TensorFlow generator uses the mapping network {mapping_func}; only G_mapping converts')
    stylegan2_release = synthesis_func == 'G_synthesis_stylegan2'  # Else the StyleGAN2-ADA release.
    kw = _TFKwargs(tf_G, 'generator')
    kw.ignore('truncation_psi', 'truncation_cutoff', 'truncation_psi_val', 'truncation_cutoff_val',
              'style_mixing_prob', 'randomize_noise', 'dtype', 'fused_modconv', 'structure', 'is_template_graph',
              'is_training', 'is_validation', 'return_dlatents', 'force_clean_graph', 'mapping_func', 'synthesis_func')

    z_dim = int(kw.get('latent_size', 512))
    c_dim = int(kw.get('label_size', 0))
    w_dim = int(kw.get('dlatent_size', 512))
    img_resolution = int(kw.get('resolution', 1024))
    img_channels = int(kw.get('num_channels', 3))
    channel_base, channel_max, nf = _tf_channels(kw)
    if c_dim > 0 and stylegan2_release:
        kw.fail('label_size', c_dim, 'the StyleGAN2 release concatenates an unnormalized label embedding '
                                     '(LabelConcat), which training.networks.MappingNetwork does not compute')
    kw.require('normalize_latents', True, 'training.networks always normalizes z')
    fmap_const = kw.get('fmap_const', None)
    if fmap_const is not None and fmap_const != nf(1):
        kw.fail('fmap_const', fmap_const, f'the 4x4 constant must have the 4x4 block\'s {nf(1)} channels')
    w_avg_beta = kw.get('dlatent_avg_beta', 0.995)
    label_fmaps = kw.get('label_fmaps', None)
    mapping_kwargs = dnnlib.EasyDict(
        num_layers      = int(kw.get('mapping_layers', 8)),
        layer_features  = kw.get('mapping_fmaps', 512 if stylegan2_release else None),
        activation      = _tf_activation(kw, 'mapping_nonlinearity'),
        lr_multiplier   = kw.get('mapping_lrmul', 0.01),
        w_avg_beta      = 1 if w_avg_beta is None else w_avg_beta,  # TensorFlow keeps dlatent_avg regardless.
    )
    if c_dim > 0:
        mapping_kwargs.embed_features = label_fmaps if label_fmaps is not None else z_dim
    synthesis_kwargs = dnnlib.EasyDict(
        channel_base    = channel_base,
        channel_max     = channel_max,
        num_fp16_res    = int(kw.get('num_fp16_res', 0) or 0),
        conv_clamp      = kw.get('conv_clamp', None),
        architecture    = _tf_architecture(kw, 'skip'),
        resample_filter = _tf_resample_filter(kw),
        use_noise       = bool(kw.get('use_noise', True)),
        activation      = _tf_activation(kw, 'nonlinearity'),
    )
    kw.check_all_read()

    G = networks.Generator(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                           img_channels=img_channels, mapping_kwargs=mapping_kwargs,
                           synthesis_kwargs=synthesis_kwargs)
    G = G.eval().requires_grad_(False)
    _populate_from_tf(G, generator_tf_sources(G), collect_tf_params(tf_G), 'generator', ignored=('lod',))
    return G


def convert_tf_discriminator(tf_D: Any) -> networks.Discriminator:
    """A TensorFlow StyleGAN2 / StyleGAN2-ADA discriminator as training.networks.Discriminator."""
    _check_tf_network(tf_D, 'discriminator')
    func = _tf_func(tf_D)
    if func not in ('D_main', 'D_stylegan2', ''):
        raise ValueError(f'The TensorFlow discriminator is built by {func}; only the StyleGAN2 config E/F ones '
                         f'(D_stylegan2, StyleGAN2-ADA D_main) convert')
    stylegan2_release = func == 'D_stylegan2'
    kw = _TFKwargs(tf_D, 'discriminator')
    kw.ignore('dtype', 'structure', 'is_template_graph', 'augment_strength', 'pagan_num', 'pagan_fade')
    kw.require('use_pagan', False, 'PA-GAN is a comparison method of the StyleGAN2-ADA paper')
    kw.require('use_spectral_norm', False, 'spectral normalization is a comparison method')
    kw.require('adaptive_dropout', 0, 'adaptive dropout is a comparison method')
    kw.require('score_size', 1, 'auxiliary rotation scores are a comparison method')
    kw.require('score_max', 1, 'auxiliary rotation scores are a comparison method')

    c_dim = int(kw.get('label_size', 0))
    img_resolution = int(kw.get('resolution', 1024))
    channel_base, channel_max, nf = _tf_channels(kw)
    if nf(0) != nf(1):
        kw.fail('fmap_base', kw.values.get('fmap_base', 16384), f'the TensorFlow 4x4/Dense0 layer has nf(0) = {nf(0)} '
                                                                f'features, ours has the 4x4 width {nf(1)}; they '
                                                                f'agree when fmap_base >= 2 * fmap_max')
    if c_dim > 0 and stylegan2_release:
        kw.fail('label_size', c_dim, 'the StyleGAN2 release conditions D by selecting output scores, which '
                                     'training.networks.Discriminator (a projection discriminator) does not do')
    activation = _tf_activation(kw, 'nonlinearity')
    mapping_fmaps = kw.get('mapping_fmaps', None)
    if stylegan2_release:
        group_size = kw.get('mbstd_group_size', 4)
        num_features = int(kw.get('mbstd_num_features', 1)) if group_size is not None and group_size > 1 else 0
    else:
        group_size = kw.get('mbstd_group_size', None)
        num_features = int(kw.get('mbstd_num_features', 1))
    kwargs = dnnlib.EasyDict(
        c_dim           = c_dim,
        img_resolution  = img_resolution,
        img_channels    = int(kw.get('num_channels', 3)),
        architecture    = _tf_architecture(kw, 'resnet'),
        channel_base    = channel_base,
        channel_max     = channel_max,
        num_fp16_res    = int(kw.get('num_fp16_res', 0) or 0),
        conv_clamp      = kw.get('conv_clamp', None),
        cmap_dim        = (mapping_fmaps if mapping_fmaps is not None else nf(0)) if c_dim > 0 else None,
        block_kwargs    = dnnlib.EasyDict(activation=activation, resample_filter=_tf_resample_filter(kw),
                                          freeze_layers=int(kw.get('freeze_layers', 0))),
        mapping_kwargs  = dnnlib.EasyDict(num_layers=int(kw.get('mapping_layers', 0)), activation=activation,
                                          lr_multiplier=kw.get('mapping_lrmul', 0.1)),
        epilogue_kwargs = dnnlib.EasyDict(mbstd_group_size=group_size, mbstd_num_channels=num_features,
                                          activation=activation),
    )
    kw.check_all_read()

    D = networks.Discriminator(**kwargs).eval().requires_grad_(False)
    _populate_from_tf(D, discriminator_tf_sources(D), collect_tf_params(tf_D), 'discriminator')
    return D


def convert_tf_snapshot(obj: Any) -> dict:
    """The snapshot dict of an unpickled TensorFlow pickle: the official `(G, D, Gs)` tuple, or one network."""
    for net in (obj if isinstance(obj, tuple) else (obj,)):
        if isinstance(net, TFNetworkStub):
            _check_tf_network(net, 'network')
    if isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(net, TFNetworkStub) for net in obj):
        tf_G, tf_D, tf_Gs = obj
        kinds = [_tf_kind(net) for net in obj]
        if kinds != ['G', 'D', 'G']:
            raise ValueError(f'The TensorFlow pickle holds networks of kinds {kinds}; expected (G, D, Gs)')
        return dict(training_set_kwargs=None, G=convert_tf_generator(tf_G), D=convert_tf_discriminator(tf_D),
                    G_ema=convert_tf_generator(tf_Gs), augment_pipe=None)
    if isinstance(obj, TFNetworkStub):
        kind = _tf_kind(obj)
        if kind == 'G':
            return dict(training_set_kwargs=None, G_ema=convert_tf_generator(obj), augment_pipe=None)
        if kind == 'D':
            return dict(training_set_kwargs=None, D=convert_tf_discriminator(obj), augment_pipe=None)
        raise ValueError('The TensorFlow pickle holds a network that is neither a generator nor a discriminator')
    found = [type(x).__name__ for x in obj] if isinstance(obj, tuple) else type(obj).__name__
    raise ValueError(f'The TensorFlow pickle holds {found}; expected the tuple (G, D, Gs) of networks or one network')
