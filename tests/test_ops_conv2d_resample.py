"""conv2d_resample: reference vectors, every fast path against the generic definition, derivatives."""

import itertools

import pytest
import torch
import vectors

from torch_utils.ops import conv2d_gradfix, conv2d_resample, upfirdn2d
from torch_utils.ops.conv2d_resample import _generic, _total_padding

CR = conv2d_resample.conv2d_resample


@pytest.mark.parametrize('case', vectors.op_cases('conv2d_resample'), ids=vectors.case_id)
def test_reference_vectors(case):
    out = CR(**vectors.case_inputs(case), **case['kwargs'])
    assert list(out.shape) == case['out_shape']
    torch.testing.assert_close(out, vectors.case_output(case), **vectors.tolerances(case))


def _random_args(seed, kernel, up, down, groups, padding, filt, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([2, 2 * groups, 7, 6], generator=g, dtype=dtype)
    w = torch.randn([3 * groups, 2, kernel[0], kernel[1]], generator=g, dtype=dtype)
    f = {'none': None, '1d': upfirdn2d.setup_filter([1, 3, 3, 1], separable=True),
         '2d': upfirdn2d.setup_filter([1, 3, 3, 1]),
         'odd': upfirdn2d.setup_filter(torch.tensor([[1., 2., 0.5], [0.25, 3., 1.]]))}[filt]
    return x, w, f


# Every path is selected by (kernel, up, down); the other arguments are cycled through so that each of
# them meets every path without a full product (which would take minutes on two cores).
_VARIANTS = list(itertools.product(
    [1, 2],                                             # groups
    [0, 1, [2, 0, 1, 3], [-1, 2, 0, -1]],               # padding
    ['2d', '1d', 'odd'],                                # filter
    [True, False],                                      # flip_weight
))
FAST_PATH_GRID = [
    (kernel, up, down, *_VARIANTS[(i * 5 + j) % len(_VARIANTS)])
    for i, (kernel, up, down) in enumerate(itertools.product([(1, 1), (3, 3), (2, 3)], [1, 2, 3], [1, 2]))
    for j in range(4)
]


@pytest.mark.parametrize('kernel, up, down, groups, padding, filt, flip_weight', FAST_PATH_GRID)
def test_every_path_equals_the_generic_definition(kernel, up, down, groups, padding, filt, flip_weight):
    x, w, f = _random_args(0, kernel, up, down, groups, padding, filt)
    pad = _total_padding(f, up, down, padding)
    expected = _generic(x, w, f, up, down, pad, groups, flip_weight, flip_filter=False)
    assert expected.numel() > 0
    out = CR(x, w, f=f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_flip_filter_and_plain_paths_equal_generic():
    x, w, _ = _random_args(1, (3, 3), 1, 1, 1, 0, 'none')
    f = upfirdn2d.setup_filter(torch.tensor([[1., 2., 0.5], [0.25, 3., 1.]]))
    for up, down in [(2, 1), (1, 2), (2, 2)]:
        pad = _total_padding(f, up, down, 1)
        expected = _generic(x, w, f, up, down, pad, 1, True, flip_filter=True)
        torch.testing.assert_close(CR(x, w, f=f, up=up, down=down, padding=1, flip_filter=True), expected,
                                   atol=1e-10, rtol=1e-10)
    plain = torch.nn.functional.conv2d(x, w, padding=1)
    torch.testing.assert_close(CR(x, w, padding=1), plain, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(CR(x, w, padding=1, flip_weight=False),
                               torch.nn.functional.conv2d(x, w.flip([2, 3]), padding=1), atol=1e-12, rtol=1e-12)


def test_upsampling_conv_equals_transposed_conv_then_filter():
    # The identity the vectors README states for the synthesis conv0 (up=2, flip_weight=False).
    x, w, _ = _random_args(2, (3, 3), 2, 1, 1, 1, 'none')
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    out = CR(x, w, f=f, up=2, padding=1, flip_weight=False)
    t = torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2)
    expected = upfirdn2d.upfirdn2d(t, f, padding=1, gain=4)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert out.shape[2:] == (2 * x.shape[2], 2 * x.shape[3])


@pytest.mark.parametrize('kernel, up, down, groups', [
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((3, 3), 1, 2, 2), ((1, 1), 2, 1, 1), ((1, 1), 1, 2, 1), ((2, 3), 2, 2, 2),
])
def test_gradcheck_and_gradgradcheck(kernel, up, down, groups):
    x, w, f = _random_args(3, kernel, up, down, groups, 1, '2d')
    x = x[:1, :, :5, :4].clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)

    def fn(x, w):
        return CR(x, w, f=f, up=up, down=down, padding=1, groups=groups)

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_input_gradient_is_the_same_without_weight_gradients():
    x, w, f = _random_args(4, (3, 3), 2, 1, 1, 1, '2d')
    x.requires_grad_(True)
    w.requires_grad_(True)
    saved = conv2d_gradfix.enabled
    conv2d_gradfix.enabled = True
    try:
        (g_full,) = torch.autograd.grad(CR(x, w, f=f, up=2, padding=1).square().sum(), [x])
        with conv2d_gradfix.no_weight_gradients():
            (g_fast,) = torch.autograd.grad(CR(x, w, f=f, up=2, padding=1).square().sum(), [x])
    finally:
        conv2d_gradfix.enabled = saved
    torch.testing.assert_close(g_fast, g_full, atol=1e-12, rtol=1e-12)


def test_argument_errors_are_clear():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match='4-D'):
        CR(x[0], w)
    with pytest.raises(ValueError, match='dtype'):
        CR(x, w.double())
    with pytest.raises(ValueError, match='up'):
        CR(x, w, up=0)
    with pytest.raises(ValueError, match='groups'):
        CR(x, w, groups=3)
    with pytest.raises(ValueError, match='filter'):
        CR(x, w, f=torch.ones(1, 1, 1))
