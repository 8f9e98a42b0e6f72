"""Which implementation of an op runs: the CUDA kernel or the pure-PyTorch reference.

Ops take `impl='cuda'` (the default, as in official snapshots) or `impl='ref'`. A project-wide policy
decides what that means:

* `auto` (default): `impl='cuda'` runs the kernel when the input is on a CUDA device and the plugin
  builds, and the reference otherwise (with one message if the build failed). `impl='ref'` is honoured.
* `ref`: every op runs its reference path, whatever the call site asks for (debugging, parity tests).
* `cuda`: every op runs its kernel; an input off the GPU or a plugin that does not build is an error
  instead of a silent fallback (benchmarks, parity tests).

The policy comes from `use_impl(...)` (a context manager, innermost wins) or else from the environment
variable `STYLEGAN_OPS_IMPL`.

A kernel that builds is not trusted yet: the first time a process wants it on a device, the op's parity
probe (see `probe.py`) compares it with the reference on a few small cases. A kernel that fails is reported
once and replaced by the reference under `auto`, and is an error (`KernelMismatchError`) under `cuda`. The
verdict is kept per (op, device) for the rest of the process; `reset_kernel_verdicts()` forgets it (tests).
"""

import contextlib
import os
import threading
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import torch

from .. import custom_ops
from .probe import ProbeResult

ENV_VAR = 'STYLEGAN_OPS_IMPL'
POLICIES = ('auto', 'ref', 'cuda')

_policy_stack = []

_verdicts: Dict[Tuple[str, str], ProbeResult] = {}        # (module name, device) -> probe result.
_warned: Set[Tuple[str, str]] = set()                      # Keys whose failure has been warned about.
_verdict_lock = threading.RLock()                          # One probe at a time, even between threads.


class KernelMismatchError(RuntimeError):
    """A CUDA kernel disagrees with the reference implementation of its op (its parity probe failed)."""


def current_policy() -> str:
    """The policy in force: the innermost `use_impl` block, else $STYLEGAN_OPS_IMPL, else 'auto'."""
    if _policy_stack:
        return _policy_stack[-1]
    policy = os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto'
    if policy not in POLICIES:
        raise ValueError(f'${ENV_VAR}={policy!r} is not a valid op policy; use one of {", ".join(POLICIES)}')
    return policy


@contextlib.contextmanager
def use_impl(policy: str) -> Iterator[None]:
    """Within this block, ops follow `policy` ('auto', 'ref' or 'cuda')."""
    if policy not in POLICIES:
        raise ValueError(f'Unknown op policy {policy!r}; use one of {", ".join(POLICIES)}')
    _policy_stack.append(policy)
    try:
        yield
    finally:
        _policy_stack.pop()


class LazyPlugin:
    """A CUDA extension built through `custom_ops.get_plugin` the first time a kernel is wanted.

    A failed build is reported once; afterwards `available()` answers False without trying again.
    """

    def __init__(self,
        module_name:    str,                    # Name of the extension module.
        sources:        Sequence[str],          # .cpp/.cu files next to `source_dir`.
        headers:        Sequence[str] = (),     # Headers they include.
        source_dir:     Optional[str] = None,   # Directory holding the files (the op's own directory).
        probe:          Optional[Callable[[torch.device], ProbeResult]] = None,  # Parity probe on a device; None: trusted.
        **build_kwargs,                         # Extra arguments of cpp_extension.load.
    ):
        self.module_name = module_name
        self.sources = list(sources)
        self.headers = list(headers)
        self.source_dir = source_dir
        self.probe = probe
        self.build_kwargs = build_kwargs
        self.reset()

    def reset(self) -> None:
        """Forget the loaded module, any failure and the probe verdicts of this plugin (tests)."""
        self._module = None
        self._error: Optional[Exception] = None
        with _verdict_lock:
            for key in [key for key in _verdicts if key[0] == self.module_name]:
                del _verdicts[key]
                _warned.discard(key)

    def get(self):
        """The extension module; raises `custom_ops.PluginBuildError` when it cannot be built."""
        if self._module is None:
            if self._error is not None:
                raise self._error
            try:
                self._module = custom_ops.get_plugin(self.module_name, sources=self.sources, headers=self.headers,
                                                     source_dir=self.source_dir, **self.build_kwargs)
            except custom_ops.PluginBuildError as e:
                self._error = e
                raise
        return self._module

    def available(self) -> bool:
        """Whether the kernel can be used; the first failure prints why, once."""
        if self._module is not None:
            return True
        if self._error is not None:
            return False
        try:
            self.get()
            return True
        except custom_ops.PluginBuildError as e:
            warnings.warn(f'{e}\nFalling back to the reference implementation of "{self.module_name}".',
                          RuntimeWarning, stacklevel=3)
            return False


def reset_kernel_verdicts() -> None:
    """Forget every probe verdict, so that the next kernel call on each device probes again (tests)."""
    with _verdict_lock:
        _verdicts.clear()
        _warned.clear()


