"""Fused multiply-add `a * b + c` with broadcasting, as one `torch.addcmul` call.

The network code of official snapshots calls `fma(a, b, c)` (name and signature frozen) to apply the
demodulation coefficients and add the noise in one step. Autograd's own gradient of addcmul is correct
too; the explicit Function here spells out how each gradient is reduced back to its input's shape, and its
backward is made of ordinary differentiable ops, so the result can be differentiated twice.
"""

import torch


def fma(a, b, c):
    """`a * b + c` in one operation; a, b and c are tensors whose shapes broadcast together."""
    return _FusedMultiplyAdd.apply(a, b, c)


class _FusedMultiplyAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        out = torch.addcmul(c, a, b)
        ctx.save_for_backward(a, b)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = db = dc = None
        if ctx.needs_input_grad[0]:
            da = _sum_to_shape(dout * b, a.shape)
        if ctx.needs_input_grad[1]:
            db = _sum_to_shape(dout * a, b.shape)
        if ctx.needs_input_grad[2]:
            dc = _sum_to_shape(dout, ctx.c_shape)
        return da, db, dc


def _sum_to_shape(t, shape):
    """Sum `t` over the dimensions that broadcasting added to or stretched in a tensor of `shape`."""
    # Leading dimensions that the input did not have at all.
    extra = t.ndim - len(shape)
    if extra > 0:
        t = t.sum(dim=list(range(extra)))
    # Dimensions where the input had size 1 and was stretched; keepdim restores the size-1 dimension.
    stretched = [i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1]
    if stretched:
        t = t.sum(dim=stretched, keepdim=True)
    assert t.shape == shape, f'cannot reduce a gradient of shape {tuple(t.shape)} to {tuple(shape)}'
    return t
