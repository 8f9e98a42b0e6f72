"""Loading, adopting and converting network snapshots.

Three file formats hold a snapshot, `dict(training_set_kwargs, G, D, G_ema, augment_pipe)`:

- **Pickles** (`.pkl`), as written by the official StyleGAN2-ADA release and by our training loop. Each
  network pickles together with the source code of its module (see torch_utils/persistence.py), so a pickle
  keeps working after the code base changes -- but loading one executes that code. Only load pickles you trust.
- **Weights-only files** (`.pt`), written by `save_weights_only`: a `torch.save` of plain Python containers,
  tensors and strings, so `torch.load(path, weights_only=True)` reads it without running any code. The
  networks are rebuilt from class names and constructor arguments with the classes of *this* code base:

      {'format': 'stylegan2-weights', 'version': 1,
       'training_set_kwargs': dict or None,
       'networks': {'G': {'class_name': 'training.networks.Generator', 'init_args': [...],
                          'init_kwargs': {...}, 'state_dict': {name: tensor}},
                    'augment_pipe': None, ...}}

- **TensorFlow pickles** of the StyleGAN2 and StyleGAN2-ADA TensorFlow releases (config E/F networks): a
  tuple `(G, D, Gs)` of `dnnlib.tflib.network.Network` objects. They are read without TensorFlow (the
  unpickler stands in a plain record for each Network) and converted into this code base's classes.

**Adoption.** An official `.pkl` unpickles into the classes embedded in it, which, for example, compute their
fp16 layers in float16 even on the CPU (two orders of magnitude slower than float32 there). `adopt_network`
rebuilds such a network as the class of the same name in `training.networks` / `training.augment` from its
constructor arguments and copies every tensor, after checking that the two compute the same outputs. A network
that cannot be adopted (a class we lack, arguments our class rejects, tensors that do not fit, other outputs)
keeps its embedded class, and a one-line note says why. `load_network` (what the scripts call) adopts by
default; `load_network_pkl` keeps the official behaviour (embedded classes) unless asked.

`load_network_pkl` reads any of the formats (it looks at the first bytes), `convert` turns one into another.
From the command line (the official one, and our two-argument form):

    python legacy.py --source=stylegan2-ffhq-config-f.pkl --dest=ffhq.pkl
    python -m training.legacy convert network-snapshot-000100.pkl network-snapshot-000100.pt
"""

import copy
import io
import os
import pickle
from typing import Any, BinaryIO, Callable, Dict, Optional, Tuple

import click
import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence
from torch_utils.ops import bias_act
from training import augment, networks

WEIGHTS_FORMAT = 'stylegan2-weights'     # Value of the 'format' field of a weights-only file.
WEIGHTS_VERSION = 1                      # Layout version written by this code; newer files are refused.
NETWORK_KEYS = ('G', 'D', 'G_ema', 'augment_pipe')  # Snapshot entries that hold networks.

# ----------------------------------------------------------------------------
# Reading any format.


def load_network_pkl(
    f:              BinaryIO,           # Open binary file: a PyTorch or TensorFlow pickle, or a weights-only file.
    force_fp16:     bool = False,       # Rebuild G, D, G_ema with the training-time fp16 settings.
    adopt:          bool = False,       # Rebuild networks of embedded classes as this code base's (adopt_snapshot).
) -> dict:
    """Read a snapshot from the open binary file `f`: an official or our own pickle, a TensorFlow pickle of
    the StyleGAN2(-ADA) TensorFlow releases, or a weights-only file.

    Returns the snapshot dict. As the official function does, it always has `training_set_kwargs` and
    `augment_pipe` (None when the file holds neither: a TensorFlow pickle, a file with only `G_ema`), so that
    code written for the official one can index them; other networks the file lacks stay absent. With `force_fp16`, G, D and G_ema are rebuilt with `num_fp16_res=4,
    conv_clamp=256` (the training configuration) and given the loaded weights; the networks still compute
    in fp32 off-GPU. With `adopt`, networks of classes embedded in the pickle become instances of
    `training.networks` / `training.augment` classes where that is safe (notes are printed where not).
    """
    head, f = _peek(f, 4)
    if head.startswith(b'PK'):
        # torch.save writes zip archives; ours is the only kind of them that holds a snapshot.
        data = load_weights_only(f)
    elif head.startswith(b'\x80'):
        data = _load_snapshot_pickle(f)
    else:
        raise ValueError(f'Not a network snapshot: the file is {_describe_head(head)}; expected a pickle '
                         f'(.pkl) or a weights-only file (.pt) written by training.legacy.save_weights_only')
    data.setdefault('training_set_kwargs', None)
    data.setdefault('augment_pipe', None)
    if adopt:
        data = adopt_snapshot(data)
    if force_fp16:
        data = _rebuild_for_fp16(data)
    return data


