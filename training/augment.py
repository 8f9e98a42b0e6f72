"""Adaptive discriminator augmentation (ADA): the augmentation pipeline of Karras et al., "Training Generative
Adversarial Networks with Limited Data" (NeurIPS 2020), Appendix B.

`AugmentPipe` applies up to 15 transforms to a batch of images. Every transform is applied to every sample
independently, with probability `multiplier * p`, where `p` (a buffer) is the overall augmentation strength that
the ADA heuristic adjusts during training and each multiplier is a constructor keyword (0 disables it). Because
each transform fires with a probability below one, the discriminator still sees clean images often enough for
the augmentations not to leak into the generator (paper Section 2.2). The stages run in the paper's order:

1. Pixel blitting: x-flip, 90-degree rotation, integer translation.
2. General geometric transforms: isotropic scaling, arbitrary rotation (applied before and after the
   anisotropic scaling), anisotropic scaling, fractional translation.
3. Colour transforms: brightness, contrast, luma flip, hue rotation, saturation.
4. Image-space filtering: random gains for four frequency bands.
5. Corruptions: additive Gaussian noise, cutout.

Stages 1-2 are affine maps of the image plane and are written as 3x3 sampling matrices (output pixel -> input
position); stage 3 is an affine map of RGB space, a 4x4 matrix. The whole pipeline is differentiable to any
order with respect to the images, which R1 regularization of augmented reals needs.

Feature maps (GGDR, Lee et al. 2022): `pipe(images, features=...)` also applies the geometric stages drawn for
the images to generator features of other sizes and channel counts, each at its own resolution with the
translations scaled to it, and returns `(images, features)`; the other stages change only the images.

`AdaController` (at the end) is the other half of ADA: it moves `p` toward a target of the overfitting
heuristic r_t = E[sign(D(real))] while training runs.

The constructor keywords, their defaults, the attribute names and the buffer names (`p`, `Hz_geom`,
`Hz_fbank`, with the official shapes [], [12] and [4, 43]) follow the public StyleGAN2-ADA release, so that
`misc.copy_params_and_buffers` moves the state of the `augment_pipe` inside an official snapshot into this
class. The random draws and their order are our own, so the same seed gives different augmentations than the
official code; the distributions are the paper's. Differences in behaviour, all deliberate:

* Blitting (stage 1) moves whole pixels with an index gather instead of resampling: flips, quarter turns and
  integer shifts are exact, and the `blit` preset costs no filtering. Pixels that come from outside the image
  are mirrored back in (reflection without repeating the edge), as the resampling path pads by reflection.
* Samples that no transform of a stage touches leave that stage bitwise unchanged, so `p = 0` is exactly the
  identity; the official pipeline resamples and filters every image as soon as a multiplier is non-zero.
* Reflection padding is an index map, so it may be wider than the image: the geometric stage pads up to
  twice the image size per side (the official code stops below the image size, the limit of PyTorch's
  reflect padding), and the 43-tap filter bank works on images smaller than its taps.
* `debug_percentile` (a float in [0, 1] replacing every random draw, for looking at the transforms one
  percentile at a time) applies each enabled transform to every sample regardless of `p`, as the official code
  does. It is honoured by every transform: discrete draws take `floor(percentile * k)` (capped at k - 1),
  uniform draws the matching point of their interval, normal draws the normal quantile of the percentile
  (clamped to [1e-4, 1 - 1e-4], i.e. +-3.7 standard deviations, so that 0 and 1 stay finite), the noise
  strength the half-normal quantile; cutout centres both coordinates at the percentile; both rotations of
  the geometric stage take the percentile's angle. The noise pixels themselves stay random.
* Single-channel images: a grey value g is taken through the colour matrix as the RGB pixel (g, g, g) and the
  three results are averaged. Hue rotation and saturation then do nothing (grey lies on the luma axis), luma
  flip negates the image, brightness and contrast act as usual. Other channel counts work with every transform
  except the colour ones.
"""

import math
import re
import statistics

import numpy as np
import torch

from torch_utils import misc, persistence, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix, upfirdn2d

# The statistic the loss reports for sign(D(real)), the input of ADA's heuristic r_t; the same string as
# training.loss.STAT_SIGNS_REAL (a test checks it). Spelled out here, not imported, because a snapshot embeds this
# module's source and the official code runs it against its own training/loss.py, which has no such name (SPEC §7).
STAT_SIGNS_REAL = 'Loss/signs/real'

# ----------------------------------------------------------------------------
# Decomposition low-pass filters of orthogonal wavelets (official name and keys, SPEC §7): Daubechies db1-db8
# (haar = db1) and symlets sym2-sym8, 2N taps for N vanishing moments. Each sums to sqrt(2) and is orthogonal to
# its own shifts by even offsets (tests/test_augment.py checks these and the vanishing moments).
# tools/wavelet_taps.py computes them from their definition and rounds once to float64. db2 = sym2 and sym6 keep
# the widely published values instead (they differ from the computed ones by below 2e-12), because the pipe's
# buffers Hz_fbank and Hz_geom are built from them, and a snapshot's buffers must not change.

