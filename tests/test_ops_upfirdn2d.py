"""torch_utils.ops.upfirdn2d: reference vectors, an independent formulation, identities, derivatives, dispatch.

The kernel path is checked three ways: on a GPU (`cuda` marker) against the reference; on any Linux machine
with a C++ compiler by compiling upfirdn2d.cu for the host with a small CUDA emulation (a block's threads as
coroutines, __syncthreads as a switch back to the emulator) and running the kernel path's autograd functions
on CPU through it (`slow` marker); and, everywhere, by the compile checks in test_kernel_sources.py.
"""

import ctypes
import os
import random
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import vectors
from host_kernels import LAYOUTS, use_host_kernel, with_layout

from torch_utils.ops import dispatch
from torch_utils.ops import upfirdn2d as upfirdn2d_module
from torch_utils.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

OPS = dict(upfirdn2d=upfirdn2d, upsample2d=upsample2d, downsample2d=downsample2d, filter2d=filter2d)

# ----------------------------------------------------------------------------
# Reference vectors.


@pytest.mark.parametrize('case', vectors.op_cases('setup_filter'), ids=vectors.case_id)
def test_setup_filter_vectors(case):
    out = setup_filter(**case['kwargs'])
    expected = vectors.case_output(case)
    assert out.dtype == torch.float32 and out.device.type == 'cpu'
    assert torch.equal(out, expected), f'{out} != {expected}'


@pytest.mark.parametrize('case', [case for op in OPS for case in vectors.op_cases(op)], ids=vectors.case_id)
def test_op_vectors(case):
    out = OPS[case['op']](**vectors.case_inputs(case), **case['kwargs'])
    expected = vectors.case_output(case)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **vectors.tolerances(case))

# ----------------------------------------------------------------------------
# setup_filter details the vectors do not pin down.


def test_setup_filter_leaves_its_input_alone_and_honours_device():
    f = torch.tensor([1.0, 2.0, 1.0])
    out = setup_filter(f, device=torch.device('meta'), flip_filter=True, gain=4)
    assert torch.equal(f, torch.tensor([1.0, 2.0, 1.0]))
    assert out.device.type == 'meta' and out.shape == (3, 3)


def test_setup_filter_separable_choice():
    assert setup_filter([1] * 7).shape == (7, 7)
    assert setup_filter([1] * 8).shape == (8,)
    assert setup_filter([1] * 7, separable=True).shape == (7,)
    assert setup_filter(np.ones(3)).shape == (3, 3)

# ----------------------------------------------------------------------------
# An independent formulation: explicit zero insertion, F.pad (negative pads crop), conv2d with the flipped
# filter, slicing. A separable filter becomes its 2-D outer product (sqrt(gain) squared = gain).


def explicit_upfirdn2d(x, f, up, down, padding, flip_filter, gain):
    upx, upy = (up, up) if isinstance(up, int) else up
    downx, downy = (down, down) if isinstance(down, int) else down
    if isinstance(padding, int):
        padding = [padding] * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    n, c, h, w = x.shape
    f = torch.ones(1, 1) if f is None else f
    f2 = torch.outer(f, f) if f.ndim == 1 else f
    f2 = f2.to(x.dtype) * gain
    u = x.new_zeros(n, c, h * upy, w * upx)
    u[:, :, ::upy, ::upx] = x
    u = F.pad(u, list(padding))
    kernel = f2 if flip_filter else f2.flip([0, 1])
    z = F.conv2d(u, kernel.expand(c, 1, *kernel.shape), groups=c)
    return z[:, :, ::downy, ::downx]