def load_network(
    path_or_url:    str,                # Local path, file:// or http(s):// URL of a .pkl or weights-only .pt file.
    key:            str = 'G_ema',      # Which network of the snapshot to return.
    device:         Any = 'cpu',        # Where to put it.
    force_fp16:     bool = False,       # Rebuild with the training-time fp16 settings (see load_network_pkl).
    adopt:          bool = True,        # Rebuild an embedded class as this code base's (see adopt_network).
    verbose:        bool = True,        # Print the note when a network keeps its embedded class.
) -> torch.nn.Module:
    """Load one network of a snapshot, e.g. `G = load_network('ffhq.pkl')` for the EMA generator."""
    with dnnlib.util.open_url(path_or_url) as f:
        data = load_network_pkl(f)
    net = data.get(key)
    if not isinstance(net, torch.nn.Module):
        available = [name for name, value in data.items() if isinstance(value, torch.nn.Module)]
        raise ValueError(f'"{path_or_url}" holds no network "{key}"; it has: {", ".join(available) or "none"}')
    if adopt:
        net, note = adopt_network(net, name=key)
        if note is not None and verbose:
            print(note)
    if force_fp16:
        net = _rebuild_for_fp16({key: net})[key]
    return net.to(device)


def _peek(f: BinaryIO, size: int) -> tuple:
    """The first `size` bytes of `f` and a file positioned where `f` was (a copy if `f` cannot seek)."""
    if f.seekable():
        start = f.tell()
        head = f.read(size)
        f.seek(start)
        return head, f
    buffer = io.BytesIO(f.read())
    return buffer.getvalue()[:size], buffer


def _describe_head(head: bytes) -> str:
    if len(head) == 0:
        return 'empty'
    if head[:2] == b'\x1f\x8b':
        return 'gzip-compressed (decompress it first)'
    if all(32 <= byte < 127 or byte in b'\t\r\n' for byte in head):
        return f'text starting with {head.decode("ascii")!r} (an HTML error page instead of a download, perhaps)'
    return f'unrecognised binary data starting with bytes {head.hex(" ")}'


