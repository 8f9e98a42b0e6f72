"""Fused bias + activation + gain + clamp: `clamp(act(x + b) * gain, -clamp, clamp)`.

Every layer of the StyleGAN2 generator and discriminator ends with this sequence. Done as separate PyTorch
ops it reads and writes the whole activation tensor four times and keeps every intermediate for the
backward pass; the CUDA kernel (bias_act.cu) does it in one pass and keeps a single tensor, and its
gradient is again a kernel, so the second derivatives of R1 and path-length regularization run through it.

`bias_act` and `activation_funcs` are called by the network code inside official snapshots, so their
names, signature and fields are frozen. The pure-PyTorch reference path gives the same numbers (to float
rounding), works for any dtype and device, and is what runs without a GPU (see `dispatch`).
"""

import math
import os

import torch
import torch.nn.functional as F

import dnnlib

from . import dispatch
from .probe import ProbeCase, probe_op

# ----------------------------------------------------------------------------
# Activation functions.

_SQRT2 = math.sqrt(2)

# `func(x, alpha)` is the reference implementation. `ref` names the tensor the kernel computes the gradient
# from: 'y' (the output) wherever the derivative can be written in terms of the output, because the next
# layer keeps the output for its own backward pass anyway and x can then be freed; 'x' (the input, plus the
# bias) for softplus and swish, whose derivatives cannot be written that way.
# `has_2nd_grad` is False for the piecewise-linear functions, whose second derivative is zero almost everywhere.
activation_funcs = {
    'linear':   dnnlib.EasyDict(func=lambda x, **_: x,
                                def_alpha=0,   def_gain=1,      cuda_idx=1, ref='y', has_2nd_grad=False),
    'relu':     dnnlib.EasyDict(func=lambda x, **_: F.relu(x),
                                def_alpha=0,   def_gain=_SQRT2, cuda_idx=2, ref='y', has_2nd_grad=False),
    'lrelu':    dnnlib.EasyDict(func=lambda x, alpha, **_: F.leaky_relu(x, alpha),
                                def_alpha=0.2, def_gain=_SQRT2, cuda_idx=3, ref='y', has_2nd_grad=False),
    'tanh':     dnnlib.EasyDict(func=lambda x, **_: torch.tanh(x),
                                def_alpha=0,   def_gain=1,      cuda_idx=4, ref='y', has_2nd_grad=True),
    'sigmoid':  dnnlib.EasyDict(func=lambda x, **_: torch.sigmoid(x),
                                def_alpha=0,   def_gain=1,      cuda_idx=5, ref='y', has_2nd_grad=True),
    'elu':      dnnlib.EasyDict(func=lambda x, **_: F.elu(x),
                                def_alpha=0,   def_gain=1,      cuda_idx=6, ref='y', has_2nd_grad=True),
    'selu':     dnnlib.EasyDict(func=lambda x, **_: F.selu(x),
                                def_alpha=0,   def_gain=1,      cuda_idx=7, ref='y', has_2nd_grad=True),
    'softplus': dnnlib.EasyDict(func=lambda x, **_: F.softplus(x),
                                def_alpha=0,   def_gain=1,      cuda_idx=8, ref='x', has_2nd_grad=True),
    'swish':    dnnlib.EasyDict(func=lambda x, **_: torch.sigmoid(x) * x,
                                def_alpha=0,   def_gain=_SQRT2, cuda_idx=9, ref='x', has_2nd_grad=True),
}

# Element types the kernel handles; anything else runs the reference path.
_KERNEL_DTYPES = (torch.float16, torch.float32, torch.float64)

# The lambda looks `probe_kernel` up when the probe runs, so it may be defined further down.
_plugin = dispatch.LazyPlugin('bias_act_plugin', sources=['bias_act.cpp', 'bias_act.cu'], headers=['bias_act.h'],
                              source_dir=os.path.dirname(__file__), extra_cuda_cflags=['--use_fast_math'],
                              probe=lambda device: probe_kernel(device))

# ----------------------------------------------------------------------------
# Public entry point.


