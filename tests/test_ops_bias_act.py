"""torch_utils.ops.bias_act: reference vectors, closed forms, derivatives of both paths, dispatch.

The kernel path is checked three ways: on a GPU (`cuda` marker) against the reference; on any machine with
nvcc by compiling the kernel's per-element code for the host and running the kernel path's autograd
Functions on CPU through it (`slow` marker); and, everywhere, by the compile checks in
test_kernel_sources.py.
"""

import ctypes
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import vectors
from host_kernels import LAYOUTS, use_host_kernel, with_layout

from torch_utils.ops import bias_act as bias_act_module
from torch_utils.ops import dispatch
from torch_utils.ops.bias_act import activation_funcs, bias_act

ACTS = list(activation_funcs)
SHAPE = (2, 3, 1, 4)  # Tiny, with a different size in every dimension (including 1) so a wrong `dim` shows.

# ----------------------------------------------------------------------------
# Input helpers.


def make_inputs(dim=1, with_bias=True, shape=SHAPE, seed=0, dtype=torch.float64, device='cpu'):
    """x and b (or None), with every pre-activation value x + b at least 0.25 away from 0.

    That keeps finite differences off the kinks at 0 (relu, lrelu; the second derivative of elu and selu).
    """
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    pre = sign * (0.25 + torch.rand(shape, generator=gen, dtype=torch.float64))
    b = None
    if with_bias:
        b = torch.randn(shape[dim], generator=gen, dtype=torch.float64) * 0.5
        pre = pre - b.reshape([-1 if i == dim else 1 for i in range(len(shape))])
    x = pre.to(device=device, dtype=dtype)
    return x, (None if b is None else b.to(device=device, dtype=dtype))


def clamp_between(x, b, act, dim=1, alpha=None, gain=None):
    """A clamp value that clamps some outputs and leaves others, with the largest margin to every output.

    Midway in the widest gap between consecutive |outputs| in the middle half, so that finite differences
    (and half-precision rounding) never cross the clamp.
    """
    y = bias_act(x.double(), None if b is None else b.double(), dim=dim, act=act, alpha=alpha, gain=gain, impl='ref')
    mags = y.abs().flatten().sort().values
    n = mags.numel()
    lo, hi = n // 4, (3 * n) // 4
    gaps = mags[lo + 1:hi + 1] - mags[lo:hi]
    k = lo + int(gaps.argmax())
    return float(mags[k] + mags[k + 1]) / 2


# Argument variants: defaults; everything set without clamping; everything set with an active clamp.
VARIANTS = {
    'defaults': dict(),
    'alpha_gain': dict(alpha=0.3, gain=0.7),
    'alpha_gain_clamp': dict(alpha=0.1, gain=1.3, clamp='between'),
}


def resolve_variant(variant, x, b, act, dim):
    kwargs = dict(VARIANTS[variant])
    if kwargs.get('clamp') == 'between':
        kwargs['clamp'] = clamp_between(x, b, act, dim=dim, alpha=kwargs.get('alpha'), gain=kwargs.get('gain'))
    return kwargs

# ----------------------------------------------------------------------------
# Reference vectors.


@pytest.mark.parametrize('case', vectors.op_cases('bias_act'), ids=vectors.case_id)
def test_reference_vectors(case):
    out = bias_act(**vectors.case_inputs(case), **case['kwargs'])
    assert out.dtype == vectors.case_output(case).dtype
    torch.testing.assert_close(out, vectors.case_output(case), **vectors.tolerances(case))

# ----------------------------------------------------------------------------
# Closed forms.


def test_linear_with_unit_gain_is_x_plus_b():
    x, b = make_inputs(dim=1, dtype=torch.float32)
    assert torch.equal(bias_act(x, b), x + b.reshape(1, -1, 1, 1))
    assert bias_act(x) is x  # Identity: the reference returns x itself.


@pytest.mark.parametrize('act, expected', [
    ('relu',     lambda x: F.relu(x) * math.sqrt(2)),
    ('lrelu',    lambda x: F.leaky_relu(x, 0.2) * math.sqrt(2)),
    ('tanh',     torch.tanh),
    ('sigmoid',  torch.sigmoid),
    ('elu',      F.elu),
    ('selu',     F.selu),
    ('softplus', F.softplus),
    ('swish',    lambda x: F.silu(x) * math.sqrt(2)),
])
def test_defaults_match_torch_functional(act, expected):
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(bias_act(x, act=act), expected(x))


