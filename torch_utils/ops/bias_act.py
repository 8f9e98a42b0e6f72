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
from typing import Optional

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
    # Both conversions happen outside the op so that their gradients are tracked: the op saves its inputs
    # for the second-order pass, whose gradients must reach the caller's x and b.
    if not _is_dense(x):
        x = x.contiguous()
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return _kernel_op(x, b, None, None, None, 0, dim, activation_funcs[act].cuda_idx, alpha, gain, clamp)

# ----------------------------------------------------------------------------
# The kernel as a `torch.library` custom op, so that torch.compile traces it as one node (its fake kernel
# gives the shapes) instead of breaking the graph at the extension call.
#
# One op mirrors the extension's own entry point (see bias_act.h): mode `grad` 0 is the forward pass, 1 its
# derivative with respect to x, 2 the term of the second derivative that comes from f''. Its autograd
# formula is again this op: the gradient of mode 0 is mode 1; mode 1 is linear in its x (the upstream
# gradient), so its gradient with respect to x is mode 1 again, and the rest is mode 2, so that the gradient
# of a gradient (R1, path length) runs through the kernel too. Mode 2 has no derivative: asking for a third
# one raises an error instead of returning silently wrong values.
#
# On a CUDA tensor the op runs the extension. On the CPU it runs `_host_module`, a PyTorch transcription of
# the kernel's element code (below), so that `torch.library.opcheck` and the parity probe can exercise the op,
# its autograd formula and its fake kernel without a GPU (tests that compile the .cu file for the host
# replace `_host_module` with that build). The default CPU path never calls the op: it runs the reference.

_SPECS_BY_INDEX = {spec.cuda_idx: spec for spec in activation_funcs.values()}
_NAMES_BY_INDEX = {spec.cuda_idx: name for name, spec in activation_funcs.items()}


def _sum_to_bias(t, dim):
    return t.sum([i for i in range(t.ndim) if i != dim])


def _kernel_impl(
    x:      torch.Tensor,               # grad 0: input; 1: upstream gradient; 2: gradient of the grad-1 output.
    b:      Optional[torch.Tensor],     # Bias along `dim`, or None.
    xref:   Optional[torch.Tensor],     # Forward input (x-based activations, grad 1/2), or None.
    yref:   Optional[torch.Tensor],     # Forward output (y-based activations, grad 1/2), or None.
    dy:     Optional[torch.Tensor],     # The upstream gradient that grad 1 was given (grad 2 only), or None.
    grad:   int,                        # 0, 1 or 2.
    dim:    int,                        # Dimension of x that b runs along.
    act:    int,                        # The activation's `cuda_idx`.
    alpha:  float,                      # Activation parameter.
    gain:   float,                      # Scale after the activation.
    clamp:  float,                      # Clamp limit; negative: none.
) -> torch.Tensor:
    module = _plugin.get() if x.device.type == 'cuda' else _host_module
    return module.bias_act(x, b, xref, yref, dy, grad=grad, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)


def _kernel_fake(x, b, xref, yref, dy, grad, dim, act, alpha, gain, clamp):
    # The extension returns the layout of the forward tensor where there is one (bias_act.cpp).
    layout = xref if xref is not None else (yref if yref is not None else x)
    return torch.empty_like(layout)


def _kernel_setup_context(ctx, inputs, output):
    x, b, xref, yref, dy, grad, dim, act, alpha, gain, clamp = inputs
    spec = _SPECS_BY_INDEX[act]
    ctx.config = (dim, act, alpha, gain, clamp)
    ctx.grad = grad
    from_x = spec.ref == 'x'
    if grad == 0:
        # Linear without clamp has the constant derivative `gain`, so nothing needs to be kept for it.
        keeps_y = not from_x and (spec.cuda_idx != 1 or clamp >= 0)
        ctx.save_for_backward(x if from_x else None, b if from_x else None, output if keeps_y else None)
    elif grad == 1:
        ctx.save_for_backward(x if spec.has_2nd_grad else None, b, xref, yref)


