"""Shared plumbing for the slow tests that run a kernel's source on the host (no GPU needed).

Those tests compile a `.cu` file for the CPU and wrap it in an object with the same call signature as the
real extension; `use_host_kernel` then makes the op's `impl='cuda'` path (its autograd Functions included)
call that object for CPU tensors.
"""

import torch

from torch_utils.ops import dispatch


class StubPlugin:
    """Stands in for a `dispatch.LazyPlugin` whose module is already loaded."""

    def __init__(self, module, module_name):
        self.module = module
        self.module_name = module_name

    def get(self):
        return self.module

    def available(self):
        return True


def use_host_kernel(monkeypatch, op_module, host_module, module_name):
    """Route `op_module`'s kernel path to `host_module` for the rest of the test."""
    monkeypatch.setattr(op_module, '_plugin', StubPlugin(host_module, module_name))
    # The op's custom op (torch.library) runs `_host_module` for CPU tensors, the transcription of the kernel
    # in PyTorch by default: the compiled kernel replaces it there too.
    monkeypatch.setattr(op_module, '_host_module', host_module)
    monkeypatch.setattr(dispatch, 'use_cuda_kernel', lambda impl, x, plugin: impl == 'cuda')


LAYOUTS = ['contiguous', 'channels_last', 'strided']


def with_layout(t, layout):
    """`t` in one of the memory layouts kernels must handle: 'contiguous', 'channels_last', or 'strided'
    (a view that is dense in no order, which the kernel path has to handle or make dense first)."""
    if layout == 'channels_last':
        return t.contiguous(memory_format=torch.channels_last)
    if layout == 'strided':
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout != 'contiguous':
        raise ValueError(f'unknown layout {layout!r}')
    return t.contiguous()