def random_arguments(rng):
    """Arguments covering the whole space: per-axis factors 1-4, negative padding, 1-D and 2-D filters."""
    while True:
        up = [rng.randint(1, 4), rng.randint(1, 4)] if rng.random() < 0.5 else rng.randint(1, 3)
        down = [rng.randint(1, 4), rng.randint(1, 4)] if rng.random() < 0.5 else rng.randint(1, 3)
        kind = rng.choice(['1d', '2d', '2d', 'none'])
        if kind == '1d':
            f = torch.randn(rng.randint(1, 9), dtype=torch.float64)
        elif kind == '2d':
            f = torch.randn(rng.randint(1, 5), rng.randint(1, 5), dtype=torch.float64)
        else:
            f = None
        padding = rng.choice([rng.randint(-1, 3), [rng.randint(-2, 3), rng.randint(-2, 3)],
                              [rng.randint(-3, 4) for _ in range(4)]])
        kwargs = dict(up=up, down=down, padding=padding, flip_filter=rng.random() < 0.5,
                      gain=rng.choice([1, 0.5, 4.0]))
        shape = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 9))
        try:
            out_shape = expected_shape(shape, f, **kwargs)
        except ValueError:
            continue  # The filter does not fit; draw again.
        return shape, f, kwargs, out_shape


def expected_shape(shape, f, up=1, down=1, padding=0, **_):
    upx, upy = upfirdn2d_module._parse_scaling(up)
    downx, downy = upfirdn2d_module._parse_scaling(down)
    px0, px1, py0, py1 = upfirdn2d_module._parse_padding(padding)
    fw, fh = upfirdn2d_module._get_filter_size(f)
    padded_w, padded_h = shape[3] * upx + px0 + px1, shape[2] * upy + py0 + py1
    if padded_w < fw or padded_h < fh:
        raise ValueError('filter does not fit')
    return (shape[0], shape[1], (padded_h - fh) // downy + 1, (padded_w - fw) // downx + 1)


@pytest.mark.parametrize('seed', range(60))
def test_matches_explicit_formulation_and_shape_formula(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shape, f, kwargs, out_shape = random_arguments(rng)
    x = torch.randn(shape, dtype=torch.float64)
    out = upfirdn2d(x, f, **kwargs)
    assert out.shape == out_shape
    torch.testing.assert_close(out, explicit_upfirdn2d(x, f, **kwargs), atol=1e-12, rtol=1e-12)

# ----------------------------------------------------------------------------
# Identities.


def test_unit_filter_is_the_identity():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(upfirdn2d(x, torch.tensor([1.0])), x)
    assert torch.equal(upfirdn2d(x, torch.ones(1, 1)), x)
    assert torch.equal(upfirdn2d(x, None), x)
    assert torch.equal(filter2d(x, setup_filter(None)), x)


def test_padding_and_cropping_with_unit_filter():
    x = torch.randn(1, 2, 6, 7)
    out = upfirdn2d(x, None, padding=[2, -1, -3, 1])
    assert torch.equal(out, F.pad(x, [2, -1, -3, 1]))


def test_upsample_then_box_downsample_of_a_constant_is_constant():
    x = torch.full((2, 3, 6, 5), 0.75, dtype=torch.float64)
    box = setup_filter([1, 1])
    # Without a filter, zero insertion and the upsample gain put 4 * 0.75 at one corner of every 2x2 cell;
    # the 2x2 box average gives the constant back exactly.
    up = upsample2d(x, None)
    assert up.shape == (2, 3, 12, 10)
    torch.testing.assert_close(downsample2d(up, box), x, atol=0, rtol=0)
    # With the usual [1,3,3,1] filter the upsampled image is constant away from the zero-padded border.
    up = upsample2d(x, setup_filter([1, 3, 3, 1]))
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 0.75))
    down = downsample2d(up, box)
    torch.testing.assert_close(down[:, :, 1:-1, 1:-1], x[:, :, 1:-1, 1:-1])