wavelets = {
    'haar': [0.7071067811865476, 0.7071067811865476],
    'db1':  [0.7071067811865476, 0.7071067811865476],
    'db2':  [-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025],
    'db3':  [0.03522629188570953, -0.08544127388202666, -0.13501102001025458, 0.45987750211849154, 0.8068915093110925,
             0.33267055295008263],
    'db4':  [-0.010597401785069032, 0.0328830116668852, 0.030841381835560764, -0.18703481171909309,
             -0.027983769416859854, 0.6308807679298589, 0.7148465705529157, 0.2303778133088965],
    'db5':  [0.0033357252854737712, -0.012580751999081999, -0.006241490212798274, 0.07757149384004572,
             -0.032244869584638375, -0.24229488706638203, 0.13842814590132074, 0.7243085284377729, 0.6038292697971896,
             0.16010239797419293],
    'db6':  [-0.0010773010853084796, 0.004777257510945511, 0.0005538422011614961, -0.03158203931748603,
             0.027522865530305727, 0.09750160558732304, -0.12976686756726194, -0.22626469396543983,
             0.31525035170919763, 0.7511339080210954, 0.49462389039845306, 0.11154074335010947],
    'db7':  [0.00035371379997452024, -0.0018016407040474908, 0.0004295779729213665, 0.01255099855609984,
             -0.01657454163066688, -0.03802993693501441, 0.08061260915108308, 0.07130921926683026,
             -0.22403618499387498, -0.14390600392856498, 0.4697822874051931, 0.7291320908462351, 0.3965393194819173,
             0.07785205408500918],
    'db8':  [-0.00011747678412476953, 0.0006754494064505693, -0.00039174037337694705, -0.004870352993451574,
             0.008746094047405777, 0.013981027917398282, -0.044088253930794755, -0.017369301001807547,
             0.12874742662047847, 0.0004724845739132828, -0.2840155429615469, -0.015829105256349306,
             0.5853546836542067, 0.6756307362972898, 0.31287159091429995, 0.05441584224310401],
    'sym2': [-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025],
    'sym3': [0.03522629188570953, -0.08544127388202666, -0.13501102001025458, 0.45987750211849154, 0.8068915093110925,
             0.33267055295008263],
    'sym4': [-0.07576571478950221, -0.029635527646002493, 0.497618667632775, 0.8037387518051321, 0.29785779560530606,
             -0.09921954357663353, -0.012603967262031304, 0.032223100604051466],
    'sym5': [0.027333068344998768, 0.02951949092570626, -0.039134249302313844, 0.19939753397685558,
             0.7234076904040407, 0.633978963456792, 0.01660210576451085, -0.17532808990805623, -0.021101834024689042,
             0.019538882735249827],
    'sym6': [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
             0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
             -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148],
    'sym7': [0.002681814568260147, -0.001047384888679738, -0.012636303403240567, 0.030515513165877885,
             0.06789269350122057, -0.04955283493704283, 0.017441255086835708, 0.5361019170905692, 0.7677643170048829,
             0.2886296317506479, -0.14004724044293365, -0.10780823770328972, 0.0040102448715223955,
             0.010268176708464817],
    'sym8': [-0.0033824159510050028, -0.0005421323318000107, 0.03169508781152599, 0.007607487324976609,
             -0.14329423835127267, -0.061273359067811076, 0.4813596512590534, 0.777185751699628, 0.36444189483617895,
             -0.0519458381078818, -0.027219029917103486, 0.04913717967373029, 0.0038087520138944896,
             -0.014952258337062199, -0.0003029205147241331, 0.001889950332767689],
}

# Share of an image's power assumed to lie in each band of the filter bank (lowest band first). Natural images
# keep most of their energy at low frequencies. The band gains are normalized against these shares so that
# boosting one band does not change the expected power of the image (Appendix B, image-space filtering).
FILTER_BAND_POWER = (10 / 13, 1 / 13, 1 / 13, 1 / 13)

# The transform multipliers of each stage, in the order the pipeline applies them.
BLIT_TRANSFORMS = ('xflip', 'rotate90', 'xint')
GEOM_TRANSFORMS = ('scale', 'rotate', 'aniso', 'xfrac')
COLOR_TRANSFORMS = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')
FILTER_TRANSFORMS = ('imgfilter',)
CORRUPTION_TRANSFORMS = ('noise', 'cutout')
ALL_TRANSFORMS = BLIT_TRANSFORMS + GEOM_TRANSFORMS + COLOR_TRANSFORMS + FILTER_TRANSFORMS + CORRUPTION_TRANSFORMS

# ----------------------------------------------------------------------------
# Presets (`train.py --augpipe`): each names the transforms it enables, all with multiplier 1.


def _enable(*names):
    return {name: 1 for name in names}


AUGPIPE_SPECS = {
    'blit':   _enable(*BLIT_TRANSFORMS),
    'geom':   _enable(*GEOM_TRANSFORMS),
    'color':  _enable(*COLOR_TRANSFORMS),
    'filter': _enable(*FILTER_TRANSFORMS),
    'noise':  _enable('noise'),
    'cutout': _enable('cutout'),
    'bg':     _enable(*BLIT_TRANSFORMS, *GEOM_TRANSFORMS),
    'bgc':    _enable(*BLIT_TRANSFORMS, *GEOM_TRANSFORMS, *COLOR_TRANSFORMS),
    'bgcf':   _enable(*BLIT_TRANSFORMS, *GEOM_TRANSFORMS, *COLOR_TRANSFORMS, *FILTER_TRANSFORMS),
    'bgcfn':  _enable(*BLIT_TRANSFORMS, *GEOM_TRANSFORMS, *COLOR_TRANSFORMS, *FILTER_TRANSFORMS, 'noise'),
    'bgcfnc': _enable(*ALL_TRANSFORMS),
}


def augment_pipe_from_preset(name, **overrides):
    """An `AugmentPipe` with the transforms of preset `name`; keyword overrides change any constructor
    argument (e.g. `xint_max=0.25`)."""
    if name not in AUGPIPE_SPECS:
        raise ValueError(f'Unknown augmentation preset {name!r}; valid presets: {", ".join(AUGPIPE_SPECS)}')
    return AugmentPipe(**{**AUGPIPE_SPECS[name], **overrides})

# ----------------------------------------------------------------------------
# Filters.


def _dilate(taps, factor):
    """The filter f(z^factor): factor - 1 zeros between consecutive taps."""
    out = np.zeros((len(taps) - 1) * factor + 1)
    out[::factor] = taps
    return out


