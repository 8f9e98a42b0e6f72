"""Reading, writing and converting network snapshots, `dict(training_set_kwargs, G, D, G_ema, augment_pipe)`.

Three file formats hold a snapshot:

- **Pickles** (`.pkl`), as written by the official StyleGAN2-ADA release and by our training loop. Each
  network pickles together with the source code of its module (see torch_utils/persistence.py), so a pickle
  keeps working after the code base changes -- but loading one executes that code. Only load pickles you trust.
- **Weights-only files** (`.pt`, training/weights_only.py): loading one runs no code from the file; the networks
  are rebuilt with the classes of *this* code base.
- **TensorFlow pickles** of the StyleGAN2 and StyleGAN2-ADA TensorFlow releases (config E/F networks,
  training/tf_import.py): read without TensorFlow and converted into this code base's classes.

`load_network_pkl` reads any of the formats (it looks at the first bytes) and can adopt networks of embedded
classes into ours (training/adoption.py); `load_network` returns one network, adopted by default; `convert`
turns one format into another. From the command line (the top-level legacy.py):

    python legacy.py --source=stylegan2-ffhq-config-f.pkl --dest=ffhq.pkl
    python legacy.py convert network-snapshot-000100.pkl network-snapshot-000100.pt
"""

import copy
import io
import os
import pickle
from typing import Any, BinaryIO, Callable, Optional

import torch

import dnnlib
from torch_utils import misc, persistence
from training.adoption import adopt_network, adopt_snapshot
from training.snapshot_dict import NETWORK_KEYS, check_snapshot, device_of
from training.tf_import import TFNetworkStub, convert_tf_snapshot
from training.weights_only import load_weights_only, save_weights_only

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
    code written for the official one can index them; other networks the file lacks stay absent. With
    `force_fp16`, G, D and G_ema are rebuilt with `num_fp16_res=4, conv_clamp=256` (the training configuration)
    and given the loaded weights; the networks still compute in fp32 off-GPU. With `adopt`, networks of classes
    embedded in the pickle become instances of `training.networks` / `training.augment` classes where that is
    safe (notes are printed where not).
    """
    head, f = _peek(f, 4)
    if head.startswith(b'PK'):
        # torch.save writes zip archives; ours is the only kind of them that holds a snapshot.
        data = load_weights_only(f)
    elif head.startswith(b'\x80'):
        data = _load_snapshot_pickle(f)
    else:
        raise ValueError(f'Not a network snapshot: the file is {_describe_head(head)}; expected a pickle '
                         f'(.pkl) or a weights-only file (.pt) written by training.weights_only.save_weights_only')
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
    check_snapshot(data)
    return data


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
        data[key] = new.to(device_of(old))
    return data


# ----------------------------------------------------------------------------
# Writing and converting.


def save_network_pkl(snapshot: dict, path: str) -> None:
    """Pickle `snapshot` to `path` (atomically). Persistent networks carry the source of their module."""
    check_snapshot(snapshot)
    dnnlib.util.write_atomically(path, lambda f: pickle.dump(snapshot, f))


def saver_for(dst: str, default: Optional[Callable] = None) -> Callable:
    """The writer of the format that `dst`'s extension names; `default` for other extensions (ValueError without)."""
    ext = os.path.splitext(os.fspath(dst))[1].lower()
    savers = {'.pkl': save_network_pkl, '.pt': save_weights_only, '.pth': save_weights_only}
    if ext not in savers and default is None:
        raise ValueError(f'Cannot tell the output format from "{dst}": use the extension .pkl (pickle) or .pt '
                         f'(weights-only)')
    return savers.get(ext, default)


def refuse_overwriting_the_source(src: str, dst: str) -> None:
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
    saver = saver_for(dst)
    refuse_overwriting_the_source(src, dst)
    with dnnlib.util.open_url(os.fspath(src)) as f:
        data = load_network_pkl(f, force_fp16=force_fp16, adopt=adopt)
    saver(data, dst)
    return data