def probe_results() -> Dict[Tuple[str, str], ProbeResult]:
    """The probe results of this process so far, by (module name, device), e.g. for a report."""
    with _verdict_lock:
        return dict(_verdicts)


def kernel_verdict(plugin: LazyPlugin, device: torch.device, strict: bool) -> bool:
    """Whether `plugin`'s kernel may run on `device`: its parity probe's verdict, probed on first use.

    The outcome is said once per (op, device): a passing probe is logged through custom_ops' one-time
    messages, a failing one is warned about (`strict=False`, the caller falls back to the reference) or
    raised as `KernelMismatchError` (`strict=True`, every time it is asked, since the caller cannot run).
    """
    if plugin.probe is None:
        return True
    key = (plugin.module_name, str(device))
    known = _verdicts.get(key)
    if known is not None and known.ok:
        # A passing verdict is final, so it needs no lock: this is the path every call after the first takes,
        # and the one torch.compile traces (Dynamo cannot trace a lock; see `prepare_kernels`).
        return True
    with _verdict_lock:
        result = _verdicts.get(key)
        if result is None:
            result = plugin.probe(device)
            _verdicts[key] = result
            if result.ok:
                custom_ops._say('brief', f'Ops: {result.op} kernel ok on {device} (probe {result.seconds:.2f} s)')
        if result.ok:
            return True
        message = (f'The CUDA kernel of "{result.op}" disagrees with its reference implementation on {device}: '
                   f'parity probe {result.describe()}.')
        if strict:
            raise KernelMismatchError(f'{message} The op policy is "cuda" (strict), so this is an error; use '
                                      f'policy "auto" to fall back to the reference implementation.')
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f'{message} Falling back to the reference implementation of "{result.op}" on {device} '
                          f'for the rest of this process.', RuntimeWarning, stacklevel=3)
        return False


def use_cuda_kernel(impl: str, x: torch.Tensor, plugin: LazyPlugin) -> bool:
    """Decide, for one call of an op on input `x`, whether its kernel runs (True) or its reference (False)."""
    if impl not in ('ref', 'cuda'):
        raise ValueError(f"impl must be 'ref' or 'cuda', got {impl!r}")
    policy = current_policy()
    if policy == 'ref':
        return False
    if policy == 'auto':
        return (impl == 'cuda' and x.device.type == 'cuda' and plugin.available()
                and kernel_verdict(plugin, x.device, strict=False))
    if x.device.type != 'cuda':
        raise RuntimeError(f'The op policy is "cuda" (strict) but "{plugin.module_name}" got a tensor on '
                           f'{x.device}; use policy "auto" to fall back to the reference implementation')
    plugin.get()
    return kernel_verdict(plugin, x.device, strict=True)


def prepare_kernels(plugins: Sequence[LazyPlugin], device: torch.device) -> None:
    """Settle, before torch.compile traces the networks, whether each plugin's kernel runs on `device`: build
    it and run its parity probe now (under the policy in force). Tracing then only reads the settled state,
    with no build, probe or lock inside the graph (each would break it). Nothing to do off CUDA devices."""
    device = torch.device(device)
    if device.type != 'cuda' or current_policy() == 'ref':
        return
    for plugin in plugins:
        if current_policy() == 'cuda':
            plugin.get()
            kernel_verdict(plugin, device, strict=True)
        elif plugin.available():
            kernel_verdict(plugin, device, strict=False)

# ----------------------------------------------------------------------------
# torch.library custom ops (the kernels, so that torch.compile can trace them; see bias_act.py, upfirdn2d.py).

OPS_NAMESPACE = 'stylegan2'


def kernel_op(name: str, impl: Callable, fake: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """The custom op `stylegan2::<name>`: `impl` (annotated, for the schema) computes it, `fake` gives the shape
    and layout of its output from fake tensors, and `setup_context(ctx, inputs, output)` / `backward(ctx, grad)`
    are its autograd formula (torch.library.register_autograd's protocol). Defined once per process: a module
    imported a second time (under another name) gets the registered op back, since the library would refuse a
    second definition.

    PyTorch before 2.4 has no `torch.library.custom_op`; there the same pieces make an `autograd.Function`, which
    runs the same numbers in eager mode (torch.compile then breaks the graph at the kernel).
    """
    qualname = f'{OPS_NAMESPACE}::{name}'
    if not hasattr(torch.library, 'custom_op'):
        return _function_op(impl, setup_context, backward)
    namespace_ops = getattr(torch.ops, OPS_NAMESPACE)
    if hasattr(namespace_ops, name):
        return getattr(namespace_ops, name).default
    op = torch.library.custom_op(qualname, mutates_args=())(impl)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def _function_op(impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """What `kernel_op` makes without torch.library.custom_op: the same op as an autograd.Function."""
    class KernelOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return KernelOp.apply
