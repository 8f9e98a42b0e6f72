"""Loading and converting network snapshots.

Two file formats hold the same snapshot, `dict(training_set_kwargs, G, D, G_ema, augment_pipe)`:

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

`load_network_pkl` reads either format (it looks at the first bytes), `convert` turns one into the other, and
`load_network` is the one-liner the scripts use. From the command line:

    python -m training.legacy convert network-snapshot-000100.pkl network-snapshot-000100.pt
"""

import copy
import io
import os
import pickle
from typing import Any, BinaryIO

import click
import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence

WEIGHTS_FORMAT = 'stylegan2-weights'     # Value of the 'format' field of a weights-only file.
WEIGHTS_VERSION = 1                      # Layout version written by this code; newer files are refused.
NETWORK_KEYS = ('G', 'D', 'G_ema', 'augment_pipe')  # Snapshot entries that hold networks.

# ----------------------------------------------------------------------------
# Reading either format.


def load_network_pkl(f: BinaryIO, force_fp16: bool = False) -> dict:
    """Read a snapshot from the open binary file `f`: an official or our own pickle, or a weights-only file.

    Returns the snapshot dict. Entries the file does not hold (a file with only `G_ema`, say) are absent
    from it rather than None. With `force_fp16`, G, D and G_ema are rebuilt with `num_fp16_res=4,
    conv_clamp=256` (the training configuration) and given the loaded weights; the networks still compute
    in fp32 off-GPU.
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
    if force_fp16:
        data = _rebuild_for_fp16(data)
    return data


def load_network(
    path_or_url:    str,                # Local path, file:// or http(s):// URL of a .pkl or weights-only .pt file.
    key:            str = 'G_ema',      # Which network of the snapshot to return.
    device:         Any = 'cpu',        # Where to put it.
    force_fp16:     bool = False,       # Rebuild with the training-time fp16 settings (see load_network_pkl).
) -> torch.nn.Module:
    """Load one network of a snapshot, e.g. `G = load_network('ffhq.pkl')` for the EMA generator."""
    with dnnlib.util.open_url(path_or_url) as f:
        data = load_network_pkl(f, force_fp16=force_fp16)
    net = data.get(key)
    if not isinstance(net, torch.nn.Module):
        available = [name for name, value in data.items() if isinstance(value, torch.nn.Module)]
        raise ValueError(f'"{path_or_url}" holds no network "{key}"; it has: {", ".join(available) or "none"}')
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
    """Unpickler that turns references to code this code base lacks into messages a user can act on."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split('.')[0] == 'tensorflow' or module.startswith('dnnlib.tflib'):
            raise ValueError('This is a TensorFlow snapshot (it refers to "dnnlib.tflib"); TensorFlow snapshots are not '
                             'supported. Convert it to a PyTorch pickle with the legacy.py of the official '
                             'stylegan2-ada-pytorch release first.')
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
        data[key] = new
    return data


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


def convert(src: str, dst: str) -> dict:
    """Convert the snapshot `src` (path or URL, either format) into the format named by `dst`'s extension:
    `.pkl` for a pickle, `.pt` (or `.pth`) for a weights-only file. Returns the loaded snapshot.

    Networks read from a weights-only file are instances of this code base's classes, so a pickle written from
    one carries our module source.
    """
    ext = os.path.splitext(os.fspath(dst))[1].lower()
    savers = {'.pkl': save_network_pkl, '.pt': save_weights_only, '.pth': save_weights_only}
    if ext not in savers:
        raise ValueError(f'Cannot tell the output format from "{dst}": use the extension .pkl (pickle) or .pt '
                         f'(weights-only)')
    with dnnlib.util.open_url(os.fspath(src)) as f:
        data = load_network_pkl(f)
    savers[ext](data, dst)
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
    networks = [key for key, value in data.items() if isinstance(value, torch.nn.Module)]
    click.echo(f'Wrote {dst} ({", ".join(networks)})')


if __name__ == '__main__':
    cli()
