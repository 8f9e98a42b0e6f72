"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

Network snapshots (`network-snapshot-*.pkl`) hold the networks only; resuming from one restarts the
counters, the augmentation strength and the optimizer moments (the official behaviour, kept for transfer
learning). A training state adds what that loses:

    {'format': 'stylegan2-training-state', 'version': 1,
     'options':  the training_loop kwargs of the run (plain JSON-like values),
     'progress': {cur_nimg, cur_tick, batch_idx, tick_start_nimg, between_ticks (written by a stop: cur_tick is
                  the tick in progress, which the resumed run finishes; absent in older states)},
     'networks': {'G', 'D', 'G_ema', 'augment_pipe': state dicts (augment_pipe may be None)},
     'optimizers': {'G', 'D': optimizer state dicts},
     'loss': {'pl_mean': tensor, 'd_terms': {'<i>.<name>': the state of the i-th D term (runs with --reg only)}},
     'loss_ranks': [every rank's 'loss', in rank order] with several processes (absent or None otherwise),
     'ada': {'pending': [count, sum, sum of squares] of the D signs not yet used for an update} or None,
     'health': the divergence monitor's per-tick loss history (training/health.py) or None,
     'tick_stats': in a state written by a stop, the statistics of the tick in progress (training_stats
                   Collector.state_dict() of the log's and the monitor's collectors); None at a tick,
     'rng': {'torch', 'numpy', 'python': generator states}}

It contains only tensors and plain containers, so `torch.load(path, weights_only=True)` reads it without
running code, and it is written to a temporary file and renamed, so a crash leaves the previous state intact.
"""

import os
import random
import re
from typing import Optional

import numpy as np
import torch

import dnnlib

STATE_FORMAT = 'stylegan2-training-state'
STATE_VERSION = 1
STATE_FILE_NAME = 'training-state.pt'   # One per run directory, replaced at every network snapshot.


def save_training_state(path: str, state: dict) -> None:
    """Write a training state atomically; `state` holds the fields of the module docstring except format."""
    record = dict(format=STATE_FORMAT, version=STATE_VERSION, **state)
    dnnlib.util.write_atomically(path, lambda f: torch.save(record, f))


def load_training_state(path: str, mmap: bool = False) -> dict:
    """Read and check a training state (weights_only: no code from the file runs). With `mmap`, tensors are
    mapped from the file rather than read, which makes checking a state or reading its options cheap even
    when the file holds gigabytes of weights and optimizer moments."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No training state at "{path}"')
    try:
        record = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for files that are not torch.save archives.
        raise ValueError(f'"{path}" is not a training state: torch.load(weights_only=True) failed '
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    if not isinstance(record, dict) or record.get('format') != STATE_FORMAT:
        raise ValueError(f'"{path}" is not a training state (no format="{STATE_FORMAT}" field); a network '
                         f'snapshot (.pkl) is resumed with --resume=<pkl> and starts a new run')
    if record.get('version') != STATE_VERSION:
        raise ValueError(f'"{path}" has training-state version {record.get("version")!r}; this code reads '
                         f'version {STATE_VERSION}')
    missing = [key for key in ('options', 'progress', 'networks', 'optimizers') if key not in record]
    if missing:
        raise ValueError(f'"{path}" is a damaged training state: it lacks {", ".join(missing)}')
    return record


def find_state_file(path: str) -> Optional[str]:
    """The training state that `--resume=path` refers to, or None if `path` is not one.

    A run directory gives its `training-state.pt` (None if it has none); a file is returned if it is a
    training state. Anything else (a .pkl, a URL, a preset name) is None: it is not ours to resume.
    """
    if os.path.isdir(path):
        candidate = os.path.join(path, STATE_FILE_NAME)
        return candidate if os.path.isfile(candidate) else None
    if os.path.isfile(path) and not path.endswith('.pkl'):
        with open(path, 'rb') as f:
            if f.read(2) != b'PK':  # torch.save archives are zip files.
                return None
        try:
            load_training_state(path, mmap=True)
        except ValueError:
            return None
        return path
    return None


def read_state_options(state_path: str) -> dict:
    """The training_loop kwargs stored in a training state."""
    return load_training_state(state_path, mmap=True)['options']


def read_state_data_info(state_path: str) -> dict:
    """What the networks of a training state tell about the data they were trained on, which the options do
    not record: dict(img_channels, c_dim); None where the state does not say."""
    networks = load_training_state(state_path, mmap=True)['networks']
    D, G = networks.get('D') or {}, networks.get('G') or {}
    # Every discriminator architecture reads the image in its first block's fromrgb layer: [out, channels, 1, 1].
    fromrgb = [tensor for name, tensor in D.items() if name.endswith('.fromrgb.weight')]
    embed = G.get('mapping.embed.weight')  # [embed_features, c_dim], only in conditional generators.
    return dict(img_channels=int(fromrgb[0].shape[1]) if fromrgb else None,
                c_dim=int(embed.shape[1]) if embed is not None else (0 if G else None))

# ----------------------------------------------------------------------------
# A training state assembled from named components.


class CheckpointIO:
    """The stateful parts of a run under the names the training state stores them by.

    Each component has `state_dict()` / `load_state_dict(state)` (networks, optimizers, the loss, ADA's
    controller, the progress counters, the RNG); a dict groups components under one record key
    (`networks={'G': G, ...}`). None stands for a component this run does not have (no augmentation, fixed p).
    Adding a stateful component to the training state is one more keyword here.
    """

    def __init__(self, **components):
        self.components = components

    def state_dict(self) -> dict:
        return {key: _group_state(value) if isinstance(value, dict) else _state_of(value)
                for key, value in self.components.items()}

    def load_state_dict(self, record: dict) -> None:
        """Restore every component, in the order they were given (the RNG last, so nothing consumes it after).

        A group must match the record exactly (a network present in only one of them is an error); a single
        component missing from the record (a state written before it existed) keeps its fresh value."""
        for key, value in self.components.items():
            saved = record.get(key)
            if isinstance(value, dict):
                _load_group(key, value, saved or {})
            elif value is not None and saved is not None:
                value.load_state_dict(saved)


def _state_of(component):
    return None if component is None else component.state_dict()


def _group_state(group: dict) -> dict:
    return {name: _state_of(component) for name, component in group.items()}


def _load_group(key: str, group: dict, saved: dict) -> None:
    for name, component in group.items():
        state = saved.get(name)
        if (component is None) != (state is None):
            raise ValueError(f'The training state and the options disagree about {key} {name!r} (present in '
                             f'one only)')
        if component is not None:
            component.load_state_dict(state)


class RngState:
    """The global random generators as a checkpoint component."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)

# ----------------------------------------------------------------------------
# Random number generators.


def capture_rng_state() -> dict:
    """The states of torch's CPU generator, NumPy's global generator and Python's `random`, as tensors/lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return dict(
        torch   = torch.get_rng_state(),
        numpy   = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                       has_gauss=int(has_gauss), cached=float(cached)),
        python  = dict(version=py_version, state=list(py_state), gauss=py_gauss),
    )


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss']))


# network-snapshot-<kimg:06d>[.<images:03d>].pkl (run_files.snapshot_tag): when a snapshot was written.
SNAPSHOT_NAME_RE = re.compile(r'network-snapshot-(\d+)(?:\.(\d{3}))?\.pkl')


def newest_snapshot(run_dir: str) -> Optional[str]:
    """The newest network-snapshot-*.pkl of `run_dir` by the training time in its name ('000016.512' is after
    '000016', whatever the characters), as a path; None if there is none."""
    found = []
    for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else []):
        match = SNAPSHOT_NAME_RE.fullmatch(name)
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2) or 0), name))
    return os.path.join(run_dir, max(found)[2]) if found else None