def bias_act(
    x,                  # Input tensor of any shape.
    b       = None,     # Bias: 1-D tensor of x.shape[dim] elements, or None for no bias.
    dim     = 1,        # Dimension of x that b runs along (the channel dimension).
    act     = 'linear', # Activation function: a key of `activation_funcs`.
    alpha   = None,     # Parameter of the activation (the lrelu slope); None: the function's default.
    gain    = None,     # Factor applied after the activation; None: the function's default (sqrt(2) or 1).
    clamp   = None,     # Clamp the result to [-clamp, clamp] (0 gives zeros); None: no clamping.
    impl    = 'cuda',   # 'cuda': the kernel where possible (see `dispatch`), 'ref': the reference.
):
    """Add `b` along dimension `dim`, apply `act`, multiply by `gain`, clamp to `[-clamp, clamp]`.

    Returns a tensor of the shape, dtype and memory layout of `x`. Differentiable twice with respect to `x`
    and `b` on both paths. The kernel computes in float32 for float16 input and in x's dtype otherwise; a
    bias of another dtype is converted to x's dtype first.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'bias_act: x must be a tensor, got {type(x).__name__}')
    if act not in activation_funcs:
        raise ValueError(f'bias_act: unknown activation {act!r}; valid names are {", ".join(activation_funcs)}')
    spec = activation_funcs[act]
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f'bias_act: b must be a tensor or None, got {type(b).__name__}')
        if not -x.ndim <= dim < x.ndim:
            raise ValueError(f'bias_act: dim={dim} is out of range for a {x.ndim}-D input')
        dim %= x.ndim
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f'bias_act: b must be 1-D with x.shape[{dim}] = {x.shape[dim]} elements, '
                             f'got shape {tuple(b.shape)}')
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    if clamp is not None and clamp < 0:
        raise ValueError(f'bias_act: clamp must be None or >= 0, got {clamp}')
    clamp = float(clamp if clamp is not None else -1)  # Negative means "no clamping" from here on.

    if dispatch.use_cuda_kernel(impl, x, _plugin) and x.dtype in _KERNEL_DTYPES:
        return _bias_act_kernel(x, b, dim, act, alpha, gain, clamp)
    return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)

# ----------------------------------------------------------------------------
# Reference path.


def _bias_act_ref(x, b, dim, act, alpha, gain, clamp):
    """Plain PyTorch ops in x's dtype; autograd provides every derivative."""
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = activation_funcs[act].func(x, alpha=alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x

# ----------------------------------------------------------------------------
# Kernel path.


def _is_dense(x):
    """Whether x is contiguous in some order of its dimensions (NCHW, channels-last, ...), as the kernel needs."""
    expected = 1
    dims = [(size, stride) for size, stride in zip(x.shape, x.stride(), strict=True) if size != 1]
    for size, stride in sorted(dims, key=lambda dim: dim[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _bias_act_kernel(x, b, dim, act, alpha, gain, clamp):
    if b is None and act == 'linear' and gain == 1 and clamp < 0:
        return x  # Nothing to do; the reference path returns x unchanged in this case too.
    # Both conversions happen outside the autograd.Function so that their gradients are tracked: the
    # Function saves its inputs for the second-order pass, whose gradients must reach the caller's x and b.
    if not _is_dense(x):
        x = x.contiguous()
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return _kernel_function(dim, act, alpha, gain, clamp).apply(x, b)


_kernel_functions = dict()  # (dim, act, alpha, gain, clamp) -> autograd.Function subclass.


def _kernel_function(dim, act, alpha, gain, clamp):
    """The autograd.Function running the kernel for one combination of arguments (created once, then reused).

    Its backward is another Function whose own backward runs the kernel's second-order mode, so that the
    gradient of a gradient (R1, path length) also runs through the kernel. Third derivatives are not
    provided: asking for one raises an error instead of returning silently wrong values.
    """
    key = (dim, act, alpha, gain, clamp)
    if key in _kernel_functions:
        return _kernel_functions[key]

    spec = activation_funcs[act]
    config = dict(dim=dim, act=spec.cuda_idx, alpha=alpha, gain=gain, clamp=clamp)
    from_x = spec.ref == 'x'
    # Linear without clamp has the constant derivative `gain`, so nothing needs to be kept for it.
    keeps_y = not from_x and (act != 'linear' or clamp >= 0)

    def sum_to_bias(t):
        return t.sum([i for i in range(t.ndim) if i != dim])

    class BiasActKernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            y = _plugin.get().bias_act(x, b, None, None, None, grad=0, **config)
            ctx.save_for_backward(x if from_x else None, b if from_x else None, y if keeps_y else None)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, b, y = ctx.saved_tensors
            dx = BiasActKernelGrad.apply(dy, x, b, y)
            db = sum_to_bias(dx) if ctx.needs_input_grad[1] else None
            return dx, db

    class BiasActKernelGrad(torch.autograd.Function):
        # dx = dy * gain * f'(.) * mask, as a function of the upstream gradient dy and of the saved forward
        # tensors: x and b for x-based activations, y for y-based ones (the others are None).
        @staticmethod
        def forward(ctx, dy, x, b, y):
            dx = _plugin.get().bias_act(dy, b, x, y, None, grad=1, **config)
            ctx.save_for_backward(dy if spec.has_2nd_grad else None, x, b, y)
            return dx

        @staticmethod
        def backward(ctx, d_dx):
            dy, x, b, y = ctx.saved_tensors
            d_dy = d_x = d_b = d_y = None
            if ctx.needs_input_grad[0]:
                # dx is linear in dy, so its derivative applies the same map to d_dx.
                d_dy = BiasActKernelGrad.apply(d_dx, x, b, y)
            if spec.has_2nd_grad and any(ctx.needs_input_grad[1:]):
                term = BiasActKernelGrad2.apply(d_dx, dy, x, b, y)
                if from_x:
                    d_x = term
                    d_b = sum_to_bias(term) if ctx.needs_input_grad[2] else None
                else:
                    # Gradient with respect to the saved output y; autograd carries it on through the
                    # forward Function, which multiplies in dy/dx and so completes f''.
                    d_y = term
            return d_dy, d_x, d_b, d_y

    class BiasActKernelGrad2(torch.autograd.Function):
        # The term of the second derivative that comes from f'' (see bias_act.h, grad 2).
        @staticmethod
        def forward(ctx, d_dx, dy, x, b, y):
            return _plugin.get().bias_act(d_dx, b, x, y, dy, grad=2, **config)

        @staticmethod
        def backward(ctx, _):
            raise RuntimeError("bias_act: the CUDA kernel provides first and second derivatives only; "
                               "use impl='ref' for higher ones")

    _kernel_functions[key] = BiasActKernel
    return BiasActKernel

# ----------------------------------------------------------------------------
# Parity probe (see probe.py and dispatch.kernel_verdict).

# What the probe runs: (name, act, alpha, gain, clamp). lrelu with an active clamp is what every layer of the
# networks runs (its second derivative is d(dx)/d(dy) only); tanh takes its derivatives from the output y
# and swish from the input x, and both have the f'' term, so between them every kernel mode is exercised.
_PROBE_ACTS = (
    ('lrelu_clamp', 'lrelu', 0.2, _SQRT2, 1.0),
    ('tanh',        'tanh',  0.0, 1.0,    -1.0),
    ('swish',       'swish', 0.0, _SQRT2, -1.0),
)
_PROBE_SHAPE = (2, 8, 4, 4)


def _probe_inputs(seed):
    """x, b, dy and w in float64 on the CPU, from a private generator.

    Every pre-activation value x + b is at least 0.25 away from 0 (the kink of lrelu) and none lies in
    0.6..0.8, where lrelu's output crosses the clamp of 1.0: rounding to float16 cannot move a value from one
    side of either boundary to the other, which would change its derivative from one branch to the other.
    """
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, _PROBE_SHAPE, generator=gen).to(torch.float64) * 2 - 1
    mag = 0.25 + torch.rand(_PROBE_SHAPE, generator=gen, dtype=torch.float64)
    mag = torch.where((mag > 0.6) & (mag < 0.8), mag + 0.2, mag)
    b = torch.randn(_PROBE_SHAPE[1], generator=gen, dtype=torch.float64) * 0.5
    x = sign * mag - b.reshape(1, -1, 1, 1)
    dy = torch.randn(_PROBE_SHAPE, generator=gen, dtype=torch.float64)
    w = torch.randn(_PROBE_SHAPE, generator=gen, dtype=torch.float64)
    return x, b, dy, w


def _probe_case(device, name, act, alpha, gain, clamp, dtype, seed):
    def run(impl, run_dtype):
        x, b, dy, w = (t.to(dtype).to(device=device, dtype=run_dtype) for t in _probe_inputs(seed))
        if dtype == torch.float16:
            # The networks run their float16 layers channels-last, so the float16 cases use that layout.
            x, dy, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, w))
        x.requires_grad_(True)
        b.requires_grad_(True)
        dy.requires_grad_(True)
        y = impl(x, b, 1, act, alpha, gain, clamp)
        dx, db = torch.autograd.grad(y, [x, b], dy, create_graph=True)
        # Derivatives of a scalar that depends on both first derivatives: the second-order pass of R1 and
        # path-length regularization. Zero derivatives come back as None (lrelu has no f'' term).
        second = torch.autograd.grad((dx * w).sum() + db.sum(), [x, b, dy], allow_unused=True)
        ddx, ddb, ddy = (torch.zeros_like(t) if g is None else g for g, t in zip(second, (x, b, dy), strict=True))
        return dict(y=y, dx=dx, db=db, ddx=ddx, ddb=ddb, ddy=ddy)
    return ProbeCase(f'{name}/{str(dtype).split(".")[-1]}', dtype, run)


def probe_cases(device):
    """The probe's cases on `device`: each activation of `_PROBE_ACTS` in float32 and in float16."""
    cases = []
    for seed, (name, act, alpha, gain, clamp) in enumerate(_PROBE_ACTS):
        for dtype in (torch.float32, torch.float16):
            cases.append(_probe_case(torch.device(device), name, act, alpha, gain, clamp, dtype, seed))
    return cases


def probe_kernel(device):
    """Compare the kernel path (through the plugin in use) with the reference on `device`; a ProbeResult."""
    return probe_op('bias_act', _bias_act_kernel, _bias_act_ref, probe_cases(device))