class _SnapshotUnpickler(pickle.Unpickler):
    """Unpickler that stands in `TFNetworkStub` for the networks of TensorFlow pickles and turns references to
    code this code base lacks into messages a user can act on."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ('dnnlib.tflib.network', 'Network'):
            return TFNetworkStub
        if module.split('.')[0] == 'tensorflow' or module.startswith('dnnlib.tflib'):
            raise ValueError(f'The TensorFlow pickle refers to "{module}.{name}", which cannot be read without '
                             f'TensorFlow; only the networks (dnnlib.tflib.network.Network) of StyleGAN2 and '
                             f'StyleGAN2-ADA TensorFlow pickles can be converted')
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f'The pickle needs "{module}.{name}", which this code base does not provide ({e}); '
                             f'it is not a StyleGAN2-ADA (PyTorch) snapshot or needs code that is not installed') from e


def _load_snapshot_pickle(f: BinaryIO) -> dict:
    try:
        data = _SnapshotUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f'The pickle is truncated or corrupt ({type(e).__name__}: {e})') from e
    if isinstance(data, TFNetworkStub) or (isinstance(data, tuple) and any(isinstance(x, TFNetworkStub) for x in data)):
        return convert_tf_snapshot(data)
    if not isinstance(data, dict):
        hint = ' (a torch.save file in the old non-zip format?)' if isinstance(data, int) else ''
        raise ValueError(f'The pickle holds a {type(data).__name__}{hint}, not a snapshot dict with networks '
                         f'{", ".join(NETWORK_KEYS)}')
    _check_snapshot(data)
    return data


def _check_snapshot(data: dict) -> None:
    """A snapshot must hold at least one of G, D, G_ema; whatever network entries it has are modules or None."""
    for key in NETWORK_KEYS:
        value = data.get(key)
        if value is not None and not isinstance(value, torch.nn.Module):
            raise ValueError(f'Snapshot entry "{key}" is a {type(value).__name__}, not a network')
    if not any(isinstance(data.get(key), torch.nn.Module) for key in ('G', 'D', 'G_ema')):
        keys = ', '.join(repr(key) for key in data) or 'none'
        raise ValueError(f'The file holds a dict without networks (keys: {keys}); a snapshot has at least one of '
                         f'G, D, G_ema')


def _rebuild_for_fp16(data: dict) -> dict:
    """Rebuild G, D and G_ema with the training-time mixed-precision settings and the same weights.

    Generators take the settings in their synthesis kwargs, the discriminator at the top level.
    """
    data = dict(data)
    for key in ('G', 'D', 'G_ema'):
        old = data.get(key)
        if old is None:
            continue
        if not persistence.is_persistent(old):
            raise ValueError(f'Cannot rebuild network "{key}" for fp16: its class {type(old).__name__} does not '
                             f'record its constructor arguments')
        kwargs = copy.deepcopy(old.init_kwargs)
        if key == 'D':
            target = kwargs
        else:
            target = kwargs['synthesis_kwargs'] = dnnlib.EasyDict(kwargs.get('synthesis_kwargs', {}))
        target['num_fp16_res'] = 4
        target['conv_clamp'] = 256
        if kwargs == old.init_kwargs:
            continue  # Already configured that way.
        new = type(old)(*old.init_args, **kwargs).eval().requires_grad_(False)
        misc.copy_params_and_buffers(old, new, require_all=True)
        data[key] = new.to(_device_of(old))
    return data


def _device_of(net: torch.nn.Module) -> torch.device:
    tensors = misc.params_and_buffers(net)
    return tensors[0].device if tensors else torch.device('cpu')

# ----------------------------------------------------------------------------
# Adoption: networks of embedded classes rebuilt as this code base's classes.

ADOPT_TOLERANCE = 1e-3  # Largest output difference, relative to the output's magnitude, that counts as "the same".


def adoptable_classes() -> Dict[str, type]:
    """Class name -> class, for every persistent class of training.networks and training.augment: the classes
    an embedded network of the same name can be rebuilt as."""
    classes = dict()
    for module in (networks, augment):
        for name, value in vars(module).items():
            if isinstance(value, type) and persistence.is_persistent(value) and value.__name__ == name:
                classes[name] = value
    return classes


def _class_origin(cls: type) -> str:
    """How a note names a class: embedded classes live in modules made from snapshot source (persistence)."""
    if cls.__module__.startswith('_imported_module_'):
        return f'{cls.__name__}, from the source stored in the snapshot'
    return f'{cls.__module__}.{cls.__name__}'


def adopt_network(
    net:            Optional[torch.nn.Module],  # A network of a loaded snapshot (or None).
    name:           str = 'network',            # What the note calls it ("G_ema", "D", ...).
    verify:         bool = True,                # Compare the fp32 outputs of G / D before accepting the rebuild.
) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    """Rebuild `net` as this code base's class of the same name and return `(network, note)`.

    The rebuilt network is constructed from `net.init_args` / `net.init_kwargs`, receives every parameter and
    buffer (`misc.copy_params_and_buffers(..., require_all=True)`; both sides must hold the same names and
    shapes), is in eval mode without gradients, on the device of `net`. With `verify`, a Generator or
    Discriminator is accepted only if it computes the same fp32 outputs as `net` on a fixed input (const
    noise), so a snapshot whose code was changed while keeping the names keeps its own class.

    `note` is None when `net` was rebuilt, is already of our classes or is None; otherwise `net` is returned
    unchanged and `note` is one line saying why (e.g. "Kept the snapshot's own class for D (MyD, ...): ...").
    """
    if net is None:
        return None, None
    cls = type(net)
    ours = adoptable_classes().get(cls.__name__)
    if ours is cls:
        return net, None

    def keep(reason: str) -> Tuple[torch.nn.Module, str]:
        return net, f"Kept the snapshot's own class for {name} ({_class_origin(cls)}): {reason}"

    if ours is None:
        return keep(f'this code base has no class named {cls.__name__} (training.networks, training.augment)')
    our_name = f'{ours.__module__}.{ours.__name__}'
    if not persistence.is_persistent(net):
        return keep('it does not record its constructor arguments')
    try:
        new = ours(*net.init_args, **net.init_kwargs)
    except Exception as e:  # Whatever the constructor dislikes about foreign arguments.
        return keep(f'{our_name} rejects its constructor arguments ({type(e).__name__}: {_first_line(e)})')
    mismatch = _tensor_mismatch(net, new)
    if mismatch is not None:
        return keep(f'its tensors do not fit {our_name}: {mismatch}')
    new = new.eval().requires_grad_(False).to(_device_of(net))
    misc.copy_params_and_buffers(net, new, require_all=True)
    if verify and ours in (networks.Generator, networks.Discriminator):
        problem = _output_mismatch(net, new)
        if problem is not None:
            return keep(f'{our_name} with the same weights {problem}')
    return new, None


def adopt_snapshot(
    data:           dict,                       # A snapshot dict as load_network_pkl returns it.
    verbose:        bool = True,                # Print the note of every network that keeps its embedded class.
    verify:         bool = True,                # See adopt_network.
) -> dict:
    """A copy of the snapshot dict with every network adopted (see adopt_network)."""
    data = dict(data)
    for key in NETWORK_KEYS:
        if isinstance(data.get(key), torch.nn.Module):
            data[key], note = adopt_network(data[key], name=key, verify=verify)
            if note is not None and verbose:
                print(note)
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tensor_mismatch(src: torch.nn.Module, dst: torch.nn.Module) -> Optional[str]:
    """None if both hold the same tensor names with the same shapes, else a short description."""
    src_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(src)}
    dst_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(dst)}
    problems = []
    missing = [name for name in dst_shapes if name not in src_shapes]
    extra = [name for name in src_shapes if name not in dst_shapes]
    reshaped = [name for name in dst_shapes if name in src_shapes and src_shapes[name] != dst_shapes[name]]
    if extra:
        problems.append(f'only the snapshot has {_some(extra)}')
    if missing:
        problems.append(f'the snapshot lacks {_some(missing)}')
    for name in reshaped[:3]:
        problems.append(f'{name} is {list(src_shapes[name])} in the snapshot, {list(dst_shapes[name])} here')
    return '; '.join(problems) if problems else None


def _some(names: list, limit: int = 3) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


@torch.no_grad()
def _output_mismatch(old: torch.nn.Module, new: torch.nn.Module) -> Optional[str]:
    """None if `old` and `new` give the same fp32 outputs on a fixed input, else what differs.

    Generators run with const noise, so neither draws random numbers; the global RNG state is kept anyway.
    """
    device = _device_of(new)
    gen = torch.Generator().manual_seed(123)
    c_dim = int(getattr(new, 'c_dim', 0))
    c = torch.zeros([1, c_dim], device=device)
    c[:, :1] = 1  # Class 0 of a conditional network.
    # One sample: the check costs one forward pass of each network (seconds for a 1024x1024 G on a CPU).
    if isinstance(new, networks.Generator):
        inputs = (torch.randn([1, new.z_dim], generator=gen).to(device), c)
        kwargs = dict(noise_mode='const', force_fp32=True)
    else:
        img = torch.randn([1, new.img_channels, new.img_resolution, new.img_resolution], generator=gen)
        inputs = (img.to(device), c)
        kwargs = dict(force_fp32=True)
    was_training = old.training
    try:
        with torch.random.fork_rng(devices=[]):
            old.eval()
            ref = old(*inputs, **kwargs).to(torch.float32)
            out = new(*inputs, **kwargs).to(torch.float32)
    except Exception as e:  # The snapshot's code may not take the official call signature.
        return f'cannot be compared to the snapshot\'s network ({type(e).__name__}: {_first_line(e)})'
    finally:
        old.train(was_training)
    if ref.shape != out.shape:
        return f'gives outputs of shape {list(out.shape)}, the snapshot\'s network {list(ref.shape)}'
    diff = float((out - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= ADOPT_TOLERANCE * scale:  # Also catches NaN.
        return (f'computes other outputs (max |difference| {diff:.3g}): the snapshot\'s own code computes something '
                f'else than the official code that class reproduces')
    return None

# ----------------------------------------------------------------------------
# TensorFlow pickles (StyleGAN2 and StyleGAN2-ADA TensorFlow releases).
#
# A TensorFlow pickle holds `dnnlib.tflib.network.Network` objects, pickled as their state dict: `version`,
# `name`, `static_kwargs` (the constructor keywords of the network's build function), `components` (the
# sub-networks, e.g. G's `mapping` and `synthesis`), `build_module_src`, `build_func_name` and `variables`
# (a list of (name, numpy array) relative to the network's scope). The variables follow the TensorFlow
# layouts: dense weights [in, out], conv weights [kh, kw, in, out], the 4x4 constant [1, C, 4, 4], noise
# maps [1, 1, H, W]; style affine biases are stored without their +1 initialization offset; and the
# TensorFlow upsampling convolution (a transposed convolution) uses its kernel flipped relative to ours
# (flip_weight=False in training.networks), so upsampling kernels are flipped spatially when converted.
# The downsampling convolutions of D blur first and then convolve, as ours do, and need no flip.

TF_MIN_VERSION = 4  # Network pickle version of the StyleGAN2 TensorFlow releases.


class TFNetworkStub(dnnlib.EasyDict):
    """What a `dnnlib.tflib.network.Network` of a TensorFlow pickle unpickles into: its pickled state (version,
    name, static_kwargs, components, build_func_name, variables, ...) as a dict with attribute access."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


