"""2-D FIR resampling: upsample by zero insertion, pad, filter, downsample (`upfirdn2d`).

This one primitive covers every resampling step of StyleGAN2: the blurred 2x upsampling of the skip image,
the low-pass filter after a transposed convolution, and the blur before a strided convolution. Per axis,
for an input signal `x` of length `in`, the op computes

    u[j] = x[j / up]   if j is a multiple of up, else 0          (zero insertion, length in * up)
    p[m] = u[m - pad0] (0 outside u; negative padding crops)      (length in * up + pad0 + pad1)
    z[m] = sum_k p[m + k] * f[fsize - 1 - k]                      (convolution; correlation if flip_filter)
    y[o] = gain * z[o * down]                                     (keep every down-th sample from 0)

so `out = (in * up + pad0 + pad1 - fsize) // down + 1`. A 2-D filter `[fh, fw]` is applied as one 2-D
convolution; a 1-D filter `[taps]` is separable and is applied along x and then along y, each pass with
`sqrt(gain)`. `setup_filter` prepares filters the way the callers expect (see its docstring).

Two paths compute it. The reference is plain PyTorch (zero insertion by reshape and pad, depthwise
`conv2d`), works for any floating dtype and any device, and is what `impl='ref'` asks for. The kernel
(`upfirdn2d.cu`) runs for float16/float32 CUDA tensors when the op policy allows it (see `dispatch.py`); its
autograd function differentiates to another upfirdn2d, so derivatives of every order use the kernel too.
The names and signatures of the public functions are frozen: official snapshots call them.
"""

import math
import operator
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import dispatch
from .probe import ProbeCase, probe_op

# The lambda looks `probe_kernel` up when the probe runs, so it may be defined further down.
_plugin = dispatch.LazyPlugin('upfirdn2d_plugin', sources=['upfirdn2d.cpp', 'upfirdn2d.cu'],
                              headers=['upfirdn2d.h'], source_dir=os.path.dirname(__file__),
                              extra_cuda_cflags=['--use_fast_math'], probe=lambda device: probe_kernel(device))

# The kernel reads and writes these element types (it accumulates in float32); any other dtype, float64
# in particular, takes the reference path even on a CUDA device.
_KERNEL_DTYPES = (torch.float16, torch.float32)

_CPU = torch.device('cpu')  # setup_filter's default device (a module constant: ruff B008).

Scaling = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int]]

# ----------------------------------------------------------------------------
# Argument parsing, shared with conv2d_resample.


def _as_int(value, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f'{what} must be an integer, got {value!r}') from None


def _parse_scaling(scaling: Scaling) -> Tuple[int, int]:
    """`up` / `down` as (sx, sy): an int applies to both axes, a 2-list is [x, y]. Each factor is >= 1."""
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != 2:
            raise ValueError(f'A scaling factor list must be [x, y], got {scaling!r}')
        sx, sy = (_as_int(s, 'A scaling factor') for s in scaling)
    else:
        sx = sy = _as_int(scaling, 'A scaling factor')
    if sx < 1 or sy < 1:
        raise ValueError(f'Scaling factors must be >= 1, got {scaling!r}')
    return sx, sy


def _parse_padding(padding: Padding) -> Tuple[int, int, int, int]:
    """Padding as (px0, px1, py0, py1): an int pads all sides, a 2-list is [x, y], a 4-list [x0, x1, y0, y1].

    Negative values crop.
    """
    if isinstance(padding, (list, tuple)):
        values = [_as_int(p, 'A padding value') for p in padding]
        if len(values) == 2:
            px, py = values
            return px, px, py, py
        if len(values) == 4:
            return tuple(values)
        raise ValueError(f'Padding must be an int, [x, y] or [x0, x1, y0, y1], got {padding!r}')
    p = _as_int(padding, 'Padding')
    return p, p, p, p