def _kernel_backward(ctx, d_out):
    dim, act, alpha, gain, clamp = ctx.config
    spec = _SPECS_BY_INDEX[act]
    if ctx.grad == 0:
        x, b, y = ctx.saved_tensors
        dx = _kernel_op(d_out, b, x, y, None, 1, dim, act, alpha, gain, clamp)
        db = _sum_to_bias(dx, dim) if ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None, None, None, None, None, None
    if ctx.grad == 1:
        # Mode 1 computed dx = dy * gain * f'(.) * mask from the upstream gradient dy (its x) and the saved forward
        # tensors: xref and b for x-based activations, yref for y-based ones.
        dy, b, x, y = ctx.saved_tensors
        d_dy = d_b = d_x = d_y = None
        if ctx.needs_input_grad[0]:
            d_dy = _kernel_op(d_out, b, x, y, None, 1, dim, act, alpha, gain, clamp)
        if spec.has_2nd_grad and any(ctx.needs_input_grad[1:4]):
            term = _kernel_op(d_out, b, x, y, dy, 2, dim, act, alpha, gain, clamp)
            if spec.ref == 'x':
                d_x = term
                d_b = _sum_to_bias(term, dim) if ctx.needs_input_grad[1] else None
            else:
                # Gradient with respect to the saved output y; autograd carries it on through the mode-0 call,
                # which multiplies in dy/dx and so completes f''.
                d_y = term
        return d_dy, d_b, d_x, d_y, None, None, None, None, None, None, None
    raise RuntimeError("bias_act: the CUDA kernel provides first and second derivatives only; "
                       "use impl='ref' for higher ones")


class _HostKernel:
    """The kernel's element code (bias_act.cu, `bias_act_element`) in PyTorch, with the extension's call
    signature: what the op runs on the CPU. Computes in float32 for float16 and in x's dtype otherwise."""

    @staticmethod
    def bias_act(x, b, xref, yref, dy, grad, dim, act, alpha, gain, clamp):
        spec = _SPECS_BY_INDEX[act]
        compute = torch.float32 if x.dtype == torch.float16 else x.dtype
        layout = xref if xref is not None else (yref if yref is not None else x)
        bias = 0
        if b is not None:
            bias = b.to(compute).reshape([-1 if i == dim else 1 for i in range(x.ndim)])
        v = x.to(compute)
        if grad == 0:
            out = spec.func(v + bias, alpha=alpha) * gain
            if clamp >= 0:
                out = out.clamp(-clamp, clamp)
        else:
            if spec.ref == 'x':
                s = xref.to(compute) + bias
                keep = True
                if clamp >= 0:
                    y = spec.func(s, alpha=alpha) * gain  # The unclamped forward output, recomputed.
                    keep = (y <= clamp) & (y >= -clamp)
                factor = gain * (_deriv_from_x(act, s) if grad == 1 else _deriv2_from_x(act, s))
            else:
                y = yref.to(compute) if yref is not None else torch.zeros_like(v)
                keep = True
                if clamp >= 0:
                    # Clamped outputs hold the limit rounded to x's dtype: compare with that rounding.
                    stored = float(torch.tensor(clamp, dtype=x.dtype))
                    keep = (y < stored) & (y > -stored)
                u = y * (1 / gain if gain != 0 else 0)
                factor = gain * _deriv_from_y(act, u, alpha) if grad == 1 else _deriv2_from_y(act, u)
            upstream = v * dy.to(compute) if grad == 2 else v
            # Where the output was clamped the gradient is exactly 0, even for an infinite upstream gradient.
            out = torch.where(torch.as_tensor(keep), upstream * factor, torch.zeros([], dtype=compute))
        result = torch.empty_like(layout)
        result.copy_(out)
        return result


# The derivatives the kernel uses, in its notation (bias_act.cu): f'(s) and f''(s) of the x-based activations,
# and f' as a function of u = f(s) and its derivative d f'/d u for the y-based ones.
_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


def _deriv_from_x(act, s):
    sig = torch.sigmoid(s)
    if act == activation_funcs['softplus'].cuda_idx:
        return sig
    return sig * (1 + s * (1 - sig))


def _deriv2_from_x(act, s):
    sig = torch.sigmoid(s)
    dsig = sig * (1 - sig)
    if act == activation_funcs['softplus'].cuda_idx:
        return dsig
    return dsig * (2 + s * (1 - 2 * sig))


def _deriv_from_y(act, u, alpha):
    name = _NAMES_BY_INDEX[act]
    positive = u > 0
    if name == 'linear':
        return torch.ones_like(u)
    if name == 'relu':
        return positive.to(u.dtype)
    if name == 'lrelu':
        return torch.where(positive, torch.ones_like(u), torch.full_like(u, alpha))
    if name == 'tanh':
        return 1 - u * u
    if name == 'sigmoid':
        return u * (1 - u)
    if name == 'elu':
        return torch.where(positive, torch.ones_like(u), u + 1)
    return torch.where(positive, torch.full_like(u, _SELU_SCALE), u + _SELU_SCALE * _SELU_ALPHA)


def _deriv2_from_y(act, u):
    name = _NAMES_BY_INDEX[act]
    if name == 'tanh':
        return -2 * u
    if name == 'sigmoid':
        return 1 - 2 * u
    if name in ('elu', 'selu'):
        return (u <= 0).to(u.dtype)
    return torch.zeros_like(u)


_host_module = _HostKernel()
_kernel_op = dispatch.kernel_op('bias_act_kernel', _kernel_impl, _kernel_fake, _kernel_setup_context,
                                _kernel_backward)

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