def wavelet_filter_bank(lowpass, num_bands=4):
    """Zero-phase filters splitting the spectrum into octave bands, lowest band first: [num_bands, taps].

    From an orthogonal wavelet's low-pass H(z), lo(z) = H(z) H(1/z) / 2 is a zero-phase half-band low-pass
    with DC gain 1, and hi(z) = H(-z) H(-1/z) / 2 its power complement, lo + hi = 1 at every frequency.
    Splitting the low half again with the dilated pair lo(z^2), hi(z^2), and so on, gives the bands
    [pi/2, pi], [pi/4, pi/2], ... and the remaining low-pass [0, pi / 2^(num_bands - 1)]. The bands add up to
    the identity filter exactly (the sum telescopes), so unit gains leave an image unchanged.
    """
    h = np.asarray(lowpass, dtype=np.float64)
    h_mirror = h * (-1.0) ** np.arange(h.size)
    lo = np.convolve(h, h[::-1]) / 2
    hi = np.convolve(h_mirror, h_mirror[::-1]) / 2
    bands = []
    chain = np.ones(1)                                          # Low-pass of the levels split so far.
    for level in range(num_bands - 1):
        bands.append(np.convolve(chain, _dilate(hi, 2 ** level)))
        chain = np.convolve(chain, _dilate(lo, 2 ** level))
    bands.append(chain)
    width = chain.size                                          # The longest filter; all lengths are odd.
    return np.stack([np.pad(band, (width - band.size) // 2) for band in reversed(bands)])

# ----------------------------------------------------------------------------
# Transformation matrices (official names and signatures, SPEC §7). An entry is a Python number or a tensor; all
# tensor entries share one shape S (a batch), numbers are broadcast to it, and the result has shape S + (rows,
# columns). Without tensor entries the result is a constant [rows, columns] matrix on `device`.


def matrix(*rows, device=None):
    """Stack `rows` (sequences of entries, all of one length) into a matrix, or a batch of them."""
    assert all(len(row) == len(rows[0]) for row in rows), 'matrix() rows must have equal lengths'
    entries = [entry for row in rows for entry in row]
    tensors = [entry for entry in entries if isinstance(entry, torch.Tensor)]
    if not tensors:
        return misc.constant(np.asarray(rows), device=device)
    ref = tensors[0]
    assert device is None or torch.device(device) == ref.device, 'matrix() entries live on another device'
    # Numbers take the tensors' dtype (not the default one), so a float64 batch gives float64 matrices.
    entries = [entry if isinstance(entry, torch.Tensor) else
               misc.constant(entry, shape=ref.shape, dtype=ref.dtype, device=ref.device) for entry in entries]
    return torch.stack(entries, dim=-1).reshape(ref.shape + (len(rows), len(rows[0])))


def translate2d(tx, ty, **kwargs):
    """Homogeneous 3x3 translation by (tx, ty)."""
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)


def translate3d(tx, ty, tz, **kwargs):
    """Homogeneous 4x4 translation by (tx, ty, tz)."""
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)


def scale2d(sx, sy, **kwargs):
    """Homogeneous 3x3 scaling of x by sx and y by sy."""
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)


def scale3d(sx, sy, sz, **kwargs):
    """Homogeneous 4x4 scaling of the three axes."""
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)


def rotate2d(theta, **kwargs):
    """Homogeneous 3x3 rotation by `theta` radians (a tensor), counter-clockwise for y pointing up."""
    c, s = torch.cos(theta), torch.sin(theta)
    return matrix([c, -s, 0], [s, c, 0], [0, 0, 1], **kwargs)


def rotate3d(v, theta, **kwargs):
    """Homogeneous 4x4 rotation by `theta` about the unit axis `v` ([..., 3]): Rodrigues' formula
    R = cos(theta) I + sin(theta) [v]_x + (1 - cos(theta)) v v^T."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    c, s = torch.cos(theta), torch.sin(theta)
    d = 1 - c
    return matrix([x * x * d + c,     x * y * d - z * s, x * z * d + y * s, 0],
                  [y * x * d + z * s, y * y * d + c,     y * z * d - x * s, 0],
                  [z * x * d - y * s, z * y * d + x * s, z * z * d + c,     0],
                  [0,                 0,                 0,                 1], **kwargs)


def translate2d_inv(tx, ty, **kwargs):
    """The inverse of translate2d(tx, ty)."""
    return translate2d(-tx, -ty, **kwargs)


def scale2d_inv(sx, sy, **kwargs):
    """The inverse of scale2d(sx, sy)."""
    return scale2d(1 / sx, 1 / sy, **kwargs)


def rotate2d_inv(theta, **kwargs):
    """The inverse of rotate2d(theta)."""
    return rotate2d(-theta, **kwargs)


def _quarter_turn2d(k):
    """Rotation by k * 90 degrees (k an integer-valued float tensor) with exact entries."""
    k = k.long() % 4
    c = torch.where(k % 2 == 0, 1 - k, torch.zeros_like(k)).to(torch.float32)
    s = torch.where(k % 2 == 1, 2 - k, torch.zeros_like(k)).to(torch.float32)
    return matrix([c, -s, 0], [s, c, 0], [0, 0, 1])


def _color_constants(device):
    """Constant 4x4 matrices of RGB space (homogeneous), with the luma axis v = (1, 1, 1, 0) / sqrt(3)."""
    v = np.array([1, 1, 1, 0]) / np.sqrt(3)
    rgb = np.diag([1.0, 1.0, 1.0, 0.0])                         # Projection onto the RGB part.
    cross = np.array([[0, -v[2], v[1], 0], [v[2], 0, -v[0], 0], [-v[1], v[0], 0, 0], [0, 0, 0, 0]])
    offset = np.zeros([4, 4])
    offset[:3, 3] = 1                                           # Adds the same value to R, G and B.
    names = dict(eye=np.eye(4), rgb=rgb, luma=np.outer(v, v), cross=cross, offset=offset)
    return {name: misc.constant(value, dtype=torch.float32, device=device) for name, value in names.items()}


def _bmat(scalar):
    """[batch] -> [batch, 1, 1], to scale a constant matrix per sample."""
    return scalar.reshape(-1, 1, 1)

# ----------------------------------------------------------------------------
# Index helpers.


def _mirror_index(index, size):
    """Fold integer positions into [0, size) by reflection about the border pixels (no edge repeat)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index < size, index, period - index)