def _get_filter_size(f: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(fw, fh) of a filter as `setup_filter` makes it: None is 1x1, a 1-D filter is separable (square)."""
    if f is None:
        return 1, 1
    if not isinstance(f, torch.Tensor) or f.ndim not in (1, 2):
        raise ValueError(f'A filter must be None or a 1-D or 2-D tensor, got '
                         f'{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}')
    fw = f.shape[-1]
    fh = f.shape[0]
    return fw, fh


def _upsample_padding(taps: int, up: int) -> Tuple[int, int]:
    """(before, after) padding that makes upsampling by `up` with a `taps`-tap filter give exactly up * in
    samples: the filter trims taps - 1 samples, split with the extra one before for even filters."""
    return (taps + up - 1) // 2, (taps - up) // 2


def _downsample_padding(taps: int, down: int) -> Tuple[int, int]:
    """(before, after) padding that makes filtering with `taps` taps and keeping every `down`-th sample give
    in / down samples (for in divisible by down)."""
    return (taps - down + 1) // 2, (taps - down) // 2

# ----------------------------------------------------------------------------
# Filters.


def setup_filter(
    f,                                      # None (identity), a scalar, or a 1-D / 2-D array-like of taps.
    device      = _CPU,                     # Device of the returned tensor.
    normalize   = True,                     # Scale the taps to sum to 1 (a DC gain of 1).
    flip_filter = False,                    # Flip the taps (turns the op's convolution into a correlation).
    gain        = 1,                        # Overall gain: the taps are scaled by gain ** (ndim / 2).
    separable   = None,                     # Keep a 1-D filter separable? None: only if it has >= 8 taps.
) -> torch.Tensor:
    """Convert a filter description to the float32 tensor that `upfirdn2d` expects.

    A 1-D filter with fewer than 8 taps becomes the 2-D outer product with itself (one small 2-D pass is
    faster than two 1-D passes); longer ones stay 1-D. Then the taps are normalized, flipped and scaled by
    the gain, in that order. A separable filter carries sqrt(gain) because the op applies it twice.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim not in (0, 1, 2):
        raise ValueError(f'A filter must be a scalar, 1-D or 2-D, got shape {tuple(f.shape)}')
    if f.numel() == 0:
        raise ValueError('A filter needs at least one tap')
    if f.ndim == 0:
        f = f.reshape(1)
    if separable is None:
        separable = (f.ndim == 1 and f.numel() >= 8)
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if f.ndim != (1 if separable else 2):
        raise ValueError(f'A {f.ndim}-D filter cannot be made {"separable" if separable else "2-D"}')

    # Out of place throughout: as_tensor may have returned the caller's own tensor.
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)

# ----------------------------------------------------------------------------
# The op.


def _output_size(in_size: int, up: int, down: int, pad0: int, pad1: int, taps: int, axis: str) -> int:
    padded = in_size * up + pad0 + pad1
    if padded < taps:
        raise ValueError(f'upfirdn2d: along {axis}, the upsampled and padded input ({in_size} * {up} + {pad0} + '
                         f'{pad1} = {padded}) is shorter than the filter ({taps} taps)')
    return (padded - taps) // down + 1