_TFNetworkStub = TFNetworkStub  # The name official code uses for its stand-in.


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
                         f'{_some(unused, 5)}; it is not a StyleGAN2 config E/F network')


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

# ----------------------------------------------------------------------------
# The weights-only format.


def snapshot_to_weights_only(snapshot: dict) -> dict:
    """The weights-only record of a snapshot dict: plain containers, strings, numbers and CPU tensors."""
    if not isinstance(snapshot, dict):
        raise ValueError(f'Expected a snapshot dict, got a {type(snapshot).__name__}')
    unknown = [key for key in snapshot if key not in NETWORK_KEYS and key != 'training_set_kwargs']
    if unknown:
        raise ValueError(f'A weights-only file stores training_set_kwargs and the networks {", ".join(NETWORK_KEYS)}; '
                         f'the snapshot also has {", ".join(repr(key) for key in unknown)}')
    _check_snapshot(snapshot)

    networks = dict()
    for key, value in snapshot.items():
        if key == 'training_set_kwargs':
            continue
        if value is None:
            networks[key] = None
            continue
        if not persistence.is_persistent(value):
            raise ValueError(f'Network "{key}" ({type(value).__name__}) does not record its constructor arguments; '
                             f'only persistent classes (torch_utils.persistence) can be rebuilt from a weights-only file')
        networks[key] = dict(
            class_name  = weights_class_name(value),
            init_args   = to_plain(list(value.init_args), f'{key}.init_args'),
            init_kwargs = to_plain(value.init_kwargs, f'{key}.init_kwargs'),
            state_dict  = {name: tensor.detach().cpu() for name, tensor in value.state_dict().items()},
        )
    return dict(
        format              = WEIGHTS_FORMAT,
        version             = WEIGHTS_VERSION,
        training_set_kwargs = to_plain(snapshot.get('training_set_kwargs'), 'training_set_kwargs'),
        networks            = networks,
    )