@pytest.mark.parametrize('taps', [1, 2, 3, 4, 5, 8, 12])
@pytest.mark.parametrize('factor', [1, 2, 3])
def test_wrapper_output_sizes(taps, factor):
    x = torch.randn(1, 2, 12, 18)
    f = setup_filter([1] * taps)
    assert filter2d(x, f).shape == x.shape
    assert upsample2d(x, f, up=factor).shape == (1, 2, 12 * factor, 18 * factor)
    assert downsample2d(x, f, down=factor).shape == (1, 2, 12 // factor, 18 // factor)
    assert upsample2d(x, f, up=[factor, 1]).shape == (1, 2, 12, 18 * factor)


def test_filter2d_of_constant_is_constant_inside():
    x = torch.ones(1, 1, 9, 9, dtype=torch.float64)
    for taps in ([1, 2, 1], [1, 3, 3, 1], [1, 4, 6, 4, 1]):
        out = filter2d(x, setup_filter(taps), gain=2)
        torch.testing.assert_close(out[:, :, 3:-3, 3:-3], torch.full((1, 1, 3, 3), 2.0, dtype=torch.float64))


def test_separable_equals_outer_product():
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    f = torch.tensor([1.0, 4.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    for kwargs in (dict(up=2, padding=[3, 2, 1, 2], gain=4), dict(down=[2, 3], padding=2, flip_filter=True)):
        torch.testing.assert_close(upfirdn2d(x, f, **kwargs), upfirdn2d(x, torch.outer(f, f), **kwargs))


def test_layout_and_dtype_are_kept():
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    out = upsample2d(x, setup_filter([1, 3, 3, 1]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, upsample2d(x.contiguous(), setup_filter([1, 3, 3, 1])))
    assert upsample2d(x.double(), setup_filter([1, 3, 3, 1])).dtype == torch.float64

# ----------------------------------------------------------------------------
# Derivatives of the reference path, float64.

GRAD_CASES = {
    'plain_2d': dict(f='2d'),
    'up2': dict(f='2d', up=2, padding=[2, 1, 1, 2]),
    'down2': dict(f='2d', down=2, padding=1),
    'up3_down2': dict(f='2d', up=3, down=2, padding=[-1, 1, 2, -1], gain=2.5),
    'per_axis': dict(f='2d', up=[2, 1], down=[1, 3], padding=[1, 2, 3, 0], flip_filter=True),
    'up4': dict(f='1d', up=4, padding=[3, 0, 1, 2]),
    'down4': dict(f='1d', down=4, padding=[2, 1, 3, 3], gain=0.5),
    'crop': dict(f='2d', padding=[-1, 2, 3, -2]),
    'sep_up2_flip': dict(f='1d', up=2, padding=[2, 1, 2, 1], gain=4, flip_filter=True),
    'sep_down2': dict(f='1d', down=[2, 2], padding=[1, 2, 0, 1]),
    'none_up_down': dict(f=None, up=2, down=3, padding=1, gain=3.0),
    'list2_padding': dict(f='2d', up=[1, 2], padding=[1, 2]),
}


def _grad_case(name):
    kwargs = dict(GRAD_CASES[name])
    gen = torch.Generator().manual_seed(sorted(GRAD_CASES).index(name))
    kind = kwargs.pop('f')
    # Non-symmetric filters, so that a filter applied the wrong way round shows.
    f = {'2d': lambda: torch.randn(3, 2, generator=gen, dtype=torch.float64),
         '1d': lambda: torch.randn(4, generator=gen, dtype=torch.float64),
         None: lambda: None}[kind]()
    x = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64)
    return x, f, kwargs


@pytest.mark.parametrize('name', list(GRAD_CASES))
def test_reference_gradcheck_and_gradgradcheck(name):
    x, f, kwargs = _grad_case(name)

    def fn(x):
        return upfirdn2d(x, f, impl='ref', **kwargs)

    x.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize('name', ['up2', 'sep_down2', 'per_axis'])
def test_reference_gradcheck_with_respect_to_the_filter(name):
    x, f, kwargs = _grad_case(name)

    def fn(x, f):
        return upfirdn2d(x, f, impl='ref', **kwargs)

    inputs = (x.requires_grad_(True), f.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize('op', ['upsample2d', 'downsample2d', 'filter2d'])
def test_wrapper_gradcheck(op):
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    f = setup_filter([1, 2, 5, 3]).double()
    kwargs = dict(padding=[1, 0, -1, 2], flip_filter=True, gain=2.0)
    if op != 'filter2d':
        kwargs['up' if op == 'upsample2d' else 'down'] = [2, 3]

    def fn(x):
        return OPS[op](x, f, impl='ref', **kwargs)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))

# ----------------------------------------------------------------------------
# Argument errors.


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(x=torch.zeros(3, 4, 4)), ValueError, 'batch, channels, height, width'),
    (dict(up=0), ValueError, '>= 1'),
    (dict(down=[1, -1]), ValueError, '>= 1'),
    (dict(up=[1, 2, 3]), ValueError, r'\[x, y\]'),
    (dict(up=1.5), TypeError, 'integer'),
    (dict(f=torch.zeros(2, 2, 2)), ValueError, '1-D or 2-D'),
    (dict(f=[1, 3, 3, 1]), ValueError, '1-D or 2-D'),
    (dict(padding=[1, 2, 3]), ValueError, 'Padding must be'),
    (dict(padding=[1, 2.5]), TypeError, 'integer'),
    (dict(impl='triton'), ValueError, "impl must be 'ref' or 'cuda'"),
    (dict(f=torch.ones(7, 7), padding=-1), ValueError, 'shorter than the filter'),
], ids=['x_3d', 'up_0', 'down_negative', 'up_3_list', 'up_float', 'f_3d', 'f_list', 'padding_3', 'padding_float',
        'impl', 'filter_too_big'])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=torch.zeros(1, 1, 4, 4), f=torch.ones(2, 2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        upfirdn2d(**args)


def test_bad_filters_for_setup_filter():
    with pytest.raises(ValueError, match='scalar, 1-D or 2-D'):
        setup_filter(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match='at least one tap'):
        setup_filter([])
    with pytest.raises(ValueError, match='cannot be made separable'):
        setup_filter([[1, 2], [3, 4]], separable=True)
    with pytest.raises(ValueError, match='>= 1'):
        upsample2d(torch.zeros(1, 1, 4, 4), None, up=0)

# ----------------------------------------------------------------------------
# Dispatch.


def test_impl_cuda_on_cpu_silently_uses_the_reference():
    x = torch.randn(2, 3, 6, 7)
    f = setup_filter([1, 3, 3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert torch.equal(upsample2d(x, f), upsample2d(x, f, impl='ref'))
        with dispatch.use_impl('auto'):
            assert torch.equal(upfirdn2d(x, f, down=2), upfirdn2d(x, f, down=2, impl='ref'))


def test_strict_cuda_policy_rejects_cpu_tensors():
    x = torch.randn(2, 3, 6, 7)
    with dispatch.use_impl('cuda'):
        with pytest.raises(RuntimeError, match='policy is "cuda"'):
            upfirdn2d(x, setup_filter([1, 3, 3, 1]))
    with dispatch.use_impl('ref'):
        assert torch.equal(filter2d(x, setup_filter([1, 2, 1])), filter2d(x, setup_filter([1, 2, 1]), impl='ref'))


def test_import_builds_nothing():
    # Checked in a fresh process, since other tests in this one may have asked for the plugin.
    code = ('import torch_utils.ops.upfirdn2d as m, torch_utils.custom_ops as c; '
            'assert m._plugin._module is None and m._plugin._error is None; '
            'assert not c._loaded_plugins and not c._failed_plugins')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))

# ----------------------------------------------------------------------------
# Kernel parity (shared by the GPU test and the host-compiled kernel test).

# StyleGAN2's uses first (skip-image upsample, the blur around strided and transposed convolutions, the
# separable 12-tap augmentation filters), then odd cases that only the general kernel handles.
PARITY_CASES = {
    'up2_std': dict(f=[1, 3, 3, 1], up=2, padding=[2, 1, 2, 1], gain=4),
    'down2_std': dict(f=[1, 3, 3, 1], down=2, padding=1),
    'filter_std_gain4': dict(f=[1, 3, 3, 1], padding=[2, 1, 2, 1], gain=4),
    'down2_std_1x1conv': dict(f=[1, 3, 3, 1], down=2, padding=[1, 1, 1, 1], flip_filter=True),
    'sep12_up2': dict(f='sep12', up=2, padding=[6, 5, 6, 5], gain=4),
    'sep12_down2': dict(f='sep12', down=2, padding=[5, 5, 5, 5]),
    'f2d_per_axis': dict(f='f2d', up=[2, 1], down=[1, 2], padding=[1, 2, 1, 0], flip_filter=True, gain=1.5),
    'f2d_up3_down2_crop': dict(f='f2d', up=3, down=2, padding=[-1, 1, 2, -1], gain=2.5),
    'none_up2_down3': dict(f=None, up=2, down=3, padding=1, gain=3.0),
    'big_filter_17x3': dict(f='big', up=2, padding=[1, 1, 8, 8]),
}


def _parity_filter(spec, device):
    gen = torch.Generator().manual_seed(11)
    if spec is None:
        return None
    if isinstance(spec, list):
        return setup_filter(spec, device=device)
    if spec == 'sep12':
        return setup_filter(torch.rand(12, generator=gen) + 0.1, device=device)
    if spec == 'f2d':
        return torch.randn(3, 4, generator=gen).to(device)
    return torch.randn(17, 3, generator=gen).to(device)


def _value_and_derivatives(x, f, dy, v, kwargs, impl):
    """y; dx = J^T dy; and the derivative of sum(dx * v) with respect to dy, i.e. J v (backward of backward)."""
    x = x.detach().clone().requires_grad_(True)
    dy = dy.detach().clone().requires_grad_(True)
    y = upfirdn2d(x, f, impl=impl, **kwargs)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    (ddy,) = torch.autograd.grad((dx * v).sum(), dy)
    return y.detach(), dx.detach(), ddy


def check_kernel_parity(name, dtype, layout, device, shape):
    """Kernel path (impl='cuda') in `dtype` vs the reference in float64 on the same (rounded) values."""
    kwargs = dict(PARITY_CASES[name])
    f = _parity_filter(kwargs.pop('f'), device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    out_shape = expected_shape(shape, f, **kwargs)
    dy = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    x, dy, v = (with_layout(t.to(device=device, dtype=dtype), layout) for t in (x, dy, v))

    with dispatch.use_impl('cuda'):
        ours = _value_and_derivatives(x, f, dy, v, kwargs, impl='cuda')
    ref = _value_and_derivatives(x.double(), None if f is None else f.double(), dy.double(), v.double(), kwargs,
                                 impl='ref')

    assert ours[0].dtype == dtype and ours[0].shape == out_shape
    if layout == 'channels_last':
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for what, a, r in zip(['y', 'dx', 'ddy'], ours, ref, strict=True):
        # Relative to the largest magnitude: fp16 rounds the intermediate of a separable filter too.
        scale = float(r.abs().max()) + 1
        tol = 2e-5 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(a.double(), r, atol=tol * scale, rtol=tol, msg=lambda m, w=what: f'{w}: {m}')


class VariantPlugin:
    """Stands in for the LazyPlugin and makes every launch use one kernel variant (0 auto, 1 general)."""

    def __init__(self, module, variant):
        self.module = module
        self.variant = variant
        self.module_name = 'upfirdn2d_plugin'

    def get(self):
        return self

    def available(self):
        return True

    def upfirdn2d(self, *args):
        return self.module.upfirdn2d(*args[:-1], self.variant)


@pytest.mark.cuda
@pytest.mark.parametrize('variant', [0, 1], ids=['auto', 'general'])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize('name', list(PARITY_CASES))
def test_cuda_kernel_matches_reference(name, dtype, layout, variant, monkeypatch):
    module = upfirdn2d_module._plugin.get()
    monkeypatch.setattr(upfirdn2d_module, '_plugin', VariantPlugin(module, variant))
    # 16 channels and images large enough for the tiled kernel (planar and channel-group tiles).
    check_kernel_parity(name, dtype, layout, device='cuda', shape=(2, 16, 37, 45))


@pytest.mark.cuda
def test_cuda_float64_and_filter_gradients_use_the_reference():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device='cuda', requires_grad=True)
    f = setup_filter([1, 2, 5, 3], device='cuda')
    assert torch.autograd.gradcheck(lambda x: upsample2d(x, f), (x,))
    assert torch.autograd.gradgradcheck(lambda x: upsample2d(x, f), (x,))
    with pytest.raises(ValueError, match='filter'):
        upsample2d(x.float(), f.clone().requires_grad_(True))

# ----------------------------------------------------------------------------
# The kernels compiled for the host, driving the kernel path's autograd functions on CPU.

# Just enough of the CUDA runtime for upfirdn2d.cu. The threads of a block are coroutines (ucontext) on the
# calling OS thread: the emulator resumes each in turn until it reaches __syncthreads() or returns, which
# keeps every thread of the block at the same barrier, and runs the blocks one after another. __shared__
# arrays become function statics, shared by the threads of the one block running at a time.
EMULATION_HEADER = r'''
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct dim3
{
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef void* cudaStream_t;
typedef int cudaError_t;
const cudaError_t cudaSuccess = 0;
const cudaError_t cudaErrorInvalidConfiguration = 9;

struct EmulatedThread
{
    ucontext_t context;
    std::vector<char> stack;
    bool done;
};

static dim3 threadIdx, blockIdx, blockDim, gridDim;
static ucontext_t emulator_context;
static EmulatedThread* running_thread = nullptr;
static void (*block_body)(void*) = nullptr;
static void* block_body_arg = nullptr;
static cudaError_t last_error = cudaSuccess;

inline void __syncthreads() { swapcontext(&running_thread->context, &emulator_context); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline cudaError_t cudaGetLastError() { const cudaError_t e = last_error; last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "invalid configuration" : "no error"; }

inline void emulated_thread_entry()
{
    block_body(block_body_arg);
    running_thread->done = true;  // Then back to emulator_context through uc_link.
}

template <typename Body>
void emulated_grid(dim3 grid, dim3 block, Body body)
{
    const unsigned threads = block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads > 1024)
    {
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    block_body = [](void* arg) { (*static_cast<Body*>(arg))(); };
    block_body_arg = &body;
    gridDim = grid;
    blockDim = block;
    std::vector<EmulatedThread> pool(threads);
    for (EmulatedThread& thread : pool)
        thread.stack.resize(1 << 16);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx)
            {
                blockIdx = dim3(bx, by, bz);
                for (EmulatedThread& thread : pool)
                {
                    getcontext(&thread.context);
                    thread.context.uc_stack.ss_sp = thread.stack.data();
                    thread.context.uc_stack.ss_size = thread.stack.size();
                    thread.context.uc_link = &emulator_context;
                    makecontext(&thread.context, emulated_thread_entry, 0);
                    thread.done = false;
                }
                for (bool live = true; live;)
                {
                    live = false;
                    for (unsigned t = 0; t < threads; ++t)
                    {
                        if (pool[t].done)
                            continue;
                        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        running_thread = &pool[t];
                        swapcontext(&emulator_context, &pool[t].context);
                        live = live || !pool[t].done;
                    }
                }
            }
}

template <typename... KernelArgs, typename... Args>
void emulated_launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, Args... args)
{
    emulated_grid(grid, block, [&]() { kernel(args...); });
}
'''

EMULATION_FP16 = r'''
#pragma once
struct __half { _Float16 value; };
inline float __half2float(__half h) { return (float)h.value; }
inline __half __float2half_rn(float f) { __half h; h.value = (_Float16)f; return h; }
'''

HARNESS_SOURCE = r'''
extern "C" int upfirdn2d_host(const void* x, const float* f, void* y, const int64_t* x_stride,
                              const int64_t* y_stride, const int* sizes, float gain, int half, int variant,
                              int* used_tiled)
{
    Upfirdn2dParams p;
    p.x = x;
    p.f = f;
    p.y = y;
    for (int d = 0; d < 4; ++d)
    {
        p.x_stride[d] = x_stride[d];
        p.y_stride[d] = y_stride[d];
    }
    int* fields[] = {&p.n, &p.c, &p.in_h, &p.in_w, &p.out_h, &p.out_w, &p.up_x, &p.up_y, &p.down_x, &p.down_y,
                     &p.pad_x0, &p.pad_y0, &p.filter_w, &p.filter_h, &p.flip_filter};
    for (int i = 0; i < 15; ++i)
        *fields[i] = sizes[i];
    p.gain = gain;
    *used_tiled = (variant == UPFIRDN2D_AUTO && upfirdn2d_tiled_supports(p) && tiled_worth_it(p))
                  ? (channels_innermost(p) ? 2 : 1) : 0;
    return half ? upfirdn2d_launch_half(p, variant, nullptr) : upfirdn2d_launch_float(p, variant, nullptr);
}
'''


def _host_kernel_source():
    """upfirdn2d.cu with its two `<<<...>>>` launches turned into emulated_launch calls, plus the harness."""
    with open(os.path.join(os.path.dirname(upfirdn2d_module.__file__), 'upfirdn2d.cu')) as file:
        source = file.read()
    launch = re.compile(r'([\w:]+(?:<[^;]*?>)?)<<<(.+?),\s*(\w+),\s*0,\s*stream>>>\((.*?)\);')
    source, count = launch.subn(lambda m: f'emulated_launch({m[1]}, dim3({m[2]}), dim3({m[3]}), {m[4]});', source)
    assert count == 2, f'expected the two kernel launches of upfirdn2d.cu, found {count}: update this harness'
    return source + HARNESS_SOURCE


class HostPlugin:
    """Stands in for the compiled extension: the argument handling of upfirdn2d.cpp repeated in Python, the
    kernels of upfirdn2d.cu running on the CPU."""

    def __init__(self, lib):
        self.fn = lib.upfirdn2d_host
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.variant = 0
        self.kernels_used = set()

    def upfirdn2d(self, x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1, flip_filter, gain,
                  variant):
        assert x.device.type == 'cpu' and x.ndim == 4 and x.dtype in (torch.float32, torch.float16)
        assert f.dtype == torch.float32 and f.ndim == 2
        variant = self.variant  # The tests choose the variant, whatever the op asks for.
        fh, fw = f.shape
        out_w = (x.shape[3] * up_x + pad_x0 + pad_x1 - fw) // down_x + 1
        out_h = (x.shape[2] * up_y + pad_y0 + pad_y1 - fh) // down_y + 1
        assert out_w >= 1 and out_h >= 1
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        y = torch.empty(x.shape[0], x.shape[1], out_h, out_w, dtype=x.dtype,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        f = f.contiguous()
        x_stride = (ctypes.c_int64 * 4)(*x.stride())
        y_stride = (ctypes.c_int64 * 4)(*y.stride())
        sizes = (ctypes.c_int * 15)(*x.shape, out_h, out_w, up_x, up_y, down_x, down_y, pad_x0, pad_y0, fw, fh,
                                    int(flip_filter))
        used_tiled = ctypes.c_int(-1)
        rc = self.fn(x.data_ptr(), f.data_ptr(), y.data_ptr(), ctypes.addressof(x_stride),
                     ctypes.addressof(y_stride), ctypes.addressof(sizes), gain, int(x.dtype == torch.float16),
                     variant, ctypes.addressof(used_tiled))
        assert rc == 0, f'launch failed with error {rc}'
        self.kernels_used.add(('general', 'tiled_planar', 'tiled_channel_groups')[used_tiled.value])
        return y


def build_host_plugin(directory, defines=()) -> 'HostPlugin':
    """Compile upfirdn2d.cu's kernels with the CUDA emulation for the host into `directory` and load them (the
    test skips without a C++ compiler on Linux). `defines` are extra -D flags. Also used by test_ops_probe.py."""
    cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
    if cxx is None:
        pytest.skip('no C++ compiler on PATH')
    if not sys.platform.startswith('linux'):
        pytest.skip('the CUDA emulation uses ucontext coroutines (Linux)')
    (directory / 'cuda_runtime.h').write_text(EMULATION_HEADER)
    (directory / 'cuda_fp16.h').write_text(EMULATION_FP16)
    source = directory / 'harness.cpp'
    source.write_text(_host_kernel_source())
    library = directory / 'libupfirdn2d_host.so'
    ops_dir = os.path.dirname(upfirdn2d_module.__file__)
    command = [cxx, '-shared', '-fPIC', '-O2', '-std=c++17', f'-I{directory}', f'-I{ops_dir}', *defines,
               str(source), '-o', str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return HostPlugin(ctypes.CDLL(str(library)))


@pytest.fixture(scope='module')
def host_plugin(tmp_path_factory):
    # Tiny grid limits, so that blocks loop over several channel groups / grid strides even here.
    return build_host_plugin(tmp_path_factory.mktemp('upfirdn2d_host'),
                             defines=('-DUPFIRDN2D_MAX_GRID_Z=2', '-DUPFIRDN2D_MAX_GENERAL_BLOCKS=3'))


@pytest.fixture
def host_kernel(host_plugin, monkeypatch):
    """Make impl='cuda' run the kernel path on CPU tensors, through the host-compiled kernels."""
    use_host_kernel(monkeypatch, upfirdn2d_module, host_plugin, 'upfirdn2d_plugin')
    host_plugin.variant = 0
    return host_plugin


@pytest.mark.slow
@pytest.mark.parametrize('variant', [0, 1], ids=['auto', 'general'])
@pytest.mark.parametrize('name', list(PARITY_CASES))
def test_host_kernel_matches_reference(host_kernel, name, variant):
    host_kernel.variant = variant
    # 12 channels (a full and a partial channel group) and about 16x16 outputs or more, enough for both tiled
    # kernels to be chosen.
    for dtype, layout in [(torch.float32, 'contiguous'), (torch.float32, 'channels_last'),
                          (torch.float16, 'strided'), (torch.float16, 'channels_last')]:
        check_kernel_parity(name, dtype, layout, device='cpu', shape=(1, 12, 34, 33))


@pytest.mark.slow
def test_host_kernel_covers_every_kernel(host_kernel):
    x = torch.randn(1, 8, 34, 33)
    f = setup_filter([1, 3, 3, 1])
    host_kernel.kernels_used.clear()
    upsample2d(x, f, impl='cuda')
    upsample2d(x.contiguous(memory_format=torch.channels_last), f, impl='cuda')
    upfirdn2d(x, f, up=3, impl='cuda')
    assert host_kernel.kernels_used == {'general', 'tiled_planar', 'tiled_channel_groups'}


@pytest.mark.slow
def test_host_kernel_small_and_degenerate_shapes(host_kernel):
    # 1x1 images, a 1-tap filter that only ever sees inserted zeros in some outputs, an empty batch.
    rng = random.Random(5)
    for _ in range(12):
        shape, f, kwargs, out_shape = random_arguments(rng)
        x = torch.randn(shape)
        f = None if f is None else f.float()
        for variant in (0, 1):
            host_kernel.variant = variant
            out = upfirdn2d(x, f, impl='cuda', **kwargs)
            assert out.shape == out_shape
            torch.testing.assert_close(out, upfirdn2d(x, f, impl='ref', **kwargs), atol=1e-5, rtol=1e-5)
    assert upfirdn2d(torch.zeros(0, 3, 4, 4), None, up=2, impl='cuda').shape == (0, 3, 8, 8)


@pytest.mark.slow
def test_host_kernel_refuses_filter_gradients(host_kernel):
    with pytest.raises(ValueError, match='filter'):
        upfirdn2d(torch.randn(1, 1, 4, 4), torch.ones(2, 2, requires_grad=True), impl='cuda')
