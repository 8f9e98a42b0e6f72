"""Cheap collection of scalar training statistics, reduced across processes on demand.

Training code calls `report(name, value)` wherever a quantity is known (losses, penalties,
augmentation probability, timings). Each call only adds three numbers per name (sample count,
sum, sum of squares) to running totals that stay on the value's own device, so reporting never
forces a device-to-host synchronisation. Once per tick the training loop calls
`Collector.update()`, which is the only place that moves data to the host and, when several
processes train together, all-reduces the totals across ranks. The collector then exposes the
count, mean and standard deviation of the samples that arrived since its previous update.

All mutable module state lives in a single `_State` instance so that `reset()` can restore a
fresh module (tests rely on this) and nothing happens at import time.
"""

import hashlib
import math
import re
from typing import Any, Optional, Union

import numpy as np
import torch

import dnnlib

__all__ = ['Collector', 'init_multiprocessing', 'report', 'report0', 'reset', 'reset_values']

# Index of each moment inside the three-element accumulator tensors.
_COUNT, _SUM, _SUMSQ = 0, 1, 2

# ----------------------------------------------------------------------------
# Module state.


class _State:
    """Everything the module remembers between calls; `reset()` swaps in a new instance."""

    # Each reset increments this counter so that collectors created before the reset can notice
    # that the cumulative totals restarted from zero and drop their stale snapshots.
    _generations = 0

    def __init__(self) -> None:
        _State._generations += 1
        self.generation: int = _State._generations
        self.rank: int = 0
        # None means single process: `Collector.update()` performs no cross-rank reduction.
        self.sync_device: Optional[torch.device] = None
        # name -> device -> float64 tensor [count, sum, sumsq]. Keeping one accumulator per device
        # means a value never has to be copied to another device at report time.
        self.moments: dict[str, dict[torch.device, torch.Tensor]] = {}


_state = _State()


def reset() -> None:
    """Forget every reported value and the multiprocessing setup, as if freshly imported."""
    global _state
    _state = _State()


def reset_values() -> None:
    """Forget every reported value but keep the multiprocessing setup of `init_multiprocessing`.

    A collector's first update sees everything reported since the totals started, so a training run starts
    with this: its first tick must not include what an earlier run in the same process (a notebook, a test
    session) reported.
    """
    global _state
    rank, sync_device = _state.rank, _state.sync_device
    _state = _State()
    _state.rank, _state.sync_device = rank, sync_device


def init_multiprocessing(rank: int, sync_device: Optional[torch.device]) -> None:
    """Declare this process's rank and the device used for the cross-rank all-reduce.

    `sync_device` must suit the process group's backend: the CPU for gloo, this rank's CUDA
    device for NCCL. Passing None declares a single-process run, in which case statistics are
    never reduced. torch.distributed is not touched here, only in `Collector.update()`, so this
    may be called before the process group exists.
    """
    _state.rank = int(rank)
    _state.sync_device = None if sync_device is None else torch.device(sync_device)


# ----------------------------------------------------------------------------
# Reporting.


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # Apple's MPS backend has no float64 support, so float32 is the best that device can do.
    return torch.float32 if device.type == 'mps' else torch.float64


def report(name: str, value: Any) -> Any:
    """Record every element of `value` as one sample of statistic `name`; returns `value`.

    `value` may be a Python number, a (nested) list, a NumPy array or a tensor of any shape.
    Non-finite elements are skipped so that a single diverged step does not poison a whole tick's
    average. An empty value still registers the name, which keeps name lists aligned across ranks.
    """
    elems = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
    elems = elems.detach().flatten()
    per_device = _state.moments.setdefault(name, {})
    if elems.numel() == 0:
        return value

    # Masking with torch.where rather than boolean indexing keeps the shapes static, so none of
    # this needs to know on the host how many elements were finite.
    elems = elems.to(_accumulator_dtype(elems.device))
    finite = torch.isfinite(elems)
    elems = torch.where(finite, elems, torch.zeros_like(elems))
    moments = torch.stack([finite.sum(dtype=elems.dtype), elems.sum(), elems.square().sum()])

    acc = per_device.get(elems.device)
    if acc is None:
        per_device[elems.device] = moments
    else:
        acc.add_(moments)
    return value