def _mirror_pad(x, padding):
    """Pad [N, C, H, W] by reflection, `padding` = (x0, x1, y0, y1), any width (also wider than the image)."""
    x0, x1, y0, y1 = padding
    height, width = x.shape[2], x.shape[3]
    ix = _mirror_index(torch.arange(-x0, width + x1, device=x.device), width)
    iy = _mirror_index(torch.arange(-y0, height + y1, device=x.device), height)
    return x.index_select(3, ix).index_select(2, iy)


def _normal_quantile(percentile):
    """The standard normal quantile of a percentile, clamped to +-3.7 standard deviations."""
    return statistics.NormalDist().inv_cdf(min(max(percentile, 1e-4), 1 - 1e-4))

# ----------------------------------------------------------------------------
# Feature maps: the geometric stages of the images, re-expressed at a feature's size.


def _check_features(features, image_shape):
    """The features of `forward` as a list, validated against the images' shape [N, C, H, W]."""
    feature_list = [features] if isinstance(features, torch.Tensor) else list(features)
    N, _, H, W = image_shape
    for f in feature_list:
        if not isinstance(f, torch.Tensor) or f.ndim != 4 or not f.is_floating_point() or f.shape[0] != N:
            raise ValueError(f'AugmentPipe features must be floating-point tensors [N, C, H, W] with N = {N}')
        # One scale factor for both axes keeps flips and quarter turns whole-pixel moves at the feature's size.
        if f.shape[2] * W != f.shape[3] * H:
            raise ValueError(f'A feature must have the aspect ratio of the images ({W}x{H}), '
                             f'got {f.shape[3]}x{f.shape[2]}')
    return feature_list


def _split_scaled_blit(blit, scale):
    """A blit matrix [N, 3, 3] at `scale` times the resolution, as (whole, residual): `whole` moves by whole
    pixels, and blit_at_scale = whole @ translate(residual), residual [N, 2] in the scaled pixels.

    The linear part L of a blit is a signed permutation (flips and quarter turns), unchanged by the scaling;
    the translation t becomes scale * t. With t' = round(scale * t), whole = [L, t'] and the remainder is
    L^-1 (scale * t - t') = L^T (scale * t - t'), at most half a pixel per axis, and exactly 0 when scale * t
    is already whole.
    """
    t = blit[:, :2, 2] * scale
    t_whole = torch.round(t)
    linear = blit[:, :2, :2]
    residual = (linear.transpose(1, 2) @ (t - t_whole)[:, :, None])[:, :, 0]
    whole = torch.cat([torch.cat([linear, t_whole[:, :, None]], dim=2), blit[:, 2:, :]], dim=1)
    return whole, residual

# ----------------------------------------------------------------------------


# Random draws. With a debug percentile every draw is replaced by the value at that percentile.


def _uniform(shape, device, debug_percentile):
    """U(0, 1)."""
    if debug_percentile is None:
        return torch.rand(shape, device=device)
    return torch.full(shape, float(debug_percentile), device=device)


def _normal(shape, device, debug_percentile):
    """N(0, 1)."""
    if debug_percentile is None:
        return torch.randn(shape, device=device)
    return torch.full(shape, _normal_quantile(debug_percentile), device=device)


def _half_normal(shape, device, debug_percentile):
    """|N(0, 1)|."""
    if debug_percentile is None:
        return torch.randn(shape, device=device).abs()
    return torch.full(shape, abs(_normal_quantile((1 + debug_percentile) / 2)), device=device)


def _discrete(num_values, shape, device, debug_percentile):
    """Uniform over {0, 1, ..., num_values - 1}, as float."""
    if debug_percentile is None:
        return torch.randint(num_values, shape, device=device).to(torch.float32)
    return torch.full(shape, float(min(math.floor(debug_percentile * num_values), num_values - 1)), device=device)

# ----------------------------------------------------------------------------


