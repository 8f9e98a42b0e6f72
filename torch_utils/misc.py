"""Small PyTorch helpers used across the code base and by the network code inside official snapshots.

`profiled_function`, `assert_shape`, `suppress_tracer_warnings` and `constant` are called by the
`networks.py` / `augment.py` embedded in official StyleGAN2-ADA snapshots, so their names and signatures
are frozen.
"""

import contextlib
import functools
import random
import re
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Cached constant tensors.

_constant_cache = dict()


def constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """A tensor holding `value`, broadcast to `shape`, cached so that hot code can ask for the same constant
    (a filter, a gain) on every call without a new host-to-device copy each time. Do not modify the result."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, torch.device(device), memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.expand(shape)
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def clear_constant_cache() -> None:
    """Forget all tensors made by `constant` (tests; freeing device memory)."""
    _constant_cache.clear()


# ----------------------------------------------------------------------------
# Shape checks that also work while tracing.


def _compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing the caller; False where PyTorch cannot tell (before 2.3)."""
    is_compiling = getattr(torch.compiler, 'is_compiling', None)
    return is_compiling is not None and is_compiling()


class suppress_tracer_warnings(warnings.catch_warnings):
    """Context manager that silences `torch.jit.TracerWarning` (shape checks compare traced values with
    Python numbers on purpose)."""

    def __enter__(self):
        # Under torch.compile there are no TracerWarnings to silence, and Dynamo cannot trace the warnings
        # module's filter machinery (a graph break in every layer that checks a shape), so do nothing there.
        self._suppressing = not _compiling()
        if self._suppressing:
            super().__enter__()
            warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        return self

    def __exit__(self, *exc_info):
        if self._suppressing:
            return super().__exit__(*exc_info)
        return None


def assert_shape(tensor: torch.Tensor, ref_shape: Sequence[Optional[int]]) -> None:
    """Check `tensor.shape` against `ref_shape`, where None matches any size.

    Sizes may be tensors (as they are while tracing), in which case the check is recorded with
    `torch._assert` instead of being evaluated in Python.
    """
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)} '
                             f'(shape {tuple(tensor.shape)} vs {tuple(ref_shape)})')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape, strict=True)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)),
                              f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size} '
                                 f'(shape {tuple(tensor.shape)} vs {tuple(ref_shape)})')


# ----------------------------------------------------------------------------
# Profiling.


def profiled_function(fn: Callable) -> Callable:
    """Decorator: the function shows up under its own name in `torch.profiler` traces."""
    @functools.wraps(fn)
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return decorator