def upfirdn2d(
    x,                      # Input [batch, channels, height, width].
    f,                      # Filter from setup_filter: [fh, fw], [taps] (separable), or None (identity).
    up          = 1,        # Upsampling factor by zero insertion: int, or [x, y].
    down        = 1,        # Downsampling factor (keeps every down-th sample): int, or [x, y].
    padding     = 0,        # Padding after upsampling, negative crops: int, [x, y] or [x0, x1, y0, y1].
    flip_filter = False,    # False: convolve with f (the usual meaning); True: correlate.
    gain        = 1,        # Overall gain; f is scaled by gain ** (f.ndim / 2).
    impl        = 'cuda',   # 'cuda' (kernel where possible, see dispatch.py) or 'ref'.
) -> torch.Tensor:
    """Upsample, pad, filter and downsample a batch of images; see the module docstring for the exact maths.

    Output size per axis: `(in * up + pad0 + pad1 - taps) // down + 1`.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f'upfirdn2d expects x of shape [batch, channels, height, width], got '
                         f'{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}')
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    up = _parse_scaling(up)
    down = _parse_scaling(down)
    padding = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    _output_size(x.shape[3], up[0], down[0], padding[0], padding[1], fw, 'x')
    _output_size(x.shape[2], up[1], down[1], padding[2], padding[3], fh, 'y')
    if dispatch.use_cuda_kernel(impl, x, _plugin) and x.dtype in _KERNEL_DTYPES:
        return _upfirdn2d_kernel(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    return _upfirdn2d_ref(x, f, up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)


def _upfirdn2d_ref(x: torch.Tensor, f: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                   padding: Tuple[int, int, int, int], flip_filter: bool, gain: float) -> torch.Tensor:
    """The reference path: differentiable to any order, in any floating dtype (the filter follows x)."""
    batch, channels, in_h, in_w = x.shape
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding

    # Zero insertion: give every sample (up - 1) zeros after it along each axis.
    if upx > 1 or upy > 1:
        x = x.reshape(batch, channels, in_h, 1, in_w, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(batch, channels, in_h * upy, in_w * upx)

    # Padding, then cropping for the negative sides.
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]

    # conv2d correlates, so the filter is flipped to convolve. The gain is applied in the filter's own
    # dtype before the cast: the float64 reference vectors were computed in that order.
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:
        x = F.conv2d(x, f[None, None].repeat(channels, 1, 1, 1), groups=channels)
    else:
        # Separable: along x first, then along y, as the kernel path does.
        x = F.conv2d(x, f[None, None, None, :].repeat(channels, 1, 1, 1), groups=channels)
        x = F.conv2d(x, f[None, None, :, None].repeat(channels, 1, 1, 1), groups=channels)

    return x[:, :, ::downy, ::downx]


def _upfirdn2d_kernel(x: torch.Tensor, f: torch.Tensor, up: Tuple[int, int], down: Tuple[int, int],
                      padding: Tuple[int, int, int, int], flip_filter: bool, gain: float) -> torch.Tensor:
    """The kernel path; a separable filter becomes two launches with 1xN and Nx1 filters."""
    if f.requires_grad:
        # The kernel's autograd function has no filter gradient; silently returning none would be wrong.
        raise ValueError('upfirdn2d: the CUDA kernel cannot differentiate with respect to the filter; '
                         "detach it or pass impl='ref'")
    f = f.to(torch.float32)
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    if f.ndim == 2:
        return _kernel_op(x, f, upx, upy, downx, downy, px0, px1, py0, py1, flip_filter, float(gain))
    taps = f.shape[0]
    pass_gain = math.sqrt(gain)
    x = _kernel_op(x, f.reshape(1, taps), upx, 1, downx, 1, px0, px1, 0, 0, flip_filter, pass_gain)
    return _kernel_op(x, f.reshape(taps, 1), 1, upy, 1, downy, 0, 0, py0, py1, flip_filter, pass_gain)

# ----------------------------------------------------------------------------
# The kernel as a `torch.library` custom op, so that torch.compile traces it as one node (its fake kernel
# gives the shape) instead of breaking the graph at the extension call.
#
# Per axis, the op computes y[o] = gain * sum_k x[i] g[k] over i * up == o * down + k - pad0, where g is the
# 2-D filter in convolution order. Its adjoint, dx[i] = gain * sum_k dy[o] g[k] over the same triples, is
# again this op: zero-insert dy by `down`, correlate where the forward convolved (flip_filter toggled, which
# reverses g), keep every `up`-th sample. Substituting k' = fsize - 1 - k turns the constraint into
# o * down == i * up + k' - (fsize - 1 - pad0), so the gradient's leading padding is fsize - 1 - pad0; its
# trailing padding is whatever makes the gradient exactly `in` samples long: pad1' = in * up - out * down +
# pad0 - (up - 1). Applying the rule twice gives back the forward factors, filter orientation and leading
# padding, so the backward pass is differentiable in turn by the same construction, to any order. The filter
# gets no gradient (`_upfirdn2d_kernel` refuses one that requires it).
#
# On a CUDA tensor the op runs the extension; on the CPU, `_host_module` (the reference path with the
# extension's call signature and output layout), so that `torch.library.opcheck` can exercise the op, its
# autograd formula and its fake kernel without a GPU (tests that compile the .cu file for the host replace
# `_host_module` with that build). The default CPU path never calls the op: it runs the reference.

def _suggested_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the extension gives its output: channels-last for a channels-last input, else contiguous."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _kernel_impl(
    x:              torch.Tensor,   # Input [batch, channels, height, width], float16/float32.
    f:              torch.Tensor,   # 2-D float32 filter [fh, fw].
    upx:            int,            # Upsampling factors.
    upy:            int,
    downx:          int,            # Downsampling factors.
    downy:          int,
    padx0:          int,            # Padding after upsampling, negative crops.
    padx1:          int,
    pady0:          int,
    pady1:          int,
    flip_filter:    bool,           # Correlate instead of convolving.
    gain:           float,          # Overall gain.
) -> torch.Tensor:
    module = _plugin.get() if x.device.type == 'cuda' else _host_module
    return module.upfirdn2d(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain, 0)


def _kernel_fake(x, f, upx, upy, downx, downy, padx0, padx1, pady0, pady1, flip_filter, gain):
    out_h = (x.shape[2] * upy + pady0 + pady1 - f.shape[0]) // downy + 1
    out_w = (x.shape[3] * upx + padx0 + padx1 - f.shape[1]) // downx + 1
    return x.new_empty([x.shape[0], x.shape[1], out_h, out_w]).contiguous(memory_format=_suggested_format(x))


def _kernel_setup_context(ctx, inputs, output):
    x, f, *config = inputs
    ctx.save_for_backward(f)
    ctx.config = config
    ctx.in_size = (x.shape[3], x.shape[2])


def _kernel_backward(ctx, dy):
    (f,) = ctx.saved_tensors
    upx, upy, downx, downy, px0, px1, py0, py1, flip_filter, gain = ctx.config
    fh, fw = f.shape
    in_w, in_h = ctx.in_size
    out_h, out_w = dy.shape[2], dy.shape[3]
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _kernel_op(dy, f, downx, downy, upx, upy,
                        fw - 1 - px0, in_w * upx - out_w * downx + px0 - (upx - 1),
                        fh - 1 - py0, in_h * upy - out_h * downy + py0 - (upy - 1),
                        not flip_filter, gain)
    return dx, None, None, None, None, None, None, None, None, None, None, None


class _HostKernel:
    """The reference path with the extension's call signature and output layout: what the op runs on the CPU."""

    @staticmethod
    def upfirdn2d(x, f, upx, upy, downx, downy, px0, px1, py0, py1, flip_filter, gain, variant):
        del variant  # The extension's choice of CUDA kernel; one path here.
        y = _upfirdn2d_ref(x, f, up=(upx, upy), down=(downx, downy), padding=(px0, px1, py0, py1),
                           flip_filter=flip_filter, gain=gain)
        # A new tensor, never a view (of the padded input, when nothing is dropped): the output of a custom op
        # must not be one, or autograd refuses in-place updates of it (img.add_ in the synthesis blocks).
        return y.clone(memory_format=_suggested_format(x))


