"""`torch.compile` for the networks, as the scripts' `--compile` flag uses it.

Dynamo traces G and D without graph breaks (the custom CUDA kernels are `torch.library` ops with fake kernels,
see ops/bias_act.py and ops/upfirdn2d.py; tests/test_compile.py checks it with `torch._dynamo.explain`), so one
graph per network and input signature reaches the backend. What is compiled is always a wrapper: the modules
themselves stay plain `torch.nn.Module`s, so snapshots pickle exactly what they pickle without `--compile`.

The backend is inductor (C++ on the CPU, Triton on CUDA) unless $STYLEGAN_COMPILE_BACKEND names another one
(`aot_eager` checks the tracing and the autograd graphs without generating code; tests use it because a C++
build per graph is slow on a small machine).
"""

import os
from typing import Callable

import torch

from .ops import bias_act, dispatch, upfirdn2d

BACKEND_ENV_VAR = 'STYLEGAN_COMPILE_BACKEND'
DEFAULT_BACKEND = 'inductor'


class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here (no Dynamo for this Python, no C++ compiler for inductor, unknown backend)."""


def backend_name() -> str:
    """The backend `--compile` uses: $STYLEGAN_COMPILE_BACKEND, else inductor."""
    return os.environ.get(BACKEND_ENV_VAR, '').strip() or DEFAULT_BACKEND


def check_available(device: torch.device) -> str:
    """Raise CompileUnavailable (with one line saying why) unless `--compile` can work on `device`; returns the
    backend name. Called before any work starts, so that a missing compiler is not found after a long setup."""
    backend = backend_name()
    if not torch._dynamo.is_dynamo_supported():
        raise CompileUnavailable(f'torch.compile is not supported with this Python / PyTorch '
                                 f'(torch {torch.__version__})')
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise CompileUnavailable(f'${BACKEND_ENV_VAR}={backend!r} is not a torch.compile backend; available: '
                                 f'{", ".join(torch._dynamo.list_backends(exclude_tags=()))}')
    if backend == 'inductor' and torch.device(device).type == 'cpu':
        # Imported here: the inductor package is large and only --compile needs it.
        from torch._inductor import cpp_builder
        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # Inductor raises several types here; its message is what the user needs.
            raise CompileUnavailable(f'inductor needs a C++ compiler on the CPU and found none '
                                     f'({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); '
                                     f'install g++ or set ${BACKEND_ENV_VAR}=aot_eager') from None
    return backend


def compile_module(module: torch.nn.Module, device: torch.device) -> Callable:
    """`torch.compile(module)` with the project's backend: a wrapper that runs the same parameters and buffers
    (pickle `module`, never the wrapper). On a CUDA device the kernels are built and probed first, so that the
    trace only reads their settled state (see `dispatch.prepare_kernels`)."""
    dispatch.prepare_kernels([bias_act._plugin, upfirdn2d._plugin], device)
    backend = backend_name()
    # Inductor draws random numbers (the noise inputs) with its own generator unless told to fall back to
    # PyTorch's: with the fallback, a compiled network sees the same noise as the eager one for the same seed.
    options = dict(fallback_random=True) if backend == 'inductor' else None
    return torch.compile(module, backend=backend, options=options)