def weights_class_name(net: torch.nn.Module) -> str:
    """The dotted name under which a weights-only file records a network's class.

    A network of this code base keeps its own module. One loaded from a pickle lives in a module made from the
    embedded source (an official snapshot's networks.py, say); it is recorded under our class of the same name,
    which shares its constructor keywords and tensor names (SPEC.md section 2).
    """
    cls = type(net)
    if cls.__module__.split('.')[0] == 'training':
        return f'{cls.__module__}.{cls.__name__}'
    module = 'training.augment' if cls.__name__ == 'AugmentPipe' else 'training.networks'
    return f'{module}.{cls.__name__}'


def to_plain(obj: Any, where: str) -> Any:
    """`obj` with EasyDicts turned into dicts, tuples into lists and NumPy scalars into Python numbers."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {to_plain(key, where): to_plain(value, f'{where}.{key}') for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(value, f'{where}[{i}]') for i, value in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    raise ValueError(f'{where} is a {type(obj).__name__}, which a weights-only file cannot store')


def save_weights_only(snapshot: dict, path: str) -> None:
    """Write `snapshot` as a weights-only file (atomically: a crash leaves the old file or none)."""
    record = snapshot_to_weights_only(snapshot)
    dnnlib.util.write_atomically(path, lambda f: torch.save(record, f))


def load_weights_only(path_or_file: Any, device: Any = 'cpu') -> dict:
    """Read a weights-only file (path or open binary file) and rebuild its networks with this code base's
    classes: loaded with `load_state_dict(strict=True)`, in eval mode, without gradients, on `device`."""
    name = path_or_file if isinstance(path_or_file, (str, os.PathLike)) else 'The file'
    try:
        record = torch.load(path_or_file, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f'{name} is not a weights-only snapshot: torch.load(weights_only=True) failed '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    if not isinstance(record, dict) or record.get('format') != WEIGHTS_FORMAT:
        found = f'a dict with keys {sorted(map(str, record))}' if isinstance(record, dict) else f'a {type(record).__name__}'
        raise ValueError(f'{name} is not a weights-only snapshot: it holds {found}, without format="{WEIGHTS_FORMAT}"')
    version = record.get('version')
    if not isinstance(version, int) or version > WEIGHTS_VERSION:
        raise ValueError(f'{name} has weights-only format version {version!r}; this code reads version '
                         f'{WEIGHTS_VERSION} and older')
    networks = record.get('networks')
    if not isinstance(networks, dict):
        raise ValueError(f'{name} is a damaged weights-only snapshot: "networks" is not a dict')

    data = dict(training_set_kwargs=record.get('training_set_kwargs'))
    for key, entry in networks.items():
        data[key] = None if entry is None else _rebuild_network(key, entry, device)
    _check_snapshot(data)
    return data


def _rebuild_network(key: str, entry: Any, device: Any) -> torch.nn.Module:
    fields = {'class_name': str, 'init_args': list, 'init_kwargs': dict, 'state_dict': dict}
    if not isinstance(entry, dict) or any(not isinstance(entry.get(f), t) for f, t in fields.items()):
        raise ValueError(f'Weights-only entry "{key}" is damaged: it needs the fields {", ".join(fields)}')
    class_name = entry['class_name']
    try:
        cls = dnnlib.util.get_obj_by_name(class_name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f'Cannot rebuild network "{key}": class "{class_name}" cannot be imported from this code '
                          f'base ({e})') from e
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ImportError(f'Cannot rebuild network "{key}": "{class_name}" is not a torch.nn.Module class')
    net = dnnlib.util.construct_class_by_name(*entry['init_args'], class_name=class_name, **entry['init_kwargs'])
    try:
        net.load_state_dict(entry['state_dict'], strict=True)
    except RuntimeError as e:
        raise ValueError(f'The weights of network "{key}" do not fit {class_name}: {e}') from e
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------
# Writing and converting.


def save_network_pkl(snapshot: dict, path: str) -> None:
    """Pickle `snapshot` to `path` (atomically). Persistent networks carry the source of their module."""
    _check_snapshot(snapshot)
    dnnlib.util.write_atomically(path, lambda f: pickle.dump(snapshot, f))


def _saver_for(dst: str, default: Optional[Callable] = None) -> Callable:
    ext = os.path.splitext(os.fspath(dst))[1].lower()
    savers = {'.pkl': save_network_pkl, '.pt': save_weights_only, '.pth': save_weights_only}
    if ext not in savers and default is None:
        raise ValueError(f'Cannot tell the output format from "{dst}": use the extension .pkl (pickle) or .pt '
                         f'(weights-only)')
    return savers.get(ext, default)


def _refuse_overwriting_the_source(src: str, dst: str) -> None:
    """A destination that is the source file (also through another path, a hard link or a symlink) would
    replace the only copy of the snapshot with its conversion: ValueError. URLs other than file:// are never
    the destination."""
    src = os.fspath(src)
    if src.startswith('file://'):
        src = dnnlib.util.file_url_to_path(src)
    elif dnnlib.util.is_url(src):
        return
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f'--dest "{dst}" is the source file "{src}"; writing it would replace the snapshot with '
                         f'its conversion: give another --dest')


def convert(src: str, dst: str, force_fp16: bool = False, adopt: bool = False) -> dict:
    """Convert the snapshot `src` (path or URL, any format) into the format named by `dst`'s extension:
    `.pkl` for a pickle, `.pt` (or `.pth`) for a weights-only file. Returns the loaded snapshot.

    Networks read from a weights-only or TensorFlow file, and adopted ones, are instances of this code base's
    classes, so a pickle written from them carries our module source.
    """
    saver = _saver_for(dst)
    _refuse_overwriting_the_source(src, dst)
    with dnnlib.util.open_url(os.fspath(src)) as f:
        data = load_network_pkl(f, force_fp16=force_fp16, adopt=adopt)
    saver(data, dst)
    return data


# ----------------------------------------------------------------------------
# Command line.


@click.group()
def cli() -> None:
    """Snapshot tools."""


@cli.command('convert')
@click.argument('src')
@click.argument('dst')
def convert_command(src: str, dst: str) -> None:
    """Convert snapshot SRC (.pkl or weights-only .pt, path or URL) to DST; DST's extension picks the format.

    A weights-only file loads with torch.load(weights_only=True), without running code stored in the file.
    """
    try:
        data = convert(src, dst)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    networks_found = [key for key, value in data.items() if isinstance(value, torch.nn.Module)]
    click.echo(f'Wrote {dst} ({", ".join(networks_found)})')


CONVERT_EXAMPLES = """\b
Examples:

\b
  # A TensorFlow StyleGAN2 pickle as a PyTorch pickle of this code base's classes:
  python legacy.py \\
      --source=https://nvlabs-fi-cdn.nvidia.com/stylegan2/networks/stylegan2-cat-config-f.pkl \\
      --dest=stylegan2-cat-config-f.pkl

\b
  # An official PyTorch snapshot, adopted into our classes and prepared for fp16 training:
  python legacy.py --source=ffhq.pkl --dest=ffhq-ours.pkl --force-fp16=1

\b
  # Keep the classes embedded in the source pickle; write a weights-only file instead of a pickle:
  python legacy.py --source=ffhq.pkl --dest=ffhq-copy.pkl --adopt=0
  python legacy.py --source=ffhq.pkl --dest=ffhq.pt
"""


@click.command(epilog=CONVERT_EXAMPLES)
@click.option('--source', required=True, metavar='PATH|URL',
              help='Snapshot to convert: a TensorFlow or PyTorch .pkl, or a weights-only .pt')
@click.option('--dest', required=True, metavar='PATH',
              help='Output: a PyTorch pickle, or a weights-only file if the name ends in .pt')
@click.option('--force-fp16', type=bool, default=False, show_default=True, metavar='BOOL',
              help='Rebuild G, D, G_ema with the training-time fp16 settings (num_fp16_res=4, conv_clamp=256)')
@click.option('--adopt', type=bool, default=True, show_default=True, metavar='BOOL',
              help="Rebuild networks as this code base's classes; 0 keeps the classes embedded in the pickle")
def convert_network_pickle(source: str, dest: str, force_fp16: bool, adopt: bool) -> None:
    """Convert a network snapshot into this code base's PyTorch format.

    Reads TensorFlow pickles of the StyleGAN2 and StyleGAN2-ADA TensorFlow releases (config E/F networks;
    not StyleGAN1, configs A-D or the comparison methods), official and our PyTorch pickles, and weights-only
    files. No TensorFlow needed.
    """
    try:
        _refuse_overwriting_the_source(source, dest)
        print(f'Loading "{source}"...')
        with dnnlib.util.open_url(source) as f:
            data = load_network_pkl(f, force_fp16=force_fp16, adopt=adopt)
        print(f'Saving "{dest}"...')
        _saver_for(dest, default=save_network_pkl)(data, dest)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(_first_line(e)) from None
    print('Done.')


if __name__ == '__main__':
    cli()