# ----------------------------------------------------------------------------
# Data sampling.


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, shuffled, split across ranks, and resumable.

    The global stream is a sequence of epochs; epoch `e` is a permutation of the dataset drawn from
    `(seed, e)`, so position `p` of the stream is a pure function of `p`. Rank `r` of `R` takes positions
    `r, r + R, r + 2R, ...`. `start_index` is the number of samples all ranks together have already drawn
    (the training loop's `cur_nimg`), so a resumed run sees exactly the samples the interrupted run would
    have seen next.
    """

    def __init__(self,
        dataset,                        # Anything with len(); only its size is used.
        rank:           int = 0,        # Rank of this process.
        num_replicas:   int = 1,        # Number of processes sharing the stream.
        shuffle:        bool = True,    # Shuffle each epoch; False repeats 0, 1, ..., n-1.
        seed:           int = 0,        # Seed of the shuffle.
        start_index:    int = 0,        # Global number of samples already consumed.
    ):
        if len(dataset) <= 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'Invalid rank {rank} for num_replicas {num_replicas}')
        if start_index < 0 or start_index % num_replicas != 0:
            raise ValueError(f'start_index ({start_index}) must be a non-negative multiple of num_replicas '
                             f'({num_replicas})')
        super().__init__()
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_index = start_index

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def __iter__(self) -> Iterator[int]:
        n = self.dataset_size
        pos = self.start_index + self.rank
        epoch, order = pos // n, self._epoch_order(pos // n)
        while True:
            if pos // n != epoch:
                epoch, order = pos // n, self._epoch_order(pos // n)
            yield int(order[pos % n])
            pos += self.num_replicas


# ----------------------------------------------------------------------------
# Parameters and buffers.


def params_and_buffers(module: torch.nn.Module) -> list:
    """All parameters, then all buffers."""
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module) -> list:
    """All (name, tensor) pairs of parameters, then of buffers."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy every parameter and buffer of `dst_module` from the tensor of the same name in `src_module`.

    This is how `--resume` moves weights between networks of different classes (an official snapshot and
    ours) or sizes (transfer learning: names missing from the source keep their values unless
    `require_all`). The destination keeps its own `requires_grad`, dtype and device.
    """
    src_tensors = dict(named_params_and_buffers(src_module))
    missing = []
    for name, tensor in named_params_and_buffers(dst_module):
        src = src_tensors.get(name)
        if src is None:
            missing.append(name)
            continue
        if src.shape != tensor.shape:
            raise ValueError(f'Cannot copy "{name}": source shape {tuple(src.shape)} differs from destination '
                             f'shape {tuple(tensor.shape)}')
        tensor.copy_(src.detach())
    if require_all and missing:
        shown = ', '.join(missing[:10]) + (f' and {len(missing) - 10} more' if len(missing) > 10 else '')
        raise ValueError(f'The source module lacks {len(missing)} tensor(s) of the destination: {shown}')


# ----------------------------------------------------------------------------
# Distributed training helpers.


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Within this block, a DistributedDataParallel `module` all-reduces gradients only if `sync`
    (gradient accumulation over several rounds needs the reduction only in the last one)."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: Optional[str] = None) -> None:
    """Assert that every parameter and buffer of `module` is identical on all ranks (rank 0 as reference).

    Tensors whose full name matches `ignore_regex` are skipped. NaNs compare equal to NaNs, so a diverged
    run is reported by the NaN checks rather than as a spurious inconsistency. Every rank runs the same
    collectives and then raises together, so a mismatch on one rank cannot leave the others waiting.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    prefix = type(module).__name__
    mismatches = []
    for name, tensor in named_params_and_buffers(module):
        full_name = f'{prefix}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, full_name):
            continue
        local = tensor.detach()
        reference = local.clone()
        torch.distributed.broadcast(tensor=reference, src=0)
        same_nans = torch.equal(local.isnan(), reference.isnan())
        if not (same_nans and torch.equal(torch.nan_to_num(local), torch.nan_to_num(reference))):
            diff = (torch.nan_to_num(local) - torch.nan_to_num(reference)).abs().max().item()
            mismatches.append(f'{full_name} (max abs difference {diff:g})')

    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    flags = torch.zeros(world_size, dtype=torch.int64, device=_collective_device())
    flags[rank] = len(mismatches)
    torch.distributed.all_reduce(flags)
    bad_ranks = [r for r in range(world_size) if flags[r] > 0]
    if bad_ranks:
        local_part = f' On rank {rank}: ' + '; '.join(mismatches) if mismatches else ''
        raise AssertionError(f'Parameters or buffers differ from rank 0 on rank(s) {bad_ranks}.{local_part}')


def _collective_device() -> torch.device:
    """Device for small bookkeeping tensors of a collective: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


# ----------------------------------------------------------------------------
# Module summary.


def _tensors_in(obj: Any) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    return []


def _format_table(rows: list) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(*rows, strict=True)]
    lines = ['  '.join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return '\n'.join(lines)


def print_module_summary(module: torch.nn.Module, inputs: Sequence, max_nesting: int = 3,
                         skip_redundant: bool = True) -> Any:
    """Run `module(*inputs)` and print one row per submodule: parameters, buffers, output shape and dtype.

    Submodules deeper than `max_nesting` levels are folded into their ancestor. With `skip_redundant`,
    rows that add no parameters, no buffers and no new output (e.g. a wrapper returning its child's output
    unchanged) are left out. Each parameter is counted once, in the first row that owns it. Returns the
    module's outputs.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError('print_module_summary() needs an eager module, not a TorchScript one')
    if not isinstance(inputs, (tuple, list)):
        inputs = [inputs]

    records = []     # (module, outputs) in the order the forward calls finished.
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            records.append((mod, _tensors_in(outputs)))

    handles = []
    for mod in module.modules():
        handles.append(mod.register_forward_pre_hook(pre_hook))
        handles.append(mod.register_forward_hook(post_hook))
    try:
        outputs = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()

    names = {mod: name for name, mod in module.named_modules()}
    names[module] = '<top-level>'
    seen_tensors = set()
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    param_total, buffer_total = 0, 0
    for mod, outs in records:
        params = [t for t in mod.parameters() if id(t) not in seen_tensors]
        buffers = [t for t in mod.buffers() if id(t) not in seen_tensors]
        new_outs = [t for t in outs if id(t) not in seen_tensors]
        seen_tensors.update(id(t) for t in params + buffers + outs)
        if skip_redundant and mod is not module and not (params or buffers or new_outs):
            continue
        n_params = sum(t.numel() for t in params)
        n_buffers = sum(t.numel() for t in buffers)
        param_total += n_params
        buffer_total += n_buffers
        shown = new_outs or outs or [None]
        for i, t in enumerate(shown):
            name = names.get(mod, '?')
            rows.append([
                name if i == 0 else f'{name}:{i}',
                (str(n_params) if n_params else '-') if i == 0 else '',
                (str(n_buffers) if n_buffers else '-') if i == 0 else '',
                str(list(t.shape)) if t is not None else '-',
                str(t.dtype).split('.')[-1] if t is not None else '-',
            ])
    rows.append(['Total', str(param_total), str(buffer_total), '', ''])
    print()
    print(_format_table(rows))
    print()
    return outputs


# ----------------------------------------------------------------------------
# Seeding.


def set_random_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------

__all__ = [
    'constant', 'clear_constant_cache', 'suppress_tracer_warnings', 'assert_shape', 'profiled_function',
    'InfiniteSampler', 'params_and_buffers', 'named_params_and_buffers', 'copy_params_and_buffers',
    'ddp_sync', 'check_ddp_consistency', 'print_module_summary', 'set_random_seed',
]
