"""2-D convolution fused with FIR up/down-sampling and padding.

Definition (the generic path below, `_generic`): with P the user padding plus the filter-size adjustments
that keep `up`-times and `1/down`-times output sizes,

    y = Down_down( f * Conv_w( f_up * Pad_P( Up_up(x) ) ) )

where Up inserts zeros, f_up is the filter with gain up**2 (zero insertion lowers the mean by that factor),
Conv_w is a valid convolution with w and Down keeps every `down`-th sample. Convolution, FIR filtering,
zero padding and 1x1 channel mixing are all linear and shift-invariant, so they can be reordered; the fast
paths below are the same function evaluated in a cheaper order:

* down only:   filter at full resolution, then a strided convolution (never computes discarded outputs);
* 1x1 + down:  filter and decimate first, then the 1x1 convolution on the small image;
* up:          a strided transposed convolution (skips the multiplications by inserted zeros), then the
               filter; then filter + decimate if `down` is also given;
* 1x1 + up:    the 1x1 convolution on the small image, then upsample;
* plain:       one conv2d call when the padding is symmetric and non-negative.

Tests check every fast path against `_generic`, and all of them against the reference vectors.
"""

from typing import Optional, Sequence, Union

import torch

from . import conv2d_gradfix, upfirdn2d

# ----------------------------------------------------------------------------


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    """Convolution through conv2d_gradfix (so `no_weight_gradients()` applies).

    `flip_weight=True` means correlation, which is what conv2d computes; False means true convolution, i.e.
    the kernel flipped. A transposed convolution already convolves (see `_up_path`), hence the inverted flip.
    """
    kh, kw = w.shape[2:]
    flip = (not flip_weight) if not transpose else flip_weight
    if flip and (kh > 1 or kw > 1):
        w = w.flip([2, 3])
    if transpose:
        return conv2d_gradfix.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return conv2d_gradfix.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def _transpose_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in/groups, kh, kw] (conv2d layout) -> [in, out/groups, kh, kw] (conv_transpose2d layout)."""
    out_channels, in_per_group, kh, kw = w.shape
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    return w.reshape(groups * in_per_group, out_channels // groups, kh, kw)


def _total_padding(f, up, down, padding):
    """User padding plus the adjustments that make upsampling give up*H and downsampling H/down."""
    fw, fh = upfirdn2d._get_filter_size(f)
    px0, px1, py0, py1 = upfirdn2d._parse_padding(padding)
    for adjust, factor in ((upfirdn2d._upsample_padding, up), (upfirdn2d._downsample_padding, down)):
        if factor > 1:  # Same conventions as upsample2d / downsample2d, so the output is up*H or H/down.
            (ax0, ax1), (ay0, ay1) = adjust(fw, factor), adjust(fh, factor)
            px0, px1, py0, py1 = px0 + ax0, px1 + ax1, py0 + ay0, py1 + ay1
    return [px0, px1, py0, py1]


def _generic(x, w, f, up, down, pad, groups, flip_weight, flip_filter):
    """The definition: upsample (with all padding), valid convolution, downsample. Slow but obvious."""
    x = upfirdn2d.upfirdn2d(x, f=(f if up > 1 else None), up=up, padding=pad, gain=up ** 2, flip_filter=flip_filter)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f=f, down=down, flip_filter=flip_filter)
    return x


def _up_path(x, w, f, up, down, pad, groups, flip_weight, flip_filter):
    """Upsampling by a strided transposed convolution, then the FIR filter.

    conv_transpose2d(x, k, stride=up)[q] = sum_i x[i] k[q - up*i], the *full* convolution of the
    zero-inserted image with k, whose index 0 sits kw - 1 samples before the first input sample. The valid
    correlation with w of the zero-inserted image padded by p0 therefore starts at index kw - 1 - p0 of it,
    i.e. it equals that output padded by p0 - (kw - 1); matching the output length gives p1 - (kw - up) at
    the end. The part of those paddings that is negative on both sides is cropped by conv_transpose2d's own
    `padding` instead, so that those outputs are never computed.
    """
    kh, kw = w.shape[2:]
    px0, px1, py0, py1 = pad
    px0, px1 = px0 - (kw - 1), px1 - (kw - up)
    py0, py1 = py0 - (kh - 1), py1 - (kh - up)
    crop_x = max(min(-px0, -px1), 0)
    crop_y = max(min(-py0, -py1), 0)
    x = _conv(x, _transpose_weight(w, groups), stride=up, padding=[crop_y, crop_x], groups=groups, transpose=True,
              flip_weight=flip_weight)
    x = upfirdn2d.upfirdn2d(x, f=f, padding=[px0 + crop_x, px1 + crop_x, py0 + crop_y, py1 + crop_y], gain=up ** 2,
                            flip_filter=flip_filter)
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f=f, down=down, flip_filter=flip_filter)
    return x


def _check_args(x, w, f, up, down, groups):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f'conv2d_resample: x must be a 4-D NCHW tensor, got {getattr(x, "shape", type(x))}')
    if not isinstance(w, torch.Tensor) or w.ndim != 4 or w.dtype != x.dtype:
        raise ValueError('conv2d_resample: w must be a 4-D [out, in/groups, kh, kw] tensor of the same dtype as x')
    if f is not None and (not isinstance(f, torch.Tensor) or f.ndim not in (1, 2)):
        raise ValueError('conv2d_resample: f must be None or a 1-D/2-D filter tensor from setup_filter()')
    for name, value in (('up', up), ('down', down), ('groups', groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'conv2d_resample: {name} must be a positive integer, got {value!r}')
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups != 0:
        raise ValueError(f'conv2d_resample: {x.shape[1]} input channels, weight {tuple(w.shape)} and groups={groups} '
                         f'do not fit together')


def conv2d_resample(
    x:              torch.Tensor,                       # Input [batch, in_channels, height, width].
    w:              torch.Tensor,                       # Weight [out_channels, in_channels // groups, kh, kw].
    f:              Optional[torch.Tensor] = None,      # FIR filter from upfirdn2d.setup_filter(); None = identity.
    up:             int = 1,                            # Integer upsampling factor.
    down:           int = 1,                            # Integer downsampling factor.
    padding:        Union[int, Sequence[int]] = 0,      # Padding w.r.t. the upsampled image: int, [x, y] or [x0, x1, y0, y1].
    groups:         int = 1,                            # Grouped convolution.
    flip_weight:    bool = True,                        # True: correlation (conv2d's convention); False: convolution.
    flip_filter:    bool = False,                       # True: correlate with f instead of convolving.
) -> torch.Tensor:
    """Pad, upsample, convolve with `w` and downsample in one call, taking the cheapest equivalent route."""
    _check_args(x, w, f, up, down, groups)
    kh, kw = w.shape[2:]
    pad = _total_padding(f, up, down, padding)
    px0, px1, py0, py1 = pad
    args = (x, w, f, up, down, pad, groups, flip_weight, flip_filter)

    if kw == 1 and kh == 1 and up == 1 and down > 1:
        x = upfirdn2d.upfirdn2d(x, f=f, down=down, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d.upfirdn2d(x, f=f, up=up, padding=pad, gain=up ** 2, flip_filter=flip_filter)
    if up == 1 and down > 1:
        x = upfirdn2d.upfirdn2d(x, f=f, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        return _up_path(*args)
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    return _generic(*args)
