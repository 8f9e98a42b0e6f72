"""The snapshot dict that every snapshot format holds, `dict(training_set_kwargs, G, D, G_ema, augment_pipe)`,
the check every reader and writer applies to it, and the small helpers the snapshot modules share
(snapshot_io, weights_only, adoption, tf_import)."""

import torch

from torch_utils import misc

NETWORK_KEYS = ('G', 'D', 'G_ema', 'augment_pipe')  # Snapshot entries that hold networks.


def check_snapshot(data: dict) -> None:
    """A snapshot must hold at least one of G, D, G_ema; whatever network entries it has are modules or None."""
    for key in NETWORK_KEYS:
        value = data.get(key)
        if value is not None and not isinstance(value, torch.nn.Module):
            raise ValueError(f'Snapshot entry "{key}" is a {type(value).__name__}, not a network')
    if not any(isinstance(data.get(key), torch.nn.Module) for key in ('G', 'D', 'G_ema')):
        keys = ', '.join(repr(key) for key in data) or 'none'
        raise ValueError(f'The file holds a dict without networks (keys: {keys}); a snapshot has at least one of '
                         f'G, D, G_ema')


def device_of(net: torch.nn.Module) -> torch.device:
    """Where the tensors of `net` are (the CPU for a network without any), so that a rebuild can follow them."""
    tensors = misc.params_and_buffers(net)
    return tensors[0].device if tensors else torch.device('cpu')


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line notes and errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def list_some(names: list, limit: int = 3) -> str:
    """The first `limit` names and how many more there are, so that a message stays one readable line."""
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')