def test_alpha_gain_clamp_order():
    x = torch.linspace(-3, 3, 13).reshape(1, 13)
    b = torch.full([13], 0.5)
    # Bias, then activation with slope 0.1, then gain 2, then clamp to [-1, 1].
    expected = (F.leaky_relu(x + 0.5, 0.1) * 2).clamp(-1, 1)
    torch.testing.assert_close(bias_act(x, b, act='lrelu', alpha=0.1, gain=2, clamp=1), expected)


def test_elu_ignores_alpha():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(bias_act(x, act='elu', alpha=0.5), F.elu(x))


@pytest.mark.parametrize('act', ACTS)
def test_clamp_zero_gives_zeros(act):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)) * 2
    assert torch.equal(bias_act(x, act=act, clamp=0).abs(), torch.zeros_like(x))


def test_bias_runs_along_dim_and_layout_is_kept():
    x = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    for dim in range(4):
        b = torch.arange(x.shape[dim], dtype=torch.float32)
        y = bias_act(x, b, dim=dim)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, b.reshape([-1 if i == dim else 1 for i in range(4)]).expand(x.shape))

# ----------------------------------------------------------------------------
# Argument errors.


def test_unknown_activation_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown activation 'leaky'.*lrelu"):
        bias_act(torch.zeros(2, 3), act='leaky')


@pytest.mark.parametrize('b', [torch.zeros(4), torch.zeros(3, 1), torch.zeros(())], ids=['length', '2d', '0d'])
def test_bad_bias_shape_is_a_value_error(b):
    with pytest.raises(ValueError, match=r'b must be 1-D with x.shape\[1\] = 3 elements'):
        bias_act(torch.zeros(2, 3), b)


def test_bad_dim_impl_and_clamp_are_value_errors():
    with pytest.raises(ValueError, match='dim=2 is out of range'):
        bias_act(torch.zeros(2, 3), torch.zeros(3), dim=2)
    with pytest.raises(ValueError, match="impl must be 'ref' or 'cuda'"):
        bias_act(torch.zeros(2, 3), impl='triton')
    with pytest.raises(ValueError, match='clamp must be None or >= 0'):
        bias_act(torch.zeros(2, 3), clamp=-1)


def test_negative_dim_counts_from_the_end():
    x, b = make_inputs(dim=3, dtype=torch.float32)
    assert torch.equal(bias_act(x, b, dim=-1, act='lrelu'), bias_act(x, b, dim=3, act='lrelu'))

# ----------------------------------------------------------------------------
# activation_funcs and dispatch.


def test_activation_funcs_fields():
    assert ACTS == ['linear', 'relu', 'lrelu', 'tanh', 'sigmoid', 'elu', 'selu', 'softplus', 'swish']
    for index, (name, spec) in enumerate(activation_funcs.items(), start=1):
        assert set(spec) == {'func', 'def_alpha', 'def_gain', 'cuda_idx', 'ref', 'has_2nd_grad'}
        assert spec.cuda_idx == index
        assert spec.def_gain == (math.sqrt(2) if name in ('relu', 'lrelu', 'swish') else 1)
        assert spec.def_alpha == (0.2 if name == 'lrelu' else 0)
        assert spec.has_2nd_grad == (name not in ('linear', 'relu', 'lrelu'))
        # Must match bias_act_grad_uses_x() in bias_act.h.
        assert spec.ref == ('x' if name in ('softplus', 'swish') else 'y')
        x = torch.randn(5, generator=torch.Generator().manual_seed(index))
        torch.testing.assert_close(spec.func(x, alpha=spec.def_alpha) * spec.def_gain, bias_act(x, act=name))


def test_impl_cuda_on_cpu_silently_uses_the_reference():
    x, b = make_inputs(dtype=torch.float32)
    assert torch.equal(bias_act(x, b, act='swish', clamp=0.5), bias_act(x, b, act='swish', clamp=0.5, impl='ref'))
    with dispatch.use_impl('auto'):
        assert torch.equal(bias_act(x, b, act='tanh'), bias_act(x, b, act='tanh', impl='ref'))


