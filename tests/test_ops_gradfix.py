"""conv2d_gradfix and grid_sample_gradfix: same numbers as torch.nn.functional, gradients of any order, and
weight gradients that are really skipped inside `no_weight_gradients()`."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix

DT = torch.float64


@pytest.fixture(autouse=True)
def _reset_gradfix_state():
    """Every test starts and ends with the documented defaults and empty probe caches."""
    def reset():
        conv2d_gradfix.enabled = False
        conv2d_gradfix.weight_gradients_disabled = False
        conv2d_gradfix._reset_feature_probe()
        grid_sample_gradfix.enabled = False
        grid_sample_gradfix._reset_probe()
    reset()
    yield
    reset()


def _rand(*shape, seed, requires_grad=True, dtype=DT):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(requires_grad)


def _grads(y, tensors, seed=99):
    """Gradients of a random projection of y (a non-trivial output gradient) w.r.t. the given tensors."""
    weights = _rand(*y.shape, seed=seed, requires_grad=False, dtype=y.dtype)
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad((y * weights).sum(), present)

# ----------------------------------------------------------------------------
# conv2d / conv_transpose2d: argument combinations.

# (in channels, out channels, kernel, kwargs) for conv2d; input is [2, cin, 7, 6] (odd/even sizes on purpose).
CONV_CASES = [
    (4, 6, 3, dict()),
    (4, 6, 3, dict(padding=1)),
    (4, 6, 3, dict(stride=2, padding=1)),
    (4, 6, 3, dict(stride=2, padding=0, groups=2)),
    (4, 6, 1, dict(stride=2)),
    (4, 4, 3, dict(padding=2, dilation=2, groups=2)),
    (4, 6, 3, dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    (4, 4, 3, dict(stride=3, padding=1, groups=4)),
]

# (in channels, out channels, kernel, kwargs) for conv_transpose2d; the weight is [cin, cout / groups, k, k].
CONV_T_CASES = [
    (4, 6, 3, dict()),
    (4, 6, 3, dict(padding=1)),
    (4, 6, 3, dict(stride=2, padding=1)),
    (4, 6, 3, dict(stride=2, padding=1, output_padding=1)),
    (4, 6, 4, dict(stride=2, padding=1, groups=2)),
    (4, 4, 3, dict(stride=2, padding=0, output_padding=1, groups=2, dilation=2)),
    (4, 6, 3, dict(stride=1, padding=2, output_padding=1, dilation=2)),    # output_padding >= stride
    (4, 6, 3, dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0))),
]


def _conv_tensors(transpose, cin, cout, k, kwargs, with_bias, seed=0):
    groups = kwargs.get('groups', 1)
    x = _rand(2, cin, 7, 6, seed=seed)
    w_shape = (cin, cout // groups, k, k) if transpose else (cout, cin // groups, k, k)
    w = _rand(*w_shape, seed=seed + 1)
    b = _rand(cout, seed=seed + 2) if with_bias else None
    return x, w, b


def _ops(transpose):
    if transpose:
        return conv2d_gradfix.conv_transpose2d, F.conv_transpose2d
    return conv2d_gradfix.conv2d, F.conv2d


ALL_CASES = [(False,) + case for case in CONV_CASES] + [(True,) + case for case in CONV_T_CASES]
CASE_IDS = [f'{"T" if c[0] else "C"}{i}-{c[4]}' for i, c in enumerate(ALL_CASES)]


@pytest.mark.parametrize('with_bias', [False, True], ids=['nobias', 'bias'])
@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', ALL_CASES, ids=CASE_IDS)
def test_custom_path_matches_functional(transpose, cin, cout, k, kwargs, with_bias):
    ours, theirs = _ops(transpose)
    x, w, b = _conv_tensors(transpose, cin, cout, k, kwargs, with_bias)
    expected = theirs(x, w, b, **kwargs)
    expected_grads = _grads(expected, [x, w, b])

    conv2d_gradfix.enabled = True
    y = ours(x, w, b, **kwargs)
    assert type(y.grad_fn).__name__ == '_ConvFunctionBackward'     # Really the custom path.
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(y, [x, w, b]), expected_grads, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', ALL_CASES, ids=CASE_IDS)
def test_custom_path_second_derivatives_match_functional(transpose, cin, cout, k, kwargs):
    # d/d(x, w, b) of |dL/dx|^2 + |dL/dw|^2, the shape of an R1 / path-length penalty on both arguments.
    ours, theirs = _ops(transpose)

    def penalty_grads(op):
        x, w, b = _conv_tensors(transpose, cin, cout, k, kwargs, with_bias=True)
        gx, gw = torch.autograd.grad((op(x, w, b, **kwargs) ** 2).sum(), [x, w], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), [x, w, b])

    expected = penalty_grads(theirs)
    conv2d_gradfix.enabled = True
    for got, want in zip(penalty_grads(ours), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


GRADCHECK_CASES = [
    (False, 2, 4, 3, dict(stride=2, padding=1, groups=2)),
    (False, 2, 2, 3, dict(padding=2, dilation=2)),
    (True, 2, 4, 3, dict(stride=2, padding=1, output_padding=1, groups=2)),
    (True, 2, 2, 3, dict(stride=1, padding=2, output_padding=1, dilation=2)),
]


@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', GRADCHECK_CASES,
                         ids=[f'{"T" if c[0] else "C"}-{c[4]}' for c in GRADCHECK_CASES])
def test_gradcheck_and_gradgradcheck(transpose, cin, cout, k, kwargs):
    conv2d_gradfix.enabled = True
    op = _ops(transpose)[0]
    groups = kwargs.get('groups', 1)
    x = _rand(1, cin, 5, 4, seed=3)
    w = _rand(*((cin, cout // groups, k, k) if transpose else (cout, cin // groups, k, k)), seed=4)
    b = _rand(cout, seed=5)

    def fn(x, w, b):
        return op(x, w, b, **kwargs)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_disabled_calls_the_functional_ops(monkeypatch):
    calls = []
    for name in ('conv2d', 'conv_transpose2d'):
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x, w, b = _conv_tensors(False, 4, 6, 3, {}, with_bias=True)
    y = conv2d_gradfix.conv2d(x, w, b, padding=1)
    yt = conv2d_gradfix.conv_transpose2d(x, w.transpose(0, 1), None, stride=2)
    assert calls == ['conv2d', 'conv_transpose2d']
    assert type(y.grad_fn).__name__ != '_ConvFunctionBackward'
    torch.testing.assert_close(y, torch.conv2d(x, w, b, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(yt, torch.conv_transpose2d(x, w.transpose(0, 1), None, stride=2), rtol=0, atol=0)
    assert conv2d_gradfix._weight_grad_op_available is None      # Disabled: not even the feature check ran.


def test_unsupported_arguments_go_to_pytorch():
    # String padding and unbatched input are left to PyTorch even when enabled.
    conv2d_gradfix.enabled = True
    x, w, _ = _conv_tensors(False, 4, 6, 3, {}, with_bias=False)
    y = conv2d_gradfix.conv2d(x, w, padding='same')
    torch.testing.assert_close(y, F.conv2d(x, w, padding='same'))
    assert type(y.grad_fn).__name__ != '_ConvFunctionBackward'
    y = conv2d_gradfix.conv2d(x[0], w, padding=1)
    torch.testing.assert_close(y, F.conv2d(x[0], w, padding=1))


def test_missing_weight_grad_op_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(conv2d_gradfix, '_WEIGHT_GRAD_OP', 'no_such_op_for_this_test')
    conv2d_gradfix.enabled = True
    x, w, b = _conv_tensors(False, 4, 6, 3, {}, with_bias=True)
    with pytest.warns(RuntimeWarning, match='cannot skip weight gradients'):
        y = conv2d_gradfix.conv2d(x, w, b, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = conv2d_gradfix.conv2d(x, w, b, padding=1)
    assert type(y.grad_fn).__name__ != '_ConvFunctionBackward'
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1))

# ----------------------------------------------------------------------------
# no_weight_gradients.


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the weight-gradient kernel (the work `no_weight_gradients` must avoid)."""
    calls = []
    original = conv2d_gradfix._weight_gradient_kernel

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(conv2d_gradfix, '_weight_gradient_kernel', counting)
    return calls