@persistence.persistent_class
class AugmentPipe(torch.nn.Module):
    """The ADA augmentation pipeline (see the module docstring). Call it on images [N, C, H, W], optionally
    with feature maps to transform alike (`forward`); set the augmentation probability with
    `pipe.p.copy_(value)`."""

    def __init__(self,
        xflip           = 0,            # Multiplier of x-flips (mirror about the vertical axis).
        rotate90        = 0,            # Multiplier of rotations by a multiple of 90 degrees.
        xint            = 0,            # Multiplier of integer translations.
        xint_max        = 0.125,        # Largest integer translation, as a fraction of the image size.
        scale           = 0,            # Multiplier of isotropic scaling.
        rotate          = 0,            # Multiplier of arbitrary rotations.
        aniso           = 0,            # Multiplier of anisotropic scaling.
        xfrac           = 0,            # Multiplier of fractional translations.
        scale_std       = 0.2,          # Std of log2 of the isotropic scale factor.
        rotate_max      = 1,            # Largest rotation, in half turns (1 = any angle in [-pi, pi]).
        aniso_std       = 0.2,          # Std of log2 of the anisotropic scale factor.
        xfrac_std       = 0.125,        # Std of the fractional translation, as a fraction of the image size.
        brightness      = 0,            # Multiplier of brightness offsets.
        contrast        = 0,            # Multiplier of contrast scaling.
        lumaflip        = 0,            # Multiplier of luma flips (reflection of RGB along the luma axis).
        hue             = 0,            # Multiplier of hue rotations (about the luma axis).
        saturation      = 0,            # Multiplier of saturation scaling.
        brightness_std  = 0.2,          # Std of the brightness offset.
        contrast_std    = 0.5,          # Std of log2 of the contrast factor.
        hue_max         = 1,            # Largest hue rotation, in half turns.
        saturation_std  = 1,            # Std of log2 of the saturation factor.
        imgfilter       = 0,            # Multiplier of image-space filtering (random gains per frequency band).
        imgfilter_bands = (1, 1, 1, 1), # Multiplier of each band's gain, lowest band first.
        imgfilter_std   = 1,            # Std of log2 of each band's gain.
        noise           = 0,            # Multiplier of additive Gaussian noise.
        cutout          = 0,            # Multiplier of cutout (a square set to zero).
        noise_std       = 0.1,          # Scale of the noise std, which is drawn from |N(0, noise_std^2)|.
        cutout_size     = 0.5,          # Side of the cutout square, as a fraction of the image size.
    ):
        super().__init__()
        self.register_buffer('p', torch.zeros([]))             # Overall augmentation probability.

        self.xflip = float(xflip)
        self.rotate90 = float(rotate90)
        self.xint = float(xint)
        self.xint_max = float(xint_max)

        self.scale = float(scale)
        self.rotate = float(rotate)
        self.aniso = float(aniso)
        self.xfrac = float(xfrac)
        self.scale_std = float(scale_std)
        self.rotate_max = float(rotate_max)
        self.aniso_std = float(aniso_std)
        self.xfrac_std = float(xfrac_std)

        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)

        self.imgfilter = float(imgfilter)
        self.imgfilter_bands = [float(b) for b in imgfilter_bands]
        self.imgfilter_std = float(imgfilter_std)

        self.noise = float(noise)
        self.cutout = float(cutout)
        self.noise_std = float(noise_std)
        self.cutout_size = float(cutout_size)

        # Geometric resampling goes through 2x oversampling with the sym6 wavelet's low-pass, which is
        # orthogonal: upsampling with it and downsampling with its mirror image reproduces the input exactly.
        self.register_buffer('Hz_geom', upfirdn2d.setup_filter(wavelets['sym6']))
        # Image-space filtering: four octave bands [0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi].
        self.register_buffer('Hz_fbank', torch.as_tensor(wavelet_filter_bank(wavelets['sym2'], 4), dtype=torch.float32))
        if len(self.imgfilter_bands) != self.Hz_fbank.shape[0]:
            raise ValueError(f'imgfilter_bands needs one value per band ({self.Hz_fbank.shape[0]}), '
                             f'got {list(imgfilter_bands)}')

    def extra_repr(self):
        enabled = [f'{name}={getattr(self, name):g}' for name in ALL_TRANSFORMS if getattr(self, name) != 0]
        return ', '.join([f'p={float(self.p):g}'] + enabled)

    def _enabled(self, names):
        return any(getattr(self, name) != 0 for name in names)

    def _gate(self, batch_size, device, debug_percentile, prob):
        """[batch] bool: the samples that a transform applied with probability `prob` touches."""
        if debug_percentile is not None:
            return torch.ones([batch_size], dtype=torch.bool, device=device)
        return torch.rand([batch_size], device=device) < prob

    @staticmethod
    def _gated(matrix, mask):
        """`matrix` [batch, n, n] for the samples in `mask`, the exact identity for the others."""
        eye = misc.constant(np.eye(matrix.shape[-1]), dtype=matrix.dtype, device=matrix.device)
        return torch.where(mask.reshape(-1, 1, 1), matrix, eye)

    # ------------------------------------------------------------------------
    # Drawing the parameters of a batch.

    def draw_geometric(self, batch_size, width, height, device, debug_percentile=None):
        """Sampling matrices of stages 1 and 2: (blit, geom), each [batch, 3, 3] float32, or None where the stage
        has no enabled transform.

        A sampling matrix maps an output pixel position to the input position it reads, in pixel units with
        the origin at the image centre; it is the inverse of the transform of the image content. The full
        map of a sample is `blit @ geom`: the geometric transforms act on the blitted image.
        """
        N, pct = batch_size, debug_percentile
        eye = misc.constant(np.eye(3), dtype=torch.float32, device=device).expand(N, 3, 3)
        blit = geom = None

        if self._enabled(BLIT_TRANSFORMS):
            blit = eye
            if self.xflip != 0:
                flip = _discrete(2, [N], device, pct)
                mask = self._gate(N, device, pct, self.xflip * self.p)
                blit = blit @ self._gated(scale2d(1 - 2 * flip, 1), mask)
            if self.rotate90 != 0:
                quarters = _discrete(4, [N], device, pct)
                mask = self._gate(N, device, pct, self.rotate90 * self.p)
                blit = blit @ self._gated(_quarter_turn2d(-quarters), mask)
            if self.xint != 0:
                t = (_uniform([N, 2], device, pct) * 2 - 1) * self.xint_max
                shift = torch.round(t * misc.constant([width, height], dtype=torch.float32, device=device))
                mask = self._gate(N, device, pct, self.xint * self.p)
                blit = blit @ self._gated(translate2d(-shift[:, 0], -shift[:, 1]), mask)

        if self._enabled(GEOM_TRANSFORMS):
            geom = eye
            if self.scale != 0:
                s = torch.exp2(_normal([N], device, pct) * self.scale_std)
                mask = self._gate(N, device, pct, self.scale * self.p)
                geom = geom @ self._gated(scale2d(1 / s, 1 / s), mask)
            # The rotation is applied twice, around the anisotropic scaling, each time with a probability
            # that makes "at least one of the two" as likely as rotate * p (Appendix B).
            rotate_prob = 1 - torch.sqrt((1 - self.rotate * self.p).clamp(0, 1))
            if self.rotate != 0:
                theta = (_uniform([N], device, pct) * 2 - 1) * (math.pi * self.rotate_max)
                geom = geom @ self._gated(rotate2d(-theta), self._gate(N, device, pct, rotate_prob))
            if self.aniso != 0:
                s = torch.exp2(_normal([N], device, pct) * self.aniso_std)
                mask = self._gate(N, device, pct, self.aniso * self.p)
                geom = geom @ self._gated(scale2d(1 / s, s), mask)
            if self.rotate != 0:
                theta = (_uniform([N], device, pct) * 2 - 1) * (math.pi * self.rotate_max)
                geom = geom @ self._gated(rotate2d(-theta), self._gate(N, device, pct, rotate_prob))
            if self.xfrac != 0:
                t = _normal([N, 2], device, pct) * self.xfrac_std
                mask = self._gate(N, device, pct, self.xfrac * self.p)
                geom = geom @ self._gated(translate2d(-t[:, 0] * width, -t[:, 1] * height), mask)

        return blit, geom

    def draw_color(self, batch_size, device, debug_percentile=None):
        """Colour matrices of stage 3, [batch, 4, 4] float32, acting on homogeneous RGB (r, g, b, 1)."""
        N, pct = batch_size, debug_percentile
        k = _color_constants(device)
        C = k['eye'].expand(N, 4, 4)
        if self.brightness != 0:
            b = _normal([N], device, pct) * self.brightness_std
            mask = self._gate(N, device, pct, self.brightness * self.p)
            C = self._gated(k['eye'] + _bmat(b) * k['offset'], mask) @ C
        if self.contrast != 0:
            c = torch.exp2(_normal([N], device, pct) * self.contrast_std)
            mask = self._gate(N, device, pct, self.contrast * self.p)
            C = self._gated(_bmat(c) * k['rgb'] + (k['eye'] - k['rgb']), mask) @ C
        if self.lumaflip != 0:
            flip = _discrete(2, [N], device, pct)
            mask = self._gate(N, device, pct, self.lumaflip * self.p)
            C = self._gated(k['eye'] - 2 * _bmat(flip) * k['luma'], mask) @ C
        if self.hue != 0:
            # Rodrigues' formula for the rotation by theta about the luma axis.
            theta = (_uniform([N], device, pct) * 2 - 1) * (math.pi * self.hue_max)
            rotation = (k['luma'] + _bmat(torch.cos(theta)) * (k['rgb'] - k['luma'])
                        + _bmat(torch.sin(theta)) * k['cross'] + (k['eye'] - k['rgb']))
            C = self._gated(rotation, self._gate(N, device, pct, self.hue * self.p)) @ C
        if self.saturation != 0:
            # Keep the luma component, scale the chroma (the part orthogonal to the luma axis).
            s = torch.exp2(_normal([N], device, pct) * self.saturation_std)
            saturate = k['luma'] + _bmat(s) * (k['rgb'] - k['luma']) + (k['eye'] - k['rgb'])
            C = self._gated(saturate, self._gate(N, device, pct, self.saturation * self.p)) @ C
        return C

    def draw_filter_gains(self, batch_size, device, debug_percentile=None):
        """Per-sample gains of the filter bank's bands, [batch, bands] float32 (1 = band unchanged)."""
        N, pct = batch_size, debug_percentile
        num_bands = self.Hz_fbank.shape[0]
        strength = misc.constant(self.imgfilter_bands, dtype=torch.float32, device=device)
        t = torch.exp2(_normal([N, num_bands], device, pct) * self.imgfilter_std)
        if pct is not None:
            mask = (strength > 0).expand(N, num_bands)
        else:
            mask = torch.rand([N, num_bands], device=device) < self.imgfilter * self.p * strength
        # Boosting band i by t_i alone would change the expected power by the factor
        # sum_j power_j t_j^2 = power_i t_i^2 + 1 - power_i; every band is divided by its square root.
        power = misc.constant(FILTER_BAND_POWER, dtype=torch.float32, device=device)
        t = torch.where(mask, t, torch.ones_like(t))
        norm = torch.where(mask, (power * t.square() + (1 - power)).rsqrt(), torch.ones_like(t))
        return t * norm.prod(dim=1, keepdim=True)

    # ------------------------------------------------------------------------
    # Applying the stages.

    def forward(self, images, features=None, debug_percentile=None):
        """Augment `images` [N, C, H, W]; returns the augmented images.

        With `features` (a tensor [N, C_i, H_i, W_i] or a list or tuple of them, e.g. the generator feature
        that GGDR's decoder must predict) returns `(images, features)`, the features as a tensor or a list as
        given. Each feature gets the geometric transforms (stages 1-2) drawn for the images, re-expressed at
        its own size (see `_warp_feature`); colour, filtering, noise and cutout act on the images only. The
        features draw no random numbers of their own: the images and the random state afterwards are the
        same whether features are given or not.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError('AugmentPipe expects a floating-point tensor of shape [N, C, H, W]')
        if debug_percentile is not None and not 0 <= debug_percentile <= 1:
            raise ValueError(f'debug_percentile must lie in [0, 1], got {debug_percentile}')
        feature_list = None if features is None else _check_features(features, images.shape)
        N, C, H, W = images.shape
        device = images.device

        if self._enabled(BLIT_TRANSFORMS + GEOM_TRANSFORMS):
            blit, geom = self.draw_geometric(N, W, H, device, debug_percentile)
            if blit is not None:
                images = self._blit(images, blit)
            if geom is not None:
                images = self._resample(images, geom)
            if feature_list is not None:
                feature_list = [self._warp_feature(f, blit, geom, W) for f in feature_list]
        images = self._augment_appearance(images, debug_percentile)
        if features is None:
            return images
        return images, (feature_list[0] if isinstance(features, torch.Tensor) else feature_list)

    def _augment_appearance(self, images, debug_percentile):
        """Stages 3-5, which change pixel values but not positions and therefore act on images only."""
        N, C, H, W = images.shape
        device = images.device
        if self._enabled(COLOR_TRANSFORMS):
            if C not in (1, 3):
                raise ValueError(f'Colour transforms need RGB or grayscale images, got {C} channels')
            images = self._apply_color(images, self.draw_color(N, device, debug_percentile))
        if self.imgfilter != 0:
            images = self._apply_filter(images, self.draw_filter_gains(N, device, debug_percentile))
        if self.noise != 0:
            sigma = _half_normal([N], device, debug_percentile) * self.noise_std
            sigma = torch.where(self._gate(N, device, debug_percentile, self.noise * self.p), sigma, 0)
            images = images + torch.randn_like(images) * sigma.to(images.dtype).reshape(N, 1, 1, 1)
        if self.cutout != 0:
            images = self._apply_cutout(images, debug_percentile)
        return images

    def _blit(self, images, matrix):
        """Stage 1: move whole pixels. Source positions outside the image are mirrored back in."""
        N, C, H, W = images.shape
        cols = torch.arange(W, dtype=torch.float32, device=images.device) + (0.5 - W / 2)
        rows = torch.arange(H, dtype=torch.float32, device=images.device) + (0.5 - H / 2)
        src = (matrix[:, :2, 0, None, None] * cols.reshape(1, 1, 1, W)
               + matrix[:, :2, 1, None, None] * rows.reshape(1, 1, H, 1)
               + matrix[:, :2, 2, None, None])                  # [N, 2, H, W] source pixel centres.
        # A pixel centre k + 0.5 - size / 2 maps to index k; flooring is robust to rounding either way.
        ix = _mirror_index(torch.floor(src[:, 0] + W / 2).long(), W)
        iy = _mirror_index(torch.floor(src[:, 1] + H / 2).long(), H)
        index = (iy * W + ix).reshape(N, 1, H * W).expand(N, C, H * W)
        return images.reshape(N, C, H * W).gather(2, index).reshape(N, C, H, W)

    def _warp_feature(self, feature, blit, geom, image_width):
        """Stages 1-2 on a feature map, with the sampling matrices drawn for images `image_width` pixels wide.

        The transforms are defined in coordinates normalized by the image size, while the matrices are in
        pixel units about the centre; at `scale` = feature size / image size the same map keeps its linear
        part and has `scale` times the translation. Flips and quarter turns stay whole-pixel moves at any
        size. An integer translation of the images is in general fractional at the feature's size: its
        whole-pixel part is blitted (exact), and the remainder, at most half a feature pixel, is handed to
        the resampling of stage 2, which already interpolates fractional translations for the images. The
        feature thus moves by exactly the images' shift (up to the interpolation), where rounding the shift
        would misplace it by up to half of its own pixel (two image pixels for 8x8 features of 32x32 images);
        a shift that is a multiple of 1 / scale, or scale = 1, involves no resampling at all. Stage 2 then
        resamples the feature at its own resolution, with the same reflection padding and 2x wavelet
        oversampling as the images.
        """
        scale = feature.shape[3] / image_width
        residual = None
        if blit is not None:
            blit, residual = _split_scaled_blit(blit, scale)
            feature = self._blit(feature, blit)
        if geom is None and residual is None:
            return feature
        if geom is None:
            geom = misc.constant(np.eye(3), dtype=torch.float32, device=feature.device).expand(len(blit), 3, 3)
        geom = geom.clone()                                     # A contiguous copy, also of the expanded eye.
        geom[:, :2, 2] *= scale
        if residual is not None:
            # whole @ translate(residual) @ geom = whole @ [A, t + residual] for geom = [A, t].
            geom[:, :2, 2] += residual
        return self._resample(feature, geom)

    def _resample(self, images, matrix):
        """Stage 2: warp by the sampling matrices with 2x oversampling.

        Pad by reflection far enough to cover what the warped image reads, upsample 2x with the wavelet
        low-pass, sample bilinearly on an output grid at twice the resolution, and downsample 2x with the
        mirrored low-pass, which undoes the upsampling exactly where the matrix is the identity. The output
        grid extends past the image by the samples that the decimation filter reads at the borders.
        """
        N, C, H, W = images.shape
        dtype, device = images.dtype, images.device
        taps = self.Hz_geom.shape[0]
        extra = taps // 2 - 1           # Output samples (at 2x) beyond each border, read by the decimation.
        slack = taps // 4 + 1           # Input pixels of context that the interpolation filter needs.

        # Bounding box, in input pixels about the centre, of what the extended output grid reads.
        hx, hy = W / 2 + extra / 2, H / 2 + extra / 2
        corners = misc.constant([[-hx, hx, hx, -hx], [-hy, -hy, hy, hy], [1, 1, 1, 1]], device=device)
        reach = matrix[:, :2, :] @ corners                      # [N, 2, 4]
        half = misc.constant([W / 2, H / 2], device=device)
        before = (slack - half - reach.amin(dim=(0, 2))).ceil()
        after = (reach.amax(dim=(0, 2)) - half + slack).ceil()
        limit = misc.constant([2 * W, 2 * H], device=device)
        padding = torch.stack([before, after], dim=1).clamp(min=0).minimum(limit[:, None]).flatten()
        eye = misc.constant(np.eye(3), device=device)
        warped = (matrix != eye).flatten(1).any(dim=1)
        # The padding decides tensor shapes, so it must come to the host: one transfer per call.
        x0, x1, y0, y1, any_warped = torch.cat([padding, warped.any().reshape(1).float()]).tolist()
        if not any_warped:
            return images
        x0, x1, y0, y1 = int(x0), int(x1), int(y0), int(y1)

        x = _mirror_pad(images, (x0, x1, y0, y1))
        x = upfirdn2d.upsample2d(x, self.Hz_geom, up=2)

        # Output grid at 2x: sample m sits at (m - extra + 0.5) / 2 - size / 2 output pixels from the centre.
        qx = (torch.arange(2 * (W + extra), dtype=dtype, device=device) - extra + 0.5) / 2 - W / 2
        qy = (torch.arange(2 * (H + extra), dtype=dtype, device=device) - extra + 0.5) / 2 - H / 2
        m = matrix.to(dtype)[:, :2, :, None, None]                # [N, 2, 3, 1, 1]
        src = m[:, :, 0] * qx.reshape(1, 1, 1, -1) + m[:, :, 1] * qy.reshape(1, 1, -1, 1) + m[:, :, 2]
        # To grid_sample's coordinates: -1 and +1 are the outer edges of the padded image.
        gx = (src[:, 0] + (W / 2 + x0)) * (2 / (W + x0 + x1)) - 1
        gy = (src[:, 1] + (H / 2 + y0)) * (2 / (H + y0 + y1)) - 1
        x = grid_sample_gradfix.grid_sample(x, torch.stack([gx, gy], dim=3))

        x = upfirdn2d.downsample2d(x, self.Hz_geom, down=2, padding=-extra, flip_filter=True)
        return torch.where(warped.reshape(N, 1, 1, 1), x, images)

    def _apply_color(self, images, matrix):
        """Stage 3: the affine RGB map of each sample; grey images go through it as (g, g, g)."""
        N, C, H, W = images.shape
        m = matrix.to(images.dtype)
        if C == 3:
            x = m[:, :3, :3] @ images.reshape(N, 3, H * W) + m[:, :3, 3:]
            return x.reshape(N, C, H, W)
        gain = m[:, :3, :3].sum(dim=2).mean(dim=1)
        offset = m[:, :3, 3].mean(dim=1)
        return images * gain.reshape(N, 1, 1, 1) + offset.reshape(N, 1, 1, 1)

    def _apply_filter(self, images, gains):
        """Stage 4: one zero-phase filter per sample, sum_i gain_i * band_i, applied along x and then y."""
        N, C, H, W = images.shape
        bank = self.Hz_fbank.to(images.dtype)
        taps = bank.shape[1]
        centre = taps // 2
        # The bands sum to the unit impulse, so writing the filter as impulse + sum_i (gain_i - 1) band_i
        # gives exactly the unit impulse, and an unchanged image, for a sample whose gains are all 1.
        impulse = torch.zeros([taps], dtype=images.dtype, device=images.device)
        impulse[centre] = 1
        f = (gains.to(images.dtype) - 1) @ bank + impulse       # [N, taps]
        f = f.repeat_interleave(C, dim=0)                       # [N * C, taps]
        x = _mirror_pad(images, (centre, centre, centre, centre))
        x = x.reshape(1, N * C, H + 2 * centre, W + 2 * centre)
        x = conv2d_gradfix.conv2d(x, f.reshape(N * C, 1, 1, taps), groups=N * C)
        x = conv2d_gradfix.conv2d(x, f.reshape(N * C, 1, taps, 1), groups=N * C)
        return x.reshape(N, C, H, W)

    def _apply_cutout(self, images, debug_percentile):
        """Stage 5b: zero a square of side cutout_size (as a fraction of width and height) at a random centre."""
        N, C, H, W = images.shape
        device = images.device
        size = torch.full([N], self.cutout_size, device=device)
        size = torch.where(self._gate(N, device, debug_percentile, self.cutout * self.p), size, 0)
        centre = _uniform([N, 2], device, debug_percentile)
        cols = (torch.arange(W, device=device) + 0.5) / W
        rows = (torch.arange(H, device=device) + 0.5) / H
        outside_x = (cols.reshape(1, 1, W) - centre[:, 0, None, None]).abs() >= size.reshape(N, 1, 1) / 2
        outside_y = (rows.reshape(1, H, 1) - centre[:, 1, None, None]).abs() >= size.reshape(N, 1, 1) / 2
        keep = (outside_x | outside_y).to(images.dtype)
        return images * keep.reshape(N, 1, H, W)

# ----------------------------------------------------------------------------
# Adaptive augmentation strength.


class AdaController:
    """Adjusts `augment_pipe.p` toward a target of the overfitting heuristic r_t = E[sign(D(real))] (Karras et
    al. 2020, Sec. 3): every `interval` steps, p moves by sign(r_t - target) times the images seen since the
    last adjustment over `kimg` thousand, so that p can go from 0 to 1 in `kimg` kimg; p never drops below 0.

    r_t is read from the statistic the loss reports (STAT_SIGNS_REAL), reduced over ranks by a
    training_stats.Collector. `flush()` moves what arrived since the last adjustment into `pending` (count, sum,
    sum of squares); `state_dict()` holds `pending`, so an interrupted and resumed run adjusts p exactly as the
    uninterrupted one. p itself is a buffer of the pipe and travels with it.

    Built by the training loop through dnnlib.util.construct_class_by_name (`class_name` =
    'training.augment.AdaController'), as the other components of a run are.
    """

    def __init__(self,
        augment_pipe,           # The AugmentPipe whose buffer `p` is adjusted in place.
        target      = 0.6,      # Target value of r_t = E[sign(D(real))].
        interval    = 4,        # Adjust p every N training steps.
        kimg        = 500,      # p can go from 0 to 1 in this many kimg.
        batch_size  = 64,       # Images per training step, all processes together.
    ):
        self.augment_pipe = augment_pipe
        self.target = target
        self.interval = interval
        self.kimg = kimg
        self.batch_size = batch_size
        # keep_previous=False: the tick's flush often comes right after an adjustment's flush, with no step in
        # between; that empty interval must add nothing, not the previous interval's signs a second time.
        self.collector = training_stats.Collector(regex=re.escape(STAT_SIGNS_REAL), keep_previous=False)
        self.pending = np.zeros(3)  # count, sum, sum of squares

    def flush(self) -> None:
        """Take in the signs reported so far (a collective in multi-process runs: every rank calls it)."""
        self.collector.update()
        # Only num/mean/std, the Collector methods the official training_stats has too (SPEC §7): this module's
        # source travels in snapshots. mean * count gives the sum back to within one rounding, which can only
        # matter if r_t equals the target exactly.
        count = self.collector.num(STAT_SIGNS_REAL)
        if count > 0:
            mean, std = self.collector.mean(STAT_SIGNS_REAL), self.collector.std(STAT_SIGNS_REAL)
            self.pending += np.array([count, mean * count, (std ** 2 + mean ** 2) * count])

    def step(self, batch_idx: int) -> None:
        """Called after every training step with the number of steps done; adjusts p every `interval` steps."""
        if batch_idx % self.interval != 0:
            return
        self.flush()
        count, total = self.pending[0], self.pending[1]
        self.pending = np.zeros(3)
        if count == 0:
            return
        adjust = np.sign(total / count - self.target) * (self.batch_size * self.interval) / (self.kimg * 1000)
        p = self.augment_pipe.p
        p.copy_((p + adjust).clamp(min=0))

    def state_dict(self) -> dict:
        """Plain floats, for the training state (read with torch.load(weights_only=True))."""
        return dict(pending=[float(v) for v in self.pending])

    def load_state_dict(self, state: dict) -> None:
        self.pending = np.asarray(state['pending'], dtype=np.float64)