def test_strict_cuda_policy_rejects_cpu_tensors():
    x, b = make_inputs(dtype=torch.float32)
    with dispatch.use_impl('cuda'):
        with pytest.raises(RuntimeError, match='policy is "cuda"'):
            bias_act(x, b, act='lrelu')
    with dispatch.use_impl('ref'):
        assert torch.equal(bias_act(x, b, act='lrelu'), bias_act(x, b, act='lrelu', impl='ref'))


def test_import_builds_nothing():
    # The plugin is only built when a CUDA tensor asks for it; checked in a fresh process, since other tests
    # in this one may have built it already.
    code = ('import torch_utils.ops.bias_act as m, torch_utils.custom_ops as c; '
            'assert m._plugin._module is None and m._plugin._error is None; '
            'assert not c._loaded_plugins and not c._failed_plugins')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))

# ----------------------------------------------------------------------------
# Reference derivatives, float64.


def _gradchecks(act, dim, with_bias, variant, impl='ref', device='cpu'):
    x, b = make_inputs(dim=dim, with_bias=with_bias, seed=dim, device=device)
    kwargs = resolve_variant(variant, x, b, act, dim)
    inputs = (x.requires_grad_(True),) + ((b.requires_grad_(True),) if with_bias else ())

    def fn(*args):
        return bias_act(*args, dim=dim, act=act, impl=impl, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# Bias None (where dim does not matter) or a bias along each of the four dimensions.
BIAS_DIMS = [(False, 1)] + [(True, dim) for dim in range(4)]


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('with_bias, dim', BIAS_DIMS, ids=['nobias'] + [f'dim{d}' for d in range(4)])
@pytest.mark.parametrize('act', ACTS)
def test_reference_gradcheck_and_gradgradcheck(act, with_bias, dim, variant):
    _gradchecks(act, dim, with_bias, variant)

# ----------------------------------------------------------------------------
# Kernel parity (shared by the GPU test and the host-compiled kernel test).

PARITY_SHAPE = (2, 5, 3, 4)


def _value_and_derivatives(x, b, dy, w, kwargs, impl):
    """y, the first derivatives (x, b) and the second-order derivatives (x, b, dy) of sum(w * dx) + sum(db)."""
    x = x.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    dy = dy.detach().clone().requires_grad_(True)
    y = bias_act(x, b, impl=impl, **kwargs)
    inputs = [x] if b is None else [x, b]
    first = torch.autograd.grad(y, inputs, dy, create_graph=True)
    objective = (first[0] * w).sum() + (first[1].sum() if b is not None else 0)
    second = torch.autograd.grad(objective, inputs + [dy], allow_unused=True)
    second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs + [dy], strict=True)]
    return [y, *first, *second]