NWG_CASES = [(False, 4, 6, 3, dict(stride=2, padding=1)), (True, 4, 6, 3, dict(stride=2, padding=1, output_padding=1))]
NWG_IDS = ['conv2d', 'conv_transpose2d']


@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', NWG_CASES, ids=NWG_IDS)
def test_no_weight_gradients_skips_the_kernel(transpose, cin, cout, k, kwargs, kernel_calls):
    conv2d_gradfix.enabled = True
    op = _ops(transpose)[0]
    x, w, b = _conv_tensors(transpose, cin, cout, k, kwargs, with_bias=True)

    op(x, w, b, **kwargs).square().sum().backward()
    assert len(kernel_calls) == 1 and w.grad is not None
    x_grad_outside = x.grad.clone()

    x.grad = w.grad = b.grad = None
    with conv2d_gradfix.no_weight_gradients():
        op(x, w, b, **kwargs).square().sum().backward()
    assert len(kernel_calls) == 1           # Not called again.
    assert w.grad is None
    assert b.grad is not None               # The bias gradient is cheap and still computed.
    torch.testing.assert_close(x.grad, x_grad_outside, rtol=0, atol=0)

    with conv2d_gradfix.no_weight_gradients():
        y = op(x, w, b, **kwargs).sum()
        with pytest.raises(RuntimeError, match='not have been used'):
            torch.autograd.grad(y, [x, w], retain_graph=True)
        gx, gw = torch.autograd.grad(y, [x, w], allow_unused=True)
    assert gw is None and gx is not None
    assert len(kernel_calls) == 1