def report0(name: str, value: Any) -> Any:
    """Like `report()`, but only rank 0's samples count; other ranks just register the name.

    Use it for quantities that are identical on every rank (such as the augmentation
    probability), which would otherwise be counted once per process.
    """
    report(name, value if _state.rank == 0 else [])
    return value


# ----------------------------------------------------------------------------
# Collecting.


def _distributed_world_size() -> int:
    """World size when cross-rank reduction applies, otherwise 1."""
    if _state.sync_device is None:
        return 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _names_digest(names: list[str]) -> int:
    # Truncate to 62 bits so that both the digest and its negation fit into an int64.
    data = hashlib.sha256('\n'.join(names).encode('utf-8')).digest()
    return int.from_bytes(data[:8], 'little') & ((1 << 62) - 1)


def _check_names_match(names: list[str], device: torch.device) -> None:
    """Raise RuntimeError on every rank unless all ranks are about to reduce the same names.

    Reducing mismatched lists would silently add unrelated statistics together, or hang when the
    tensor sizes differ, so the lists are compared first. A single MAX reduction over
    (digest, -digest) yields both the largest and the smallest digest; they agree only when
    every rank holds the same list. Only on a mismatch are the full lists exchanged, to say
    exactly which names are missing where.
    """
    digest = _names_digest(names)
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    largest, smallest = int(extremes[0]), -int(extremes[1])
    if largest == smallest:
        return

    all_names: list[Optional[list[str]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(all_names, names)
    union = set().union(*(set(n or []) for n in all_names))
    problems = []
    for rank, rank_names in enumerate(all_names):
        missing = sorted(union - set(rank_names or []))
        if missing:
            problems.append(f'rank {rank} is missing {missing}')
    raise RuntimeError(
        'training_stats: the ranks reported different statistic names, so they cannot be reduced '
        '(use report0() for rank-0-only values so the name exists everywhere): ' + '; '.join(problems)
    )


def _cumulative_moments(names: list[str]) -> dict[str, np.ndarray]:
    """Totals since process start for `names`, summed over devices and, if applicable, ranks."""
    world_size = _distributed_world_size()
    device = _state.sync_device if world_size > 1 else torch.device('cpu')
    assert device is not None

    rows = []
    for name in names:
        total = torch.zeros(3, dtype=torch.float64, device=device)
        for acc in _state.moments[name].values():
            total += acc.to(device=device, dtype=torch.float64)
        rows.append(total)

    if world_size > 1:
        _check_names_match(names, device)
        if rows:
            # One collective for all names; the sorted order makes row i mean the same name on
            # every rank.
            stacked = torch.stack(rows)
            torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
            rows = list(stacked.unbind(0))

    return {name: row.cpu().numpy() for name, row in zip(names, rows, strict=True)}


class Collector:
    """Per-interval statistics, refreshed by `update()`.

    Several collectors can coexist (for instance one for the tick log and one for a progress
    bar); each remembers the cumulative totals it saw at its own previous update and reports
    the difference. `regex` selects names with `re.fullmatch`. With `keep_previous=True`, a
    name that received no samples during an interval keeps showing its previous interval's
    values instead of an empty result.

    In multi-process runs every rank must call `update()` at the same point, since it performs
    collective operations.
    """

    def __init__(self, regex: Union[str, re.Pattern] = '.*', keep_previous: bool = True) -> None:
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._generation = _state.generation
        self._names: list[str] = []
        # Cumulative totals as of the previous update, per name.
        self._previous_cumulative: dict[str, np.ndarray] = {}
        # Moments of the most recent interval, per name.
        self._moments: dict[str, np.ndarray] = {}

    def names(self) -> list[str]:
        """Sorted names that matched the regex at the last `update()`."""
        return list(self._names)

    def update(self) -> None:
        """Take in everything reported since the previous call (a collective when distributed)."""
        if self._generation != _state.generation:
            # reset() restarted the totals from zero; old snapshots would give negative deltas.
            self._generation = _state.generation
            self._previous_cumulative = {}
            self._moments = {}

        names = sorted(name for name in _state.moments if self._regex.fullmatch(name))
        cumulative = _cumulative_moments(names)

        moments = {}
        for name in names:
            delta = cumulative[name] - self._previous_cumulative.get(name, 0.0)
            if delta[_COUNT] == 0 and self._keep_previous and name in self._moments:
                delta = self._moments[name]
            moments[name] = delta

        self._names = names
        self._moments = moments
        self._previous_cumulative.update(cumulative)

    def state_dict(self) -> dict:
        """What a collector in another process needs to go on as this one would: the moments of the last interval
        (which `keep_previous` shows again) and those reported since the last update, summed over the ranks, as
        plain lists. A collective in multi-process runs (every rank calls it); it leaves this collector as it was.
        """
        names = sorted(name for name in _state.moments if self._regex.fullmatch(name))
        cumulative = _cumulative_moments(names)
        pending = {name: (cumulative[name] - self._previous_cumulative.get(name, 0.0)).tolist() for name in names}
        previous = {name: np.asarray(moments, dtype=np.float64).tolist() for name, moments in self._moments.items()}
        return dict(pending=pending, previous=previous)

    def load_state_dict(self, state: dict) -> None:
        """Go on from `state_dict()` of a collector in an earlier process, on every rank, before anything is
        reported: the next update includes the pending moments (once, however many ranks there are) and the
        names the earlier process knew are known here too, so a stats record lists the same names."""
        for name in sorted(set(state['pending']) | set(state['previous'])):
            report(name, [])  # Registers the name on every rank, as the earlier process had it.
        self._generation = _state.generation
        self._moments = {name: np.asarray(moments, dtype=np.float64) for name, moments in state['previous'].items()}
        self._names = sorted(self._moments)
        # The totals of this process start from zero; a baseline of minus the pending moments adds them once.
        self._previous_cumulative = {name: -np.asarray(moments, dtype=np.float64)
                                     for name, moments in state['pending'].items()}

    def _get(self, name: str) -> Optional[np.ndarray]:
        return self._moments.get(name)

    def moments(self, name: str) -> Optional[np.ndarray]:
        """The last interval's raw moments of `name` as a new float64 array [count, sum, sum of squares], None
        if the name did not match at the last `update()`.

        For readers that pool several intervals before they decide (ADA's controller adds up the signs of the
        ticks between two adjustments): counts and sums add, means do not. The array is a copy, so the caller
        may accumulate into it.
        """
        moments = self._get(name)
        return None if moments is None else np.array(moments, dtype=np.float64)

    def num(self, name: str) -> int:
        """Number of finite samples of `name` in the last interval (0 if unknown)."""
        moments = self._get(name)
        return 0 if moments is None else int(round(float(moments[_COUNT])))

    def mean(self, name: str) -> float:
        """Mean of the last interval's samples of `name` (nan when there were none)."""
        moments = self._get(name)
        if moments is None or moments[_COUNT] == 0:
            return float('nan')
        return float(moments[_SUM] / moments[_COUNT])

    def std(self, name: str) -> float:
        """Population standard deviation of the last interval's samples of `name`.

        nan when there were no samples or the mean is not finite, 0.0 for a single sample. The
        variance comes from E[x^2] - mean^2, which rounding can push slightly below zero, hence
        the clamp.
        """
        moments = self._get(name)
        if moments is None or moments[_COUNT] == 0:
            return float('nan')
        count = float(moments[_COUNT])
        mean = float(moments[_SUM]) / count
        if not math.isfinite(mean):
            return float('nan')
        if count == 1:
            return 0.0
        return math.sqrt(max(float(moments[_SUMSQ]) / count - mean**2, 0.0))

    def as_dict(self) -> dnnlib.EasyDict:
        """All collected names as `{name: EasyDict(num, mean, std)}`, e.g. for one stats.jsonl line."""
        result = dnnlib.EasyDict()
        for name in self._names:
            result[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return result

    def __getitem__(self, name: str) -> float:
        """Shorthand for `mean(name)`."""
        return self.mean(name)