_host_module = _HostKernel()
_kernel_op = dispatch.kernel_op('upfirdn2d_kernel', _kernel_impl, _kernel_fake, _kernel_setup_context,
                                _kernel_backward)

# ----------------------------------------------------------------------------
# Parity probe (see probe.py and dispatch.kernel_verdict).

# What the probe runs: (name, input shape, channels-last, up, down, padding, gain), all with the networks'
# [1, 3, 3, 1] filter. The sizes are chosen so that the three kernels all run: the 2x upsampling writes a
# 16x16 planar output (the planar tiled kernel), its gradient a 2x downsampling to 8x8 (the general kernel);
# the channels-last 2x downsampling writes 6x6 with 8 channels (the channel-group tiled kernel), and so does
# its gradient, at 12x12.
_PROBE_CASES = (
    ('up2',         (1, 4, 8, 8),   False, (2, 2), (1, 1), (2, 1, 2, 1), 4.0),
    ('down2_nhwc',  (1, 8, 12, 12), True,  (1, 1), (2, 2), (1, 1, 1, 1), 1.0),
)


def _probe_case(device, name, shape, channels_last, up, down, padding, gain, dtype, seed):
    def run(impl, run_dtype):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        out_h = (shape[2] * up[1] + padding[2] + padding[3] - 4) // down[1] + 1
        out_w = (shape[3] * up[0] + padding[0] + padding[1] - 4) // down[0] + 1
        dy = torch.randn(shape[0], shape[1], out_h, out_w, generator=gen, dtype=torch.float64)
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        x, dy, v = (t.to(dtype).to(device=device, dtype=run_dtype) for t in (x, dy, v))
        if channels_last:
            x, dy, v = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, v))
        x.requires_grad_(True)
        dy.requires_grad_(True)
        f = setup_filter([1, 3, 3, 1], device=device)
        y = impl(x, f, up=up, down=down, padding=padding, flip_filter=False, gain=gain)
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        # The op is linear, so its only second-order derivative is the backward of the backward (J v), which
        # the second-order passes of R1 and path-length regularization run.
        (ddy,) = torch.autograd.grad((dx * v).sum(), dy)
        return dict(y=y, dx=dx, ddy=ddy)
    return ProbeCase(f'{name}/{str(dtype).split(".")[-1]}', dtype, run)