def check_kernel_parity(act, dtype, layout, variant, device, with_bias=True):
    """Kernel path (impl='cuda') in `dtype` vs the reference in float64 on the same (rounded) values."""
    x, b = make_inputs(dim=1, with_bias=with_bias, shape=PARITY_SHAPE, seed=7, device=device)
    kwargs = dict(dim=1, act=act, **resolve_variant(variant, x, b, act, dim=1))
    gen = torch.Generator().manual_seed(8)
    dy = torch.randn(PARITY_SHAPE, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(PARITY_SHAPE, generator=gen, dtype=torch.float64).to(device)
    # Round everything to `dtype` first, so that both paths see the same values.
    x, dy, w = (with_layout(t.to(dtype), layout) for t in (x, dy, w))
    b = None if b is None else b.to(dtype)

    with dispatch.use_impl('cuda'):
        ours = _value_and_derivatives(x, b, dy, w, kwargs, impl='cuda')
    ref = _value_and_derivatives(*(None if t is None else t.double() for t in (x, b, dy, w)), kwargs, impl='ref')

    assert ours[0].dtype == dtype
    if layout != 'strided':
        assert ours[0].stride() == x.stride()  # The output keeps the memory layout of the input.
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
    names = ['y', 'dx', 'db', 'ddx', 'ddb', 'ddy'] if b is not None else ['y', 'dx', 'ddx', 'ddy']
    for name, a, r in zip(names, ours, ref, strict=True):
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol, msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.cuda
@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize('act', ACTS)
def test_cuda_kernel_matches_reference(act, dtype, layout, variant):
    check_kernel_parity(act, dtype, layout, variant, device='cuda')


@pytest.mark.cuda
@pytest.mark.parametrize('act', ACTS)
def test_cuda_kernel_gradcheck_float64(act):
    with dispatch.use_impl('cuda'):
        for with_bias, dim in BIAS_DIMS:
            _gradchecks(act, dim, with_bias, 'alpha_gain_clamp', impl='cuda', device='cuda')


# ----------------------------------------------------------------------------
# The kernel's element code compiled for the host, driving the kernel path's autograd Functions on CPU.

HARNESS_SOURCE = r'''
#include "bias_act.cu"

namespace {
// Runs the kernel body for every element in order, as the grid-stride loop would, with the same index type.
struct HostRunner {
    const BiasActParams& p;

    template <typename T, int A, int G>
    void run() const
    {
        using S = typename ComputeType<T>::type;
        const Constants<S> k = make_constants<T>(p);
        if (p.numel <= INT32_MAX) {
            for (uint32_t i = 0; i < static_cast<uint32_t>(p.numel); i++)
                bias_act_element<T, A, G, uint32_t>(p, k, i);
        } else {
            for (int64_t i = 0; i < p.numel; i++)
                bias_act_element<T, A, G, int64_t>(p, k, i);
        }
    }
};
}  // namespace

extern "C" int bias_act_host(const void* x, const void* b, const void* xref, const void* yref, const void* dy,
                             void* out, int64_t numel, int64_t dim_size, int64_t dim_stride, int act, int grad,
                             double alpha, double gain, double clamp, int dtype)
{
    const BiasActParams p{x, b, xref, yref, dy, out, numel, dim_size, dim_stride, act, grad, alpha, gain, clamp};
    HostRunner runner{p};
    return dispatch_all(static_cast<BiasActDtype>(dtype), act, grad, runner) ? 0 : 1;
}
'''


class HostPlugin:
    """Stands in for the compiled extension: the same `bias_act` call, with the argument handling of
    bias_act.cpp repeated in Python and the kernel's element code running on the CPU."""

    DTYPES = {torch.float16: 0, torch.float32: 1, torch.float64: 2}

    def __init__(self, lib):
        self.fn = lib.bias_act_host
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2 + \
                           [ctypes.c_double] * 3 + [ctypes.c_int]
        self.calls = []

    @staticmethod
    def _same_layout(a, b):
        return a.shape == b.shape and all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride(),
                                                                                    strict=True))

    def bias_act(self, x, b, xref, yref, dy, grad, dim, act, alpha, gain, clamp):
        self.calls.append(grad)
        from_x = next(spec.ref == 'x' for spec in activation_funcs.values() if spec.cuda_idx == act)
        if grad > 0:
            assert (xref is not None) if from_x else (yref is not None or (act == 1 and clamp < 0))
        for t in (b, xref, yref, dy):
            assert t is None or t.dtype == x.dtype
        for t in (xref, yref, dy):
            assert t is None or t.shape == x.shape

        def dense(t):
            return t if bias_act_module._is_dense(t) else t.contiguous()

        xref = None if xref is None else dense(xref)
        yref = None if yref is None else dense(yref)
        if xref is None and yref is None:
            x = dense(x)
        layout = xref if xref is not None else (yref if yref is not None else x)

        def like_layout(t):
            return t if self._same_layout(t, layout) else torch.empty_like(layout).copy_(t)

        x = like_layout(x)
        yref = None if yref is None else like_layout(yref)
        dy = None if dy is None else like_layout(dy)
        out = torch.empty_like(layout)
        dim_size = 1 if b is None else x.shape[dim]
        dim_stride = layout.stride(dim) if dim_size > 1 else 1
        b = None if b is None else b.contiguous()

        def ptr(t, used=True):
            return t.data_ptr() if (t is not None and used) else None

        rc = self.fn(ptr(x), ptr(b), ptr(xref, grad > 0 and from_x), ptr(yref, grad > 0 and not from_x),
                     ptr(dy, grad == 2), ptr(out), out.numel(), dim_size, dim_stride, act, grad,
                     alpha, gain, clamp, self.DTYPES[x.dtype])
        assert rc == 0
        return out