@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', NWG_CASES, ids=NWG_IDS)
def test_double_backward_inside_no_weight_gradients(transpose, cin, cout, k, kwargs, kernel_calls):
    conv2d_gradfix.enabled = True
    op = _ops(transpose)[0]

    def input_grad_norm_grad(skip):
        x, w, b = _conv_tensors(transpose, cin, cout, k, kwargs, with_bias=True)
        with conv2d_gradfix.no_weight_gradients(skip):
            (gx,) = torch.autograd.grad((op(x, w, b, **kwargs) ** 2).sum(), [x], create_graph=True)
            gx.norm().backward()
        return x.grad, w.grad

    x_grad_outside, w_grad_outside = input_grad_norm_grad(skip=False)
    calls_outside = len(kernel_calls)
    x_grad_inside, w_grad_inside = input_grad_norm_grad(skip=True)
    assert len(kernel_calls) == calls_outside          # Inside: no weight-gradient kernel at any order.
    assert w_grad_outside is not None and w_grad_inside is None
    torch.testing.assert_close(x_grad_inside, x_grad_outside, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('transpose,cin,cout,k,kwargs', NWG_CASES, ids=NWG_IDS)
def test_r1_pattern_gives_exact_weight_gradients(transpose, cin, cout, k, kwargs, kernel_calls):
    # The training loop's R1 pass: input gradient inside the block, penalty backpropagated after it. The
    # penalty's weight gradient flows through the input-gradient graph and must equal PyTorch's.
    ours, theirs = _ops(transpose)

    def r1_param_grads(op, skip):
        x, w, b = _conv_tensors(transpose, cin, cout, k, kwargs, with_bias=True)
        y = op(torch.tanh(x), w, b, **kwargs)
        with conv2d_gradfix.no_weight_gradients(skip):
            (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        calls_before = len(kernel_calls)
        gx.square().sum().backward()
        return x.grad, w.grad, b.grad, len(kernel_calls) - calls_before

    expected = r1_param_grads(theirs, skip=False)[:3]
    conv2d_gradfix.enabled = True
    *got, calls_after_block = r1_param_grads(ours, skip=True)
    assert calls_after_block >= 1           # Weight gradients are back on after the block.
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_float32_channels_last_matches_functional():
    # The layout and precision of real training: an R1-style second derivative, compared with PyTorch.
    def r1_grads(enabled):
        conv2d_gradfix.enabled = enabled
        x = _rand(2, 8, 9, 9, seed=6, dtype=torch.float32).to(memory_format=torch.channels_last)
        w = _rand(16, 8, 3, 3, seed=7, dtype=torch.float32).to(memory_format=torch.channels_last)
        y = conv2d_gradfix.conv2d(x, w, stride=2, padding=1)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        return (y,) + torch.autograd.grad(gx.square().sum() + y.sum(), [x, w])

    # float32 sums in a different order: compare relative to each tensor's scale (weight gradients reach ~1e3).
    for got, want in zip(r1_grads(True), r1_grads(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_no_weight_gradients_restores_the_flag():
    assert conv2d_gradfix.weight_gradients_disabled is False
    with conv2d_gradfix.no_weight_gradients():
        assert conv2d_gradfix.weight_gradients_disabled is True
        with conv2d_gradfix.no_weight_gradients():
            assert conv2d_gradfix.weight_gradients_disabled is True
        assert conv2d_gradfix.weight_gradients_disabled is True     # Inner exit does not re-enable.
        with conv2d_gradfix.no_weight_gradients(False):
            assert conv2d_gradfix.weight_gradients_disabled is True  # False never overrides an outer block.
    assert conv2d_gradfix.weight_gradients_disabled is False
    with conv2d_gradfix.no_weight_gradients(disable=False):
        assert conv2d_gradfix.weight_gradients_disabled is False

    with pytest.raises(KeyError):
        with conv2d_gradfix.no_weight_gradients():
            raise KeyError('boom')
    assert conv2d_gradfix.weight_gradients_disabled is False

# ----------------------------------------------------------------------------
# grid_sample.


def _native_grid_sample(input, grid):
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def _sample_args(seed, n=2, c=3, h=5, w=6, ho=4, wo=7, spread=1.3, dtype=DT, requires_grad=True):
    """Random image and grid; grid values in [-spread, spread] so some points fall outside the image."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    grid = (torch.rand(n, ho, wo, 2, generator=generator, dtype=dtype) * 2 - 1) * spread
    return image.requires_grad_(requires_grad), grid.requires_grad_(requires_grad)


@pytest.mark.parametrize('enabled', [False, True], ids=['disabled', 'enabled'])
def test_grid_sample_matches_functional(enabled):
    grid_sample_gradfix.enabled = enabled
    image, grid = _sample_args(seed=0)
    expected = _native_grid_sample(image, grid)
    y = grid_sample_gradfix.grid_sample(image, grid)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(y, [image, grid]), _grads(expected, [image, grid]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (grid_sample_gradfix._native_probe_results != {}) == enabled     # Probe only runs when enabled.


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [dict(), dict(n=1, c=1, h=1, w=1, ho=3, wo=3), dict(h=8, w=3, ho=11, wo=2)],
                         ids=['5x6', '1x1', '8x3'])
@pytest.mark.parametrize('spread', [0.9, 1.5, 4.0])
def test_reference_sampler_matches_functional(dtype, shape, spread):
    image, grid = _sample_args(seed=1, dtype=dtype, spread=spread, **shape)
    expected = _native_grid_sample(image, grid)
    y = grid_sample_gradfix._grid_sample_ref(image, grid)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    for got, want in zip(_grads(y, [image, grid]), _grads(expected, [image, grid]), strict=True):
        torch.testing.assert_close(got, want, rtol=tol * 100, atol=tol * 100)


def test_reference_sampler_exact_points():
    # align_corners=False: pixel centres sit at (2 i + 1) / size - 1; the outer edges at -1 and +1 are half a
    # pixel outside, where bilinear sampling blends with the zero padding.
    image = torch.arange(12, dtype=DT).reshape(1, 1, 3, 4)
    centre = lambda i, size: (2 * i + 1) / size - 1     # noqa: E731
    points = [(centre(1, 4), centre(2, 3)), (centre(3, 4), centre(0, 3)), (-1.0, centre(1, 3)), (5.0, 0.0)]
    grid = torch.tensor(points, dtype=DT).reshape(1, 1, 4, 2)
    y = grid_sample_gradfix._grid_sample_ref(image, grid).flatten().tolist()
    assert y == pytest.approx([9.0, 3.0, 2.0, 0.0])


def _check_second_order(sampler):
    image, grid = _sample_args(seed=2, n=1, c=2, h=3, w=4, ho=3, wo=2)
    assert torch.autograd.gradcheck(sampler, (image, grid))
    assert torch.autograd.gradgradcheck(sampler, (image, grid))


def test_gradgradcheck_chosen_path():
    grid_sample_gradfix.enabled = True
    _check_second_order(grid_sample_gradfix.grid_sample)


def test_gradgradcheck_reference_sampler():
    _check_second_order(grid_sample_gradfix._grid_sample_ref)


def test_probe_finds_native_double_backward():
    # Current PyTorch differentiates grid_sample twice, so the native op is chosen.
    assert grid_sample_gradfix._native_double_backward_works(torch.device('cpu')) is True
    rng_state = torch.get_rng_state()
    grid_sample_gradfix._reset_probe()
    grid_sample_gradfix._native_double_backward_works(torch.device('cpu'))
    assert torch.equal(torch.get_rng_state(), rng_state)       # The probe draws no random numbers.


class _OnceDifferentiableGridSample(torch.autograd.Function):
    """A grid_sample without double backward, as in old PyTorch releases."""

    @staticmethod
    def forward(ctx, input, grid):
        ctx.save_for_backward(input, grid)
        return _native_grid_sample(input, grid)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        with torch.enable_grad():
            input, grid = input.detach().requires_grad_(), grid.detach().requires_grad_()
            out = _native_grid_sample(input, grid)
        return torch.autograd.grad(out, [input, grid], grad_output)


def test_probe_rejects_an_op_without_double_backward(monkeypatch):
    monkeypatch.setattr(F, 'grid_sample', lambda input, grid, **kwargs: _OnceDifferentiableGridSample.apply(input,
                                                                                                            grid))
    assert grid_sample_gradfix._native_double_backward_works(torch.device('cpu')) is False


def test_fallback_uses_reference_when_probe_says_no(monkeypatch):
    calls = []
    original = grid_sample_gradfix._grid_sample_ref
    monkeypatch.setattr(grid_sample_gradfix, '_grid_sample_ref', lambda *a: calls.append(1) or original(*a))
    monkeypatch.setitem(grid_sample_gradfix._native_probe_results, 'cpu', False)
    grid_sample_gradfix.enabled = True

    image, grid = _sample_args(seed=3)
    y = grid_sample_gradfix.grid_sample(image, grid)
    assert calls == [1]
    torch.testing.assert_close(y, _native_grid_sample(image, grid), rtol=1e-12, atol=1e-12)
    _check_second_order(grid_sample_gradfix.grid_sample)
    assert len(calls) > 1