def probe_cases(device):
    """The probe's cases on `device`: each configuration of `_PROBE_CASES` in float32 and in float16."""
    cases = []
    for seed, config in enumerate(_PROBE_CASES):
        for dtype in (torch.float32, torch.float16):
            cases.append(_probe_case(torch.device(device), *config, dtype=dtype, seed=seed))
    return cases


def probe_kernel(device):
    """Compare the kernel path (through the plugin in use) with the reference on `device`; a ProbeResult."""
    return probe_op('upfirdn2d', _upfirdn2d_kernel, _upfirdn2d_ref, probe_cases(device))

# ----------------------------------------------------------------------------
# Common uses.


def filter2d(
    x,                      # Input [batch, channels, height, width].
    f,                      # Filter from setup_filter, or None.
    padding     = 0,        # Extra padding on top of what keeps the size: int, [x, y] or [x0, x1, y0, y1].
    flip_filter = False,    # False: convolve; True: correlate.
    gain        = 1,        # Overall gain.
    impl        = 'cuda',   # 'cuda' or 'ref'.
) -> torch.Tensor:
    """Filter without resampling; with padding=0 the output has the input's size.

    An even filter has no centre tap; the extra sample of padding goes before the image.
    """
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(
    x,                      # Input [batch, channels, height, width].
    f,                      # Interpolation filter from setup_filter, or None (nearest-neighbour-like zeros).
    up          = 2,        # Upsampling factor: int, or [x, y].
    padding     = 0,        # Extra padding: int, [x, y] or [x0, x1, y0, y1].
    flip_filter = False,    # False: convolve; True: correlate.
    gain        = 1,        # Overall gain (on top of the up * up that keeps the mean).
    impl        = 'cuda',   # 'cuda' or 'ref'.
) -> torch.Tensor:
    """Upsample by `up`; with padding=0 the output is exactly `up` times the input size.

    Zero insertion leaves 1 / (upx * upy) of the energy, hence the extra gain of upx * upy.
    """
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    (ax0, ax1), (ay0, ay1) = _upsample_padding(fw, upx), _upsample_padding(fh, upy)
    p = [px0 + ax0, px1 + ax1, py0 + ay0, py1 + ay1]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(
    x,                      # Input [batch, channels, height, width].
    f,                      # Anti-aliasing filter from setup_filter, or None (plain decimation).
    down        = 2,        # Downsampling factor: int, or [x, y].
    padding     = 0,        # Extra padding: int, [x, y] or [x0, x1, y0, y1].
    flip_filter = False,    # False: convolve; True: correlate.
    gain        = 1,        # Overall gain.
    impl        = 'cuda',   # 'cuda' or 'ref'.
) -> torch.Tensor:
    """Downsample by `down`; with padding=0 and a size divisible by `down` the output is size / down."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    (ax0, ax1), (ay0, ay1) = _downsample_padding(fw, downx), _downsample_padding(fh, downy)
    p = [px0 + ax0, px1 + ax1, py0 + ay0, py1 + ay1]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)
