"""torch_utils.ops.fma: values, gradients reduced to each input's shape under broadcasting, double backward."""

import pytest
import torch

from torch_utils.ops.fma import fma

# (a, b, c) shapes: no broadcasting; the uses in the networks (demodulation coefficients and noise against
# [N, C, H, W]); size-1 stretching in each input; missing leading dimensions; 0-d tensors; every input
# smaller than the result.
SHAPES = [
    ((2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 4, 5)),
    ((2, 3, 4, 5), (2, 3, 1, 1), (2, 1, 4, 5)),
    ((2, 3, 4, 5), (2, 3, 1, 1), (4, 5)),
    ((2, 1, 4), (1, 3, 1), (2, 3, 4)),
    ((4,), (3, 1), (2, 1, 1)),
    ((), (2, 3), ()),
    ((3, 1), (1, 4), (1,)),
]


def _inputs(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(True) for shape in shapes]


@pytest.mark.parametrize('shapes', SHAPES, ids=str)
def test_value_matches_multiply_add(shapes):
    a, b, c = _inputs(shapes, dtype=torch.float32)
    out = fma(a, b, c)
    assert out.shape == torch.broadcast_shapes(*shapes)
    torch.testing.assert_close(out, a * b + c)


@pytest.mark.parametrize('shapes', SHAPES, ids=str)
def test_gradients_match_autograd_of_multiply_add(shapes):
    a, b, c = _inputs(shapes)
    out_shape = torch.broadcast_shapes(*shapes)
    dout = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = torch.autograd.grad(fma(a, b, c), [a, b, c], dout)
    theirs = torch.autograd.grad(a * b + c, [a, b, c], dout)
    for g, t, x in zip(ours, theirs, (a, b, c), strict=True):
        assert g.shape == x.shape
        torch.testing.assert_close(g, t)


@pytest.mark.parametrize('shapes', SHAPES, ids=str)
def test_gradcheck_and_gradgradcheck(shapes):
    inputs = _inputs(shapes)
    assert torch.autograd.gradcheck(fma, inputs)
    assert torch.autograd.gradgradcheck(fma, inputs)


def test_gradients_when_only_some_inputs_require_them():
    a, b, c = _inputs(SHAPES[1])
    b.requires_grad_(False)
    da, dc = torch.autograd.grad(fma(a, b, c).sum(), [a, c])
    torch.testing.assert_close(da, b.expand(2, 3, 4, 5))
    torch.testing.assert_close(dc, torch.full((2, 1, 4, 5), 3.0, dtype=torch.float64))