def build_host_plugin(directory) -> 'HostPlugin':
    """Compile the harness and the kernels of bias_act.cu for the host into `directory` and load them (the test
    skips without nvcc). Also used by test_ops_probe.py."""
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        pytest.skip('nvcc not found on PATH')
    source = directory / 'harness.cu'
    source.write_text(HARNESS_SOURCE)
    library = directory / 'libbias_act_host.so'
    ops_dir = os.path.dirname(bias_act_module.__file__)
    # PTX only for the device side: it has to compile, but only the host code is used here.
    command = [nvcc, '-shared', '-std=c++17', '-Xcompiler', '-fPIC', f'-I{ops_dir}',
               '-gencode', 'arch=compute_80,code=compute_80', str(source), '-o', str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return HostPlugin(ctypes.CDLL(str(library)))


@pytest.fixture(scope='module')
def host_plugin(tmp_path_factory):
    return build_host_plugin(tmp_path_factory.mktemp('bias_act_host'))


@pytest.fixture
def host_kernel(host_plugin, monkeypatch):
    """Make impl='cuda' run the kernel path on CPU tensors, through the host-compiled kernel code."""
    use_host_kernel(monkeypatch, bias_act_module, host_plugin, 'bias_act_plugin')
    host_plugin.calls.clear()
    return host_plugin


@pytest.mark.slow
@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize('act', ACTS)
def test_host_kernel_matches_reference(host_kernel, act, dtype, layout, variant):
    check_kernel_parity(act, dtype, layout, variant, device='cpu')
    assert set(host_kernel.calls) == ({0, 1, 2} if activation_funcs[act].has_2nd_grad else {0, 1})


@pytest.mark.slow
@pytest.mark.parametrize('act', ACTS)
def test_host_kernel_gradcheck_float64(host_kernel, act):
    for with_bias, dim in BIAS_DIMS:
        for variant in VARIANTS:
            _gradchecks(act, dim, with_bias, variant, impl='cuda')


@pytest.mark.slow
@pytest.mark.parametrize('act', ACTS)
def test_host_kernel_without_bias(host_kernel, act):
    check_kernel_parity(act, torch.float32, 'channels_last', 'alpha_gain_clamp', device='cpu', with_bias=False)


@pytest.mark.slow
@pytest.mark.parametrize('act', ACTS)
def test_host_kernel_clamp_zero(host_kernel, act):
    x, b = make_inputs(shape=PARITY_SHAPE, dtype=torch.float32)
    x.requires_grad_(True)
    y = bias_act(x, b, act=act, clamp=0)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y.abs(), torch.zeros_like(y)) and torch.equal(dx.abs(), torch.zeros_like(dx))


@pytest.mark.slow
@pytest.mark.parametrize('act', [act for act in ACTS if act not in ('tanh', 'sigmoid')])  # These stay below 181.
def test_host_kernel_half_precision_clamp_limit(host_kernel, act):
    # 256 * sqrt(0.5) is not a float16 number: clamped outputs hold the limit rounded down to 181.0 and must
    # still count as clamped, i.e. get no gradient.
    limit = 256 * math.sqrt(0.5)
    x = torch.linspace(-400, 400, 120).half().requires_grad_(True)
    y = bias_act(x, act=act, gain=1, clamp=limit)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    clamped = bias_act(x.detach().double(), act=act, gain=1, impl='ref').abs() > limit
    assert clamped.any() and (dx[clamped] == 0).all() and (dx[~clamped & (x.detach() > 0)] != 0).all()


@pytest.mark.slow
def test_host_kernel_third_derivative_is_an_error(host_kernel):
    # The f'' term of the second derivative is not differentiable again: asking for a third derivative is an
    # error, not a silently wrong number.
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(bias_act(x, act='tanh').sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='first and second derivatives only'):
        torch.autograd.grad(ddx.sum(), x)


@pytest.mark.slow
def test_host_kernel_expanded_upstream_gradient(host_kernel):
    # y.sum().backward() hands the backward pass an expanded (stride 0) gradient, which is not dense.
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias_act(x, b, act='swish', clamp=0.5).sum().backward()
    x_ref, b_ref = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    bias_act(x_ref, b_ref, act='swish', clamp=0.5, impl='ref').sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)
