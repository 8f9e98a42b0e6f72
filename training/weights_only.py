"""The weights-only snapshot format (`.pt`): a `torch.save` of plain Python containers, tensors and strings, so
`torch.load(path, weights_only=True)` reads it without running any code. The networks are rebuilt from class
names and constructor arguments with the classes of *this* code base:

    {'format': 'stylegan2-weights', 'version': 1,
     'training_set_kwargs': dict or None,
     'networks': {'G': {'class_name': 'training.networks.Generator', 'init_args': [...],
                        'init_kwargs': {...}, 'state_dict': {name: tensor}},
                  'augment_pipe': None, ...}}
"""

import os
import pickle
from typing import Any

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from training.snapshot_dict import NETWORK_KEYS, check_snapshot

WEIGHTS_FORMAT = 'stylegan2-weights'     # Value of the 'format' field of a weights-only file.
WEIGHTS_VERSION = 1                      # Layout version written by this code; newer files are refused.

def snapshot_to_weights_only(snapshot: dict) -> dict:
    """The weights-only record of a snapshot dict: plain containers, strings, numbers and CPU tensors."""
    if not isinstance(snapshot, dict):
        raise ValueError(f'Expected a snapshot dict, got a {type(snapshot).__name__}')
    unknown = [key for key in snapshot if key not in NETWORK_KEYS and key != 'training_set_kwargs']
    if unknown:
        raise ValueError(f'A weights-only file stores training_set_kwargs and the networks {", ".join(NETWORK_KEYS)}; '
                         f'the snapshot also has {", ".join(repr(key) for key in unknown)}')
    check_snapshot(snapshot)

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
    check_snapshot(data)
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
