"""StyleGAN2 generator and discriminator, and the image squeeze connection of Park & Shin.

Class names, constructor keywords, attribute names and parameter/buffer names follow the public
StyleGAN2-ADA release, so that `misc.copy_params_and_buffers` moves weights between an official snapshot and
these classes, and so that snapshots written here look familiar. The numerics reproduce that release (see
`../shared/vectors`); everything below is written from the published formulas.

Synthesis blocks are looked up by architecture name in `SYNTHESIS_BLOCKS`: the three stock variants
(`orig`, `skip`, `resnet`) share the official `SynthesisBlock`; `squeeze` is `SqueezeSynthesisBlock`, the
generator block of "Rethinking Image Skip Connections in StyleGAN2" (Park & Shin, IEEE TNNLS 2025).

Precision: blocks marked `use_fp16` (the top `num_fp16_res` resolutions) compute in a reduced dtype, chosen by
the networks' `precision` keyword: 'fp16' (float16, the official behaviour and the default) or 'bf16'
(bfloat16). They do so only on a CUDA device (reduced-precision convolutions on the CPU are up to two orders of
magnitude slower, so off the GPU they run in float32), except inside the test-only `low_precision_on_cpu()`
context. Everything else (mapping, styles, demodulation coefficients, the image path, D's epilogue) stays in
float32. A float64 input makes every layer compute in float64, which is what lets the tests run `gradcheck`
over whole blocks.
"""

import contextlib
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence
from torch_utils.ops import bias_act, conv2d_resample, fma, upfirdn2d

# ----------------------------------------------------------------------------
# Functional building blocks.


@misc.profiled_function
def normalize_2nd_moment(x, dim=1, eps=1e-8):
    """Scale `x` to unit mean square along `dim` (the first step of the mapping network)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# Resolutions and widths: the one home of these rules. They live here because a snapshot embeds this file, which
# may import nothing of ours beyond SPEC §7; the dataset, the option builder and the tools import them from here.


def is_power_of_two(n) -> bool:
    """Whether `n` is an int among 1, 2, 4, 8, ...: the sizes a chain of 2x up/downsampling blocks passes."""
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def resolutions(low: int, high: int) -> list:
    """The powers of two low, 2 * low, ..., high, ascending (low and high powers of two)."""
    return [2 ** i for i in range(low.bit_length() - 1, high.bit_length())]


def lowest_fp16_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """The lowest resolution whose block is marked `use_fp16` when the `num_fp16_res` highest are (never 4)."""
    return max(2 ** (img_resolution.bit_length() - num_fp16_res), 8)


def feature_channels(res: int, channel_base: int, channel_max: int) -> int:
    """Channels of the features at resolution `res`: channel_base / res, at most channel_max (the official
    formula, shared by G and D, so that G's and D's features at one resolution have the same width)."""
    return min(channel_base // res, channel_max)


# The reduced dtypes a network's `precision` keyword can choose for its `use_fp16` blocks.
PRECISIONS = {
    'fp16': torch.float16,      # The official behaviour: needs conv_clamp and the pre-normalization below.
    'bf16': torch.bfloat16,     # float32's exponent range with an 8-bit mantissa: no overflow to guard against.
}

# Set only by `low_precision_on_cpu()`: lets `use_fp16` blocks compute in their reduced dtype on the CPU.
_low_precision_on_cpu = False


@contextlib.contextmanager
def low_precision_on_cpu(enabled: bool = True):
    """For tests only: inside this context, blocks marked `use_fp16` compute in their reduced dtype (float16 or
    bfloat16, see `PRECISIONS`) on the CPU as well, so that the casts, clamping, fp16 pre-normalization and
    channels-last handling of the GPU path run on a machine without one. Far too slow for real work.

    The flag is restored on exit. It applies to the classes of this module, which include networks unpickled
    from snapshots written by this very source; a snapshot that embeds other source (an official one, an older
    version of this file) runs that source's own module, which this context does not reach.
    """
    global _low_precision_on_cpu
    saved = _low_precision_on_cpu
    _low_precision_on_cpu = bool(enabled)
    try:
        yield
    finally:
        _low_precision_on_cpu = saved


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}; got {precision!r}')
    return precision


def _compute_dtype(use_fp16: bool, force_fp32: bool, ref: torch.Tensor, precision: str = 'fp16') -> torch.dtype:
    """The dtype a block computes in.

    float64 inputs stay float64 (gradchecks); the reduced dtype of `precision` only where it pays off, i.e.
    on a CUDA device (or on the CPU inside the test-only `low_precision_on_cpu()`).
    """
    if ref.dtype == torch.float64:
        return torch.float64
    if use_fp16 and not force_fp32 and ref.device.type == 'cuda':
        return PRECISIONS[precision]
    if use_fp16 and not force_fp32 and _low_precision_on_cpu:  # Tests only: see low_precision_on_cpu().
        return PRECISIONS[precision]
    return torch.float32


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Images and logits leave the networks in float32 (float64 when computing in float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(channels_last: bool, dtype: torch.dtype) -> torch.memory_format:
    # Channels-last pays off with the tensor cores of reduced precision only; it follows that decision.
    reduced = dtype in (torch.float16, torch.bfloat16)
    return torch.channels_last if channels_last and reduced else torch.contiguous_format


def _default_fused_modconv(training: bool, dtype: torch.dtype, batch_size: int) -> bool:
    """Fuse modulation into the weights in inference only: in training, the fused weight depends on the
    styles, and `no_weight_gradients()` (regularization passes) would then drop the style gradients too.
    In reduced precision (fp16 as in the official code, and bf16 alike, whose mantissa is shorter still) the
    fused per-sample weights lose precision, unless there is a single sample anyway."""
    with misc.suppress_tracer_warnings():
        return (not training) and (dtype == torch.float32 or int(batch_size) == 1)


def _prenormalize_fp16(weight, styles):
    """Rescale weight and styles before an fp16 modulated convolution so that the per-sample weights and the
    activations cannot overflow; demodulation removes any overall scale, so the result is unchanged.

    float16 only: its largest value is 65504. bfloat16 has float32's exponent range, so there is nothing to
    guard against, and since its rounding error is relative, rescaling would not make it more accurate either;
    skipping the step keeps bf16 one rounding of the float32 computation closer."""
    fan_in = weight[0].numel()
    weight = weight * (fan_in ** -0.5 / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
    styles = styles / styles.abs().amax(dim=1, keepdim=True)
    return weight, styles


@misc.profiled_function
def modulated_conv2d(
    x,                          # Input activations [batch, in_channels, height, width].
    weight,                     # Shared weight [out_channels, in_channels, kh, kw].
    styles,                     # Per-sample modulation [batch, in_channels].
    noise           = None,     # Noise added to the result: broadcastable to [batch, out_channels, H, W], or None.
    up              = 1,        # Integer upsampling factor.
    down            = 1,        # Integer downsampling factor.
    padding         = 0,        # Padding w.r.t. the upsampled image.
    resample_filter = None,     # FIR filter for resampling, from upfirdn2d.setup_filter().
    demodulate      = True,     # Normalize each output channel's per-sample weight to unit norm?
    flip_weight     = True,     # False = convolution (needed with up > 1), True = correlation.
    fused_modconv   = True,     # One grouped convolution with per-sample weights, or modulate the activations?
    fast_demod      = False,    # Demodulation coefficients from one small matmul (different rounding; below)?
):
    """StyleGAN2's modulated convolution (Karras et al. 2020, Eq. 1-3).

    The per-sample weight is w'[n,o,i] = weight[o,i] * styles[n,i], demodulated by
    d[n,o] = rsqrt(sum_(i,kh,kw) w'[n,o,i]^2 + 1e-8). The fused path builds w' for every sample and runs one
    grouped convolution; the other path scales the input by the styles, convolves with the shared weight and
    scales the output by d. Both are the same linear map.

    The official code (and this one by default) sums the squares of the per-sample weights themselves, even on
    the non-fused path, which needs no w' otherwise: at 512 channels that is a [batch, 512, 512, 3, 3] product,
    its square and, in training, their gradients, each as large as the batch's activations many times over.
    Since sum_(i,kh,kw) (weight[o,i] * styles[n,i])^2 = sum_i styles[n,i]^2 * sum_(kh,kw) weight[o,i]^2,
    `fast_demod` computes d with one [batch, in] x [in, out] matmul instead: the same coefficients up to float
    rounding (not bitwise the official numbers, so only when asked: train.py --fast-demod).
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    misc.assert_shape(weight, [out_channels, in_channels, kh, kw])
    misc.assert_shape(x, [batch_size, in_channels, None, None])
    misc.assert_shape(styles, [batch_size, in_channels])

    if x.dtype == torch.float16 and demodulate:  # Not for bfloat16: see _prenormalize_fp16.
        weight, styles = _prenormalize_fp16(weight, styles)

    dcoefs = None
    if fused_modconv or (demodulate and not fast_demod):
        sample_weight = weight.unsqueeze(0) * styles.reshape(batch_size, 1, in_channels, 1, 1)
    if demodulate and fast_demod:
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [batch, out_channels]
    elif demodulate:
        dcoefs = (sample_weight.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [batch, out_channels]

    if fused_modconv:
        return _fused_modconv(x, sample_weight, dcoefs, noise, up, down, padding, resample_filter, flip_weight)

    x = x * styles.to(x.dtype).reshape(batch_size, in_channels, 1, 1)
    x = conv2d_resample.conv2d_resample(x=x, w=weight.to(x.dtype), f=resample_filter, up=up, down=down,
                                        padding=padding, flip_weight=flip_weight)
    if dcoefs is not None:
        dcoefs = dcoefs.to(x.dtype).reshape(batch_size, out_channels, 1, 1)
        return fma.fma(x, dcoefs, noise.to(x.dtype)) if noise is not None else x * dcoefs
    return x.add_(noise.to(x.dtype)) if noise is not None else x


def _fused_modconv(x, sample_weight, dcoefs, noise, up, down, padding, resample_filter, flip_weight):
    """The fused path: fold the batch into the channel axis and run one grouped convolution."""
    batch_size, out_channels, in_channels, kh, kw = sample_weight.shape
    if dcoefs is not None:
        sample_weight = sample_weight * dcoefs.reshape(batch_size, out_channels, 1, 1, 1)
    x = x.reshape(1, batch_size * in_channels, *x.shape[2:])
    w = sample_weight.reshape(batch_size * out_channels, in_channels, kh, kw)
    x = conv2d_resample.conv2d_resample(x=x, w=w.to(x.dtype), f=resample_filter, up=up, down=down,
                                        padding=padding, groups=batch_size, flip_weight=flip_weight)
    x = x.reshape(batch_size, out_channels, *x.shape[2:])
    return x.add_(noise.to(x.dtype)) if noise is not None else x

# ----------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate: the weight is stored divided by `lr_multiplier` and used
    times lr_multiplier / sqrt(in_features), so all layers learn at the same speed under Adam."""

    def __init__(self,
        in_features,                # Number of input features.
        out_features,               # Number of output features.
        bias            = True,     # Add a bias?
        activation      = 'linear', # Activation function: a key of bias_act.activation_funcs.
        lr_multiplier   = 1,        # Learning-rate multiplier (0.01 in the mapping network).
        bias_init       = 0,        # Initial value of the bias (1 for the style affines).
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], np.float32(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x):
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == 'linear' and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self):
        return f'in_features={self.in_features:d}, out_features={self.out_features:d}, activation={self.activation:s}'


@persistence.persistent_class
class Conv2dLayer(torch.nn.Module):
    """Convolution with equalized learning rate, optional FIR up/downsampling, bias, activation and clamp."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        kernel_size,                    # Width and height of the kernel.
        bias            = True,         # Add a bias?
        activation      = 'linear',     # Activation function: a key of bias_act.activation_funcs.
        up              = 1,            # Integer upsampling factor.
        down            = 1,            # Integer downsampling factor.
        resample_filter = (1, 3, 3, 1), # Low-pass filter applied when resampling.
        conv_clamp      = None,         # Clamp the output to +-X, None = no clamping.
        channels_last   = False,        # Store the weight in channels-last layout?
        trainable       = True,         # Parameters (True) or frozen buffers (False)?
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))
        self.act_gain = bias_act.activation_funcs[activation].def_gain

        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size]).to(memory_format=memory_format)
        bias = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(bias) if bias is not None else None
        else:
            self.register_buffer('weight', weight)
            self.register_buffer('bias', bias)

    def forward(self, x, gain=1):
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = conv2d_resample.conv2d_resample(x=x, w=w.to(x.dtype), f=self.resample_filter, up=self.up,
                                            down=self.down, padding=self.padding, flip_weight=(self.up == 1))
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self):
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, '
                f'activation={self.activation:s}, up={self.up}, down={self.down}')

# ----------------------------------------------------------------------------
# Mapping network.


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    """z (and an optional label c) -> w, broadcast to `num_ws` rows, with optional truncation toward w_avg.

    Also serves as D's label embedding (z_dim = 0, num_ws = None, no w_avg).
    """

    def __init__(self,
        z_dim,                      # Input latent (Z) dimensionality, 0 = no latent.
        c_dim,                      # Conditioning label (C) dimensionality, 0 = no label.
        w_dim,                      # Intermediate latent (W) dimensionality.
        num_ws,                     # Number of intermediate latents to output, None = do not broadcast.
        num_layers      = 8,        # Number of mapping layers.
        embed_features  = None,     # Label embedding dimensionality, None = same as w_dim.
        layer_features  = None,     # Number of intermediate features in the mapping layers, None = same as w_dim.
        activation      = 'lrelu',  # Activation function: a key of bias_act.activation_funcs.
        lr_multiplier   = 0.01,     # Learning-rate multiplier of the mapping layers.
        w_avg_beta      = 0.995,    # Decay of the running average of W during training, None = do not track.
    ):
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f'fc{idx}', layer)

        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer('w_avg', torch.zeros([w_dim]))

    def _embed_inputs(self, z, c):
        """Normalized z and normalized label embedding, concatenated in that order."""
        # The parameters' dtype (float64 in gradchecks). D's label embedding may have no mapping layers (as in
        # StyleGAN2-ADA TensorFlow discriminators): then the embedding is the first layer.
        first = self.fc0 if self.num_layers > 0 else getattr(self, 'embed', None)
        dtype = first.weight.dtype if first is not None else torch.float32
        parts = []
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim])
            parts.append(normalize_2nd_moment(z.to(dtype)))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim])
            parts.append(normalize_2nd_moment(self.embed(c.to(dtype))))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False):
        with torch.autograd.profiler.record_function('input'):
            x = self._embed_inputs(z, c)
        for idx in range(self.num_layers):
            x = getattr(self, f'fc{idx}')(x)

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.autograd.profiler.record_function('update_w_avg'):
                # w_avg <- mean + beta * (w_avg - mean): an exponential moving average of the batch means.
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            with torch.autograd.profiler.record_function('broadcast'):
                x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            x = self._truncate(x, truncation_psi, truncation_cutoff)
        return x

    def _truncate(self, x, psi, cutoff):
        """The truncation trick: pull w toward w_avg, on the first `cutoff` rows only if given."""
        if self.w_avg_beta is None or self.num_ws is None:
            raise ValueError('Truncation needs a mapping network that tracks w_avg and broadcasts to num_ws rows')
        with torch.autograd.profiler.record_function('truncate'):
            w_avg = self.w_avg.to(x.dtype)
            if cutoff is None:
                return w_avg.lerp(x, psi)
            x = x.clone()
            x[:, :cutoff] = w_avg.lerp(x[:, :cutoff], psi)
            return x

    def extra_repr(self):
        return f'z_dim={self.z_dim:d}, c_dim={self.c_dim:d}, w_dim={self.w_dim:d}, num_ws={self.num_ws}'

# ----------------------------------------------------------------------------
# Synthesis layers.


@persistence.persistent_class
class SynthesisLayer(torch.nn.Module):
    """Style-modulated, demodulated convolution + per-pixel noise + bias + activation + clamp."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        w_dim,                          # Intermediate latent (W) dimensionality.
        resolution,                     # Resolution of this layer's output.
        kernel_size     = 3,            # Convolution kernel size.
        up              = 1,            # Integer upsampling factor.
        use_noise       = True,         # Enable noise input?
        activation      = 'lrelu',      # Activation function: a key of bias_act.activation_funcs.
        resample_filter = (1, 3, 3, 1), # Low-pass filter applied when resampling.
        conv_clamp      = None,         # Clamp the output to +-X, None = no clamping.
        channels_last   = False,        # Store the weight in channels-last layout?
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = bias_act.activation_funcs[activation].def_gain

        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        self.weight = torch.nn.Parameter(weight.to(memory_format=memory_format))
        if use_noise:
            self.register_buffer('noise_const', torch.randn([resolution, resolution]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def _noise(self, x, noise_mode):
        if noise_mode not in ('random', 'const', 'none'):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        if not self.use_noise or noise_mode == 'none':
            return None
        if noise_mode == 'const':
            return self.noise_const * self.noise_strength
        shape = [x.shape[0], 1, self.resolution, self.resolution]
        return torch.randn(shape, device=x.device, dtype=self.noise_strength.dtype) * self.noise_strength

    def forward(self, x, w, noise_mode='random', fused_modconv=True, gain=1, fast_demod=False):
        in_resolution = self.resolution // self.up
        misc.assert_shape(x, [None, self.in_channels, in_resolution, in_resolution])
        styles = self.affine(w)
        x = modulated_conv2d(x=x, weight=self.weight, styles=styles, noise=self._noise(x, noise_mode), up=self.up,
                             padding=self.padding, resample_filter=self.resample_filter,
                             flip_weight=(self.up == 1), fused_modconv=fused_modconv, fast_demod=fast_demod)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self):
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, '
                f'resolution={self.resolution:d}, up={self.up}, activation={self.activation:s}')


@persistence.persistent_class
class ToRGBLayer(torch.nn.Module):
    """Modulated convolution to image channels without demodulation: a linear map of the features."""

    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of image channels.
        w_dim,                      # Intermediate latent (W) dimensionality.
        kernel_size     = 1,        # Convolution kernel size.
        conv_clamp      = None,     # Clamp the output to +-X, None = no clamping.
        channels_last   = False,    # Store the weight in channels-last layout?
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        self.weight = torch.nn.Parameter(weight.to(memory_format=memory_format))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        # Without demodulation the equalized-learning-rate gain has to go somewhere: into the styles.
        self.weight_gain = 1 / np.sqrt(in_channels * (kernel_size ** 2))

    def forward(self, x, w, fused_modconv=True):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x=x, weight=self.weight, styles=styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)

    def extra_repr(self):
        return f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}'

# ----------------------------------------------------------------------------
# Synthesis blocks.


class BlockOption(NamedTuple):
    """A user option of a synthesis block. train.py turns each into the flag `--<name with - for _>`, checks
    that it is given only with an architecture whose block declares it, passes it to the block as `kwarg`
    and adds `desc` to the run name. A flat table entry, so that a new block brings its flags with it."""
    name:       str                     # Option name, e.g. 'squeeze_r' (the flag --squeeze-r).
    type:       type                    # int, float, bool or str.
    default:    Any                     # The value when the flag is not given.
    help:       str                     # Help text of the flag.
    kwarg:      Optional[str] = None    # Block constructor keyword it sets; None = `name`.
    invert:     bool = False            # A bool option that sets its keyword to `not value` (--x-noblend).
    choices:    tuple = ()              # The allowed values of a str option; () = any.
    min:        Optional[float] = None  # The smallest allowed value of a number; None = no bound.
    desc:       Optional[str] = None    # Run-name piece, a format string of `value` (e.g. '-r{value}').
    desc_always: bool = False           # Add the piece also for the default value (otherwise only when not).

    @property
    def block_kwarg(self) -> str:
        return self.kwarg or self.name

    def block_value(self, value: Any) -> Any:
        return (not value) if self.invert else value

    def desc_piece(self, value: Any) -> str:
        if self.desc is None or (value == self.default and not self.desc_always):
            return ''
        return self.desc.format(value=value)


class _SynthesisBlockBase(torch.nn.Module):
    """What every synthesis block shares: the block contract and the input/precision handling.

    Contract (checked for every registered block by the tests): a block has `in_channels`, `out_channels`,
    `resolution`, `img_channels`, `is_last`, `num_conv`, `num_torgb`; `forward(x, img, ws, ...)` takes
    `ws` of shape [batch, num_conv + num_torgb, w_dim] (convs first, then toRGB) and returns `(x, img)`,
    where img is None or [batch, img_channels, resolution, resolution] in float32.
    """

    # User options of this block (train.py makes them flags) and the constructor keywords they set, which only
    # this block class understands (SynthesisNetwork checks them).
    user_options = ()
    block_options = ()

    def _setup_common(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, resample_filter,
                      conv_clamp, use_fp16, fp16_channels_last, precision):
        if in_channels == 0 and resolution != 4:
            raise ValueError(f'Only the 4x4 block can start from the constant input, not the {resolution}x{resolution} one')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.use_fp16 = use_fp16
        self.precision = _check_precision(precision)
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))

    def _layer_kwargs(self, w_dim, resolution, conv_clamp, layer_kwargs):
        return dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, channels_last=self.channels_last,
                    **layer_kwargs)

    def _prepare(self, x, ws, force_fp32, fused_modconv):
        """Check the inputs; return (x in the compute dtype/layout, dtype, fused_modconv)."""
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        dtype = _compute_dtype(self.use_fp16, force_fp32, ws, self.precision)
        memory_format = _memory_format(self.channels_last, dtype)
        if fused_modconv is None:
            fused_modconv = _default_fused_modconv(self.training, dtype, ws.shape[0])
        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution // 2, self.resolution // 2])
            x = x.to(dtype=dtype, memory_format=memory_format)
        return x, dtype, fused_modconv

    def _add_rgb(self, img, rgb, dtype):
        """img <- upsample(img) + rgb, where either may be None (no image yet / no toRGB in this block); the
        image path stays in float32 whatever the block computes in."""
        out_dtype = _output_dtype(dtype)
        if img is not None:
            misc.assert_shape(img, [None, self.img_channels, self.resolution // 2, self.resolution // 2])
            img = upfirdn2d.upsample2d(img.to(out_dtype), self.resample_filter)
        if rgb is None:
            return img
        rgb = rgb.to(dtype=out_dtype, memory_format=torch.contiguous_format)
        return rgb if img is None else img.add_(rgb)

    def extra_repr(self):
        return (f'resolution={self.resolution:d}, in_channels={self.in_channels:d}, '
                f'out_channels={self.out_channels:d}, is_last={self.is_last}, use_fp16={self.use_fp16}'
                + (f', precision={self.precision}' if self.use_fp16 else ''))


@persistence.persistent_class
class SynthesisBlock(_SynthesisBlockBase):
    """The stock StyleGAN2 block: [upsampling conv0] -> conv1, with an `orig`, `skip` or `resnet` image path.

    `skip` (the StyleGAN2 default) sums toRGB outputs over resolutions; `orig` has toRGB only in the last
    block; `resnet` adds a learned 1x1 upsampling shortcut around the two convolutions.
    """

    def __init__(self,
        in_channels,                        # Number of input channels, 0 = first block.
        out_channels,                       # Number of output channels.
        w_dim,                              # Intermediate latent (W) dimensionality.
        resolution,                         # Resolution of this block.
        img_channels,                       # Number of output color channels.
        is_last,                            # Is this the last block?
        architecture        = 'skip',       # Architecture: 'orig', 'skip', 'resnet'.
        resample_filter     = (1, 3, 3, 1), # Low-pass filter applied when resampling.
        conv_clamp          = None,         # Clamp the output of convolution layers to +-X, None = no clamping.
        use_fp16            = False,        # Compute in the reduced `precision` (on CUDA devices)?
        fp16_channels_last  = False,        # Use channels-last memory format in the reduced precision?
        precision           = 'fp16',       # Reduced dtype of use_fp16: 'fp16' (float16) or 'bf16' (bfloat16).
        **layer_kwargs,                     # Arguments for SynthesisLayer.
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f"SynthesisBlock architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self._setup_common(in_channels, out_channels, w_dim, resolution, img_channels, is_last, resample_filter,
                           conv_clamp, use_fp16, fp16_channels_last, precision)
        self.architecture = architecture
        kwargs = self._layer_kwargs(w_dim, resolution, conv_clamp, layer_kwargs)

        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, resample_filter=resample_filter, **kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **kwargs)
        self.num_conv += 1
        if is_last or architecture == 'skip':
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == 'resnet':
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, **layer_kwargs):
        x, dtype, fused_modconv = self._prepare(x, ws, force_fp32, fused_modconv)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5), **layer_kwargs)
            x = y.add_(x)
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        rgb = self.torgb(x, next(w_iter), fused_modconv=fused_modconv) if self.num_torgb else None
        img = self._add_rgb(img, rgb, dtype)
        assert x.dtype == dtype
        return x, img


# Where toRGB of a squeeze block reads from (paper Fig. 6): the squeezed feature f_s (the method), or, as
# ablations, the upsampled feature f_i (Fig. 6b) or the excited feature f_e (Fig. 6c).
SQUEEZE_TORGB_SOURCES = ('squeeze', 'conv0', 'excite')


@persistence.persistent_class
class SqueezeSynthesisBlock(_SynthesisBlockBase):
    """The image squeeze connection (Park & Shin, "Rethinking Image Skip Connections in StyleGAN2").

    In the `skip` generator toRGB is linear and so is upsampling, so the final image is a single 1x1
    projection of the concatenated modulated features of all blocks (paper Eq. 5-7): thousands of channels
    mapped to three by one linear layer. This block gives toRGB a low-dimensional squeezed feature instead:

        f_i = conv0(x)              3x3, 2x upsampling, c_in -> c
        f_s = squeeze(f_i)          3x3, c -> q,  q = max(1, c_in // r)
        img = up(img) + toRGB(f_s)  1x1, q -> img_channels, not demodulated
        f_e = excite(f_s)           3x3, q -> c
        f_o = blend([f_i, f_e])     1x1, 2c -> c   ("feature blending"; passed to the next block)

    Every convolution except toRGB is a full SynthesisLayer (style, (de)modulation, noise, bias, lrelu, clamp).
    The 4x4 block is the stock constant + conv1 with no toRGB: the image path starts at 8x8. The last block
    stops after the layer that feeds toRGB, since anything after it would feed nothing (and unused
    parameters break DistributedDataParallel).

    W rows: the convs take one row each in the order conv0, squeeze, excite, blend (those present), toRGB
    takes the row after them, which is the first row of the next block, as in the stock generator.

    Ablations (off by default): `squeeze_blend=False` passes f_e on instead of the blend (Fig. 6a);
    `squeeze_torgb='conv0'` / `'excite'` feed toRGB from f_i / f_e (Fig. 6b / 6c), with c input channels.
    """

    user_options = (
        BlockOption('squeeze_r', int, 8, 'Squeeze ratio r: toRGB reads max(1, c_in // r) channels', min=1,
                    desc='-r{value}', desc_always=True),
        BlockOption('squeeze_noblend', bool, False, 'Ablation: no feature blending, pass f_e on (Fig. 6a)',
                    kwarg='squeeze_blend', invert=True, desc='-noblend'),
        BlockOption('squeeze_torgb', str, 'squeeze', 'Ablation: the features toRGB reads (Fig. 6b, 6c)',
                    choices=SQUEEZE_TORGB_SOURCES, desc='-torgb{value}'),
    )
    block_options = tuple(option.block_kwarg for option in user_options)

    def __init__(self,
        in_channels,                        # Number of input channels c_in, 0 = first (4x4) block.
        out_channels,                       # Number of output channels c.
        w_dim,                              # Intermediate latent (W) dimensionality.
        resolution,                         # Resolution of this block.
        img_channels,                       # Number of output color channels.
        is_last,                            # Is this the last block?
        architecture        = 'squeeze',    # Registry name; must be 'squeeze'.
        squeeze_r           = 8,            # Squeeze ratio r: f_s has max(1, c_in // r) channels.
        squeeze_blend       = True,         # Feature blending f_o = blend([f_i, f_e]); False: f_o = f_e.
        squeeze_torgb       = 'squeeze',    # toRGB input: 'squeeze' (f_s), 'conv0' (f_i) or 'excite' (f_e).
        resample_filter     = (1, 3, 3, 1), # Low-pass filter applied when resampling.
        conv_clamp          = None,         # Clamp the output of convolution layers to +-X, None = no clamping.
        use_fp16            = False,        # Compute in the reduced `precision` (on CUDA devices)?
        fp16_channels_last  = False,        # Use channels-last memory format in the reduced precision?
        precision           = 'fp16',       # Reduced dtype of use_fp16: 'fp16' (float16) or 'bf16' (bfloat16).
        **layer_kwargs,                     # Arguments for SynthesisLayer.
    ):
        if architecture != 'squeeze':
            raise ValueError(f"SqueezeSynthesisBlock is the 'squeeze' architecture, got {architecture!r}")
        if not isinstance(squeeze_r, int) or isinstance(squeeze_r, bool) or squeeze_r < 1:
            raise ValueError(f'squeeze_r must be a positive integer, got {squeeze_r!r}')
        if squeeze_torgb not in SQUEEZE_TORGB_SOURCES:
            raise ValueError(f'squeeze_torgb must be one of {", ".join(SQUEEZE_TORGB_SOURCES)}; got {squeeze_torgb!r}')
        if in_channels == 0 and is_last:
            raise ValueError('The squeeze generator needs img_resolution >= 8: its image path starts at 8x8')
        super().__init__()
        self._setup_common(in_channels, out_channels, w_dim, resolution, img_channels, is_last, resample_filter,
                           conv_clamp, use_fp16, fp16_channels_last, precision)
        self.architecture = architecture
        self.squeeze_r = squeeze_r
        self.squeeze_blend = bool(squeeze_blend)
        self.squeeze_torgb = squeeze_torgb
        self.squeeze_channels = max(1, in_channels // squeeze_r) if in_channels else 0
        kwargs = self._layer_kwargs(w_dim, resolution, conv_clamp, layer_kwargs)

        if in_channels == 0:
            self.conv1 = SynthesisLayer(out_channels, out_channels, **kwargs)
            self.layer_names = ['conv1']
        else:
            self.layer_names = self._squeeze_layer_names()
            self._build_squeeze_layers(resample_filter, kwargs)
            torgb_channels = self.squeeze_channels if squeeze_torgb == 'squeeze' else out_channels
            self.torgb = ToRGBLayer(torgb_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb = 1
        self.num_conv = len(self.layer_names)

    def _squeeze_layer_names(self):
        """The convolutions this block needs: all four, minus what feeds nothing in the last block."""
        names = ['conv0', 'squeeze', 'excite'] + (['blend'] if self.squeeze_blend else [])
        if self.is_last:
            names = names[:names.index(self.squeeze_torgb) + 1]
        return names

    def _build_squeeze_layers(self, resample_filter, kwargs):
        c, q = self.out_channels, self.squeeze_channels
        shapes = dict(
            conv0   = dict(in_channels=self.in_channels, out_channels=c, up=2, resample_filter=resample_filter),
            squeeze = dict(in_channels=c, out_channels=q),
            excite  = dict(in_channels=q, out_channels=c),
            blend   = dict(in_channels=2 * c, out_channels=c, kernel_size=1),
        )
        for name in self.layer_names:
            setattr(self, name, SynthesisLayer(**shapes[name], **kwargs))

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, **layer_kwargs):
        x, dtype, fused_modconv = self._prepare(x, ws, force_fp32, fused_modconv)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            return x, img

        features = dict()
        for name in self.layer_names:
            layer_input = torch.cat([features['conv0'], features['excite']], dim=1) if name == 'blend' else x
            x = getattr(self, name)(layer_input, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            features[name] = x

        # toRGB is linear (no demodulation), so the image is a projection of the low-dimensional f_s only
        # (paper Eq. 8) rather than of every block's full feature map (Eq. 7).
        rgb = self.torgb(features[self.squeeze_torgb], next(w_iter), fused_modconv=fused_modconv)
        img = self._add_rgb(img, rgb, dtype)
        assert x.dtype == dtype
        return x, img

    def extra_repr(self):
        return (super().extra_repr() + f', squeeze_r={self.squeeze_r}, squeeze_channels={self.squeeze_channels}, '
                f'layers={"+".join(self.layer_names)}, torgb_from={self.squeeze_torgb}')


# Architecture name -> synthesis block class. `train.py --arch` offers exactly these names.
SYNTHESIS_BLOCKS = {
    'orig':     SynthesisBlock,
    'skip':     SynthesisBlock,
    'resnet':   SynthesisBlock,
    'squeeze':  SqueezeSynthesisBlock,
}


def synthesis_block_class(architecture: str) -> type:
    """The block class registered for `architecture`, or a ValueError listing the valid names."""
    block_class = SYNTHESIS_BLOCKS.get(architecture)
    if block_class is None:
        raise ValueError(f'Unknown synthesis architecture {architecture!r}; valid choices: '
                         f'{", ".join(SYNTHESIS_BLOCKS)}')
    return block_class


def synthesis_block_options() -> dict:
    """The user options of every registered block: name -> (BlockOption, names of the architectures whose
    block declares it), in registry order. Read at call time, so a block registered later is included."""
    options = dict()
    for architecture, block_class in SYNTHESIS_BLOCKS.items():
        for option in block_class.user_options:
            known, owners = options.get(option.name, (option, ()))
            assert known == option, f'Two blocks declare the option {option.name!r} differently'
            options[option.name] = (option, owners + (architecture,))
    return options


def _check_block_options(architecture: str, block_kwargs: dict) -> None:
    """Reject options meant for another block type (e.g. squeeze_r with architecture='skip')."""
    own = set(synthesis_block_class(architecture).block_options)
    for name in block_kwargs:
        owners = [arch for arch, cls in SYNTHESIS_BLOCKS.items() if name in cls.block_options]
        if owners and name not in own:
            raise ValueError(f'{name}={block_kwargs[name]!r} applies to architecture {owners[0]!r} only, '
                             f'not to {architecture!r}')

# ----------------------------------------------------------------------------
# Synthesis network and generator.


@persistence.persistent_class
class SynthesisNetwork(torch.nn.Module):
    """ws [batch, num_ws, w_dim] -> image, through one block per resolution 4, 8, ..., img_resolution."""

    def __init__(self,
        w_dim,                      # Intermediate latent (W) dimensionality.
        img_resolution,             # Output image resolution (a power of two, >= 4).
        img_channels,               # Number of color channels.
        channel_base    = 32768,    # Overall multiplier for the number of channels.
        channel_max     = 512,      # Maximum number of channels in any layer.
        num_fp16_res    = 0,        # Use the reduced precision (on CUDA) for the N highest resolutions.
        architecture    = 'skip',   # Block type: a key of SYNTHESIS_BLOCKS.
        precision       = 'fp16',   # Reduced dtype of those resolutions: 'fp16' (float16) or 'bf16' (bfloat16).
        **block_kwargs,             # Arguments for the block class (conv_clamp, squeeze_r, ...).
    ):
        if not is_power_of_two(img_resolution) or img_resolution < 4:
            raise ValueError(f'img_resolution must be a power of two >= 4, got {img_resolution!r}')
        block_class = synthesis_block_class(architecture)
        _check_block_options(architecture, block_kwargs)
        _check_precision(precision)
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.architecture = architecture
        self.precision = precision
        self.block_resolutions = resolutions(4, img_resolution)
        channels_dict = {res: feature_channels(res, channel_base, channel_max) for res in self.block_resolutions}
        fp16_resolution = lowest_fp16_resolution(img_resolution, num_fp16_res)

        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels_dict[res // 2] if res > 4 else 0
            is_last = (res == self.img_resolution)
            block = block_class(in_channels, channels_dict[res], w_dim=w_dim, resolution=res,
                                img_channels=img_channels, is_last=is_last, use_fp16=(res >= fp16_resolution),
                                architecture=architecture, precision=precision, **block_kwargs)
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f'b{res}', block)

    def block_ws(self, ws):
        """Split ws into each block's rows; consecutive blocks share one row (toRGB / next conv0)."""
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        return self._split_rows(ws, self.block_resolutions)

    def _split_rows(self, ws, resolutions):
        """The rows of ws for each block of `resolutions` (consecutive ones), from the first row of ws on."""
        result, w_idx = [], 0
        for res in resolutions:
            block = getattr(self, f'b{res}')
            result.append(ws.narrow(1, w_idx, block.num_conv + block.num_torgb))
            w_idx += block.num_conv
        return result

    def forward(self, ws, return_features=None, **block_kwargs):
        """ws -> img; with `return_features` (resolutions), (img, {res: the feature that block res passes to the
        next block, in float32}). Only the requested features are kept, and the image is the same either way."""
        with torch.autograd.profiler.record_function('split_ws'):
            all_ws = self.block_ws(ws)
        wanted = self._check_feature_resolutions(return_features)
        x = img = None
        features = dict()
        for res, cur_ws in zip(self.block_resolutions, all_ws, strict=True):
            x, img = getattr(self, f'b{res}')(x, img, cur_ws, **block_kwargs)
            if res in wanted:
                features[res] = x.to(torch.float32)  # A target for another network: full precision.
        return img if return_features is None else (img, features)

    def _check_feature_resolutions(self, resolutions):
        wanted = set(resolutions or ())
        unknown = sorted(wanted - set(self.block_resolutions))
        if unknown:
            raise ValueError(f'SynthesisNetwork has no block at resolution {unknown[0]}; its blocks: '
                             f'{", ".join(map(str, self.block_resolutions))}')
        return wanted

    def tail_resolutions(self, above_res):
        """The resolutions of the blocks above `above_res`, those that `forward_from(above_res, ...)` runs."""
        if above_res not in self.block_resolutions or above_res == self.img_resolution:
            raise ValueError(f'forward_from needs a block resolution below {self.img_resolution}, got {above_res!r}')
        return [res for res in self.block_resolutions if res > above_res]

    def tail_num_ws(self, above_res):
        """How many rows of ws the blocks above `above_res` consume (GLeaD repeats one predicted w that often):
        the rows from their first conv onwards, as block_ws assigns them."""
        first = self.tail_resolutions(above_res)[0]
        w_idx = sum(getattr(self, f'b{res}').num_conv for res in self.block_resolutions if res < first)
        return self.num_ws - w_idx

    def forward_from(self, above_res, x, img, ws, **block_kwargs):
        """Run only the blocks above `above_res`, from a given feature x [N, C, above_res, above_res] and image
        img (or None) at that resolution; ws [N, tail_num_ws(above_res), w_dim] are the rows those blocks
        consume. With the x, img and ws rows of a full forward pass this gives the same image (GLeaD runs G's
        upper blocks on what its discriminator predicts)."""
        resolutions = self.tail_resolutions(above_res)
        misc.assert_shape(ws, [None, self.tail_num_ws(above_res), self.w_dim])
        for res, block_ws in zip(resolutions, self._split_rows(ws, resolutions), strict=True):
            x, img = getattr(self, f'b{res}')(x, img, block_ws, **block_kwargs)
        return img

    def extra_repr(self):
        return (f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_resolution={self.img_resolution:d}, '
                f'img_channels={self.img_channels:d}, architecture={self.architecture}')


@persistence.persistent_class
class Generator(torch.nn.Module):
    """z, c -> image: the mapping network followed by the synthesis network."""

    def __init__(self,
        z_dim,                      # Input latent (Z) dimensionality.
        c_dim,                      # Conditioning label (C) dimensionality, 0 = unconditional.
        w_dim,                      # Intermediate latent (W) dimensionality.
        img_resolution,             # Output resolution.
        img_channels,               # Number of output color channels.
        mapping_kwargs      = None, # Arguments for MappingNetwork (None = defaults).
        synthesis_kwargs    = None, # Arguments for SynthesisNetwork (architecture, squeeze_r, channel_base, ...).
    ):
        mapping_kwargs = dict(mapping_kwargs or {})
        synthesis_kwargs = dict(synthesis_kwargs or {})
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, skip_w_avg_update=False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          skip_w_avg_update=skip_w_avg_update)
        return self.synthesis(ws, **synthesis_kwargs)

# ----------------------------------------------------------------------------
# Discriminator.


@persistence.persistent_class
class DiscriminatorBlock(torch.nn.Module):
    """[fromRGB] -> conv0 -> downsampling conv1, with an `orig`, `skip` or `resnet` path."""

    def __init__(self,
        in_channels,                        # Number of input channels, 0 = first block.
        tmp_channels,                       # Number of intermediate channels.
        out_channels,                       # Number of output channels.
        resolution,                         # Resolution of this block.
        img_channels,                       # Number of input color channels.
        first_layer_idx,                    # Index of the first layer (for freezing the first layers).
        architecture        = 'resnet',     # Architecture: 'orig', 'skip', 'resnet'.
        activation          = 'lrelu',      # Activation function: a key of bias_act.activation_funcs.
        resample_filter     = (1, 3, 3, 1), # Low-pass filter applied when resampling.
        conv_clamp          = None,         # Clamp the output of convolution layers to +-X, None = no clamping.
        use_fp16            = False,        # Compute in the reduced `precision` (on CUDA devices)?
        fp16_channels_last  = False,        # Use channels-last memory format in the reduced precision?
        freeze_layers       = 0,            # Freeze the first layers (--freezed): layers below this index.
        precision           = 'fp16',       # Reduced dtype of use_fp16: 'fp16' (float16) or 'bf16' (bfloat16).
    ):
        if in_channels not in (0, tmp_channels):
            raise ValueError(f'DiscriminatorBlock in_channels must be 0 or tmp_channels ({tmp_channels}), got {in_channels}')
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f"Discriminator architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.first_layer_idx = first_layer_idx
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.precision = _check_precision(precision)
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))

        self.num_layers = 0

        def trainable():
            # Layers are numbered across the whole discriminator; the first `freeze_layers` stay frozen.
            idx = self.first_layer_idx + self.num_layers
            self.num_layers += 1
            return idx >= freeze_layers

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == 'resnet':
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x, img, force_fp32=False):
        dtype = _compute_dtype(self.use_fp16, force_fp32, x if x is not None else img, self.precision)
        memory_format = _memory_format(self.channels_last, dtype)
        if x is not None:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0 or self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = upfirdn2d.downsample2d(img, self.resample_filter) if self.architecture == 'skip' else None

        if self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            x = y.add_(x)
        else:
            x = self.conv1(self.conv0(x))
        assert x.dtype == dtype
        return x, img

    def extra_repr(self):
        return (f'resolution={self.resolution:d}, architecture={self.architecture:s}, use_fp16={self.use_fp16}'
                + (f', precision={self.precision}' if self.use_fp16 else ''))


@persistence.persistent_class
class MinibatchStdLayer(torch.nn.Module):
    """Append the standard deviation across groups of samples as extra feature maps (Karras et al. 2018).

    The batch is viewed as [G, N/G, ...]: sample i belongs to group i mod (N/G), so groups are strided.
    """

    def __init__(self,
        group_size,                 # Samples per group, None = the whole batch.
        num_channels    = 1,        # Number of statistics channels appended.
    ):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x):
        N, C, H, W = x.shape
        with misc.suppress_tracer_warnings():
            G = min(int(self.group_size), int(N)) if self.group_size is not None else int(N)
        F = self.num_channels
        if N % G != 0:
            raise ValueError(f'MinibatchStdLayer: batch size {N} is not divisible by the group size {G}')
        if C % F != 0:
            raise ValueError(f'MinibatchStdLayer: {C} channels cannot be split into {F} statistics groups')
        y = x.reshape(G, -1, F, C // F, H, W)         # [group member, group, stat, channel, H, W]
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # Biased variance over the members of each group.
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])     # [group, stat]: mean std over channels and pixels.
        y = y.reshape(-1, F, 1, 1).repeat(G, 1, H, W)  # Back to one row per sample (row i -> group i mod N/G).
        return torch.cat([x, y], dim=1)

    def extra_repr(self):
        return f'group_size={self.group_size}, num_channels={self.num_channels:d}'


@persistence.persistent_class
class DiscriminatorEpilogue(torch.nn.Module):
    """The 4x4 head: minibatch std -> conv -> fc -> out, with a projection onto cmap when conditional."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        cmap_dim,                       # Dimensionality of the mapped conditioning label, 0 = unconditional.
        resolution,                     # Resolution of this block (4).
        img_channels,                   # Number of input color channels.
        architecture        = 'resnet', # Architecture: 'orig', 'skip', 'resnet'.
        mbstd_group_size    = 4,        # Group size for the minibatch std layer, None = entire minibatch.
        mbstd_num_channels  = 1,        # Number of features for the minibatch std layer, 0 = disable.
        activation          = 'lrelu',  # Activation function: a key of bias_act.activation_funcs.
        conv_clamp          = None,     # Clamp the output of convolution layers to +-X, None = no clamping.
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f"Discriminator architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture

        if architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * (resolution ** 2), in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, img, cmap, force_fp32=False):
        del force_fp32  # The head always runs in full precision.
        misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])
        dtype = _output_dtype(x.dtype)
        x = x.to(dtype=dtype, memory_format=torch.contiguous_format)
        if self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
            x = x + self.fromrgb(img.to(dtype=dtype, memory_format=torch.contiguous_format))

        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)

        if self.cmap_dim > 0:
            misc.assert_shape(cmap, [None, self.cmap_dim])
            # Projection discriminator (Miyato & Koyama 2018): the score is <out, embedding of the label>.
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        assert x.dtype == dtype
        return x

    def extra_repr(self):
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}'


@persistence.persistent_class
class Discriminator(torch.nn.Module):
    """image, c -> logit: one block per resolution img_resolution, ..., 8, then the 4x4 epilogue."""

    def __init__(self,
        c_dim,                          # Conditioning label (C) dimensionality, 0 = unconditional.
        img_resolution,                 # Input resolution (a power of two, >= 4).
        img_channels,                   # Number of input color channels.
        architecture        = 'resnet', # Architecture: 'orig', 'skip', 'resnet'.
        channel_base        = 32768,    # Overall multiplier for the number of channels.
        channel_max         = 512,      # Maximum number of channels in any layer.
        num_fp16_res        = 0,        # Use the reduced precision (on CUDA) for the N highest resolutions.
        conv_clamp          = None,     # Clamp the output of convolution layers to +-X, None = no clamping.
        cmap_dim            = None,     # Dimensionality of the mapped conditioning label, None = default.
        block_kwargs        = None,     # Arguments for DiscriminatorBlock.
        mapping_kwargs      = None,     # Arguments for MappingNetwork (the label embedding).
        epilogue_kwargs     = None,     # Arguments for DiscriminatorEpilogue.
        precision           = 'fp16',   # Reduced dtype of those resolutions: 'fp16' (float16) or 'bf16' (bfloat16).
        decoder_kwargs      = None,     # A decoder on the block outputs (GGDR, GLeaD): class_name and arguments,
                                        # None = none (the official discriminator).
    ):
        if not is_power_of_two(img_resolution) or img_resolution < 4:
            raise ValueError(f'img_resolution must be a power of two >= 4, got {img_resolution!r}')
        _check_precision(precision)
        block_kwargs = dict(block_kwargs or {})
        mapping_kwargs = dict(mapping_kwargs or {})
        epilogue_kwargs = dict(epilogue_kwargs or {})
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.precision = precision
        self.block_resolutions = resolutions(8, img_resolution)[::-1]
        channels_dict = {res: feature_channels(res, channel_base, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = lowest_fp16_resolution(img_resolution, num_fp16_res)
        if cmap_dim is None:
            cmap_dim = channels_dict[4]
        if c_dim == 0:
            cmap_dim = 0

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        cur_layer_idx = 0
        for res in self.block_resolutions:
            in_channels = channels_dict[res] if res < img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels_dict[res], channels_dict[res // 2], resolution=res,
                                       first_layer_idx=cur_layer_idx, use_fp16=(res >= fp16_resolution),
                                       precision=precision, **block_kwargs, **common)
            setattr(self, f'b{res}', block)
            cur_layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **mapping_kwargs)
        self.b4 = DiscriminatorEpilogue(channels_dict[4], cmap_dim=cmap_dim, resolution=4, **epilogue_kwargs,
                                        **common)
        self.decoder = None
        if decoder_kwargs is not None:
            # Built by name, so that a regularizer's decoder is a registered option of D, not a D subclass.
            self.decoder = dnnlib.util.construct_class_by_name(**decoder_kwargs, channels=channels_dict,
                                                               img_resolution=img_resolution)

    def forward(self, img, c, return_features=None, decode=False, **block_kwargs):
        """img, c -> logits [N, 1]. With `return_features` (resolutions r), also {r: enc[r]}, the output of the
        block that ends at r (r = 4 is the epilogue's input); with `decode`, also the decoder's outputs on those
        features (a dict; needs decoder_kwargs). Extras come after the logits, in that order; the logits are the
        same either way."""
        misc.assert_shape(img, [None, self.img_channels, self.img_resolution, self.img_resolution])
        wanted = self._wanted_features(return_features, decode)
        features = dict()
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f'b{res}')(x, img, **block_kwargs)
            if res // 2 in wanted:
                features[res // 2] = x
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        logits = self.b4(x, img, cmap)
        extras = []
        if return_features is not None:
            extras.append({res: features[res] for res in sorted(set(return_features))})
        if decode:
            extras.append(self.decoder(features))
        return (logits, *extras) if extras else logits

    def _wanted_features(self, return_features, decode):
        wanted = set(return_features or ())
        unknown = sorted(wanted - set(res // 2 for res in self.block_resolutions))
        if unknown:
            raise ValueError(f'Discriminator has no block that ends at resolution {unknown[0]}')
        if decode:
            if self.decoder is None:
                raise ValueError('Discriminator(decode=True) needs a decoder (D_kwargs.decoder_kwargs)')
            wanted |= set(self.decoder.input_resolutions)
        return wanted

    def extra_repr(self):
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'

# ----------------------------------------------------------------------------


def num_params(module: torch.nn.Module) -> int:
    """Number of parameter elements (the counts of SPEC §1)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    'normalize_2nd_moment', 'modulated_conv2d', 'FullyConnectedLayer', 'Conv2dLayer', 'MappingNetwork',
    'SynthesisLayer', 'ToRGBLayer', 'SynthesisBlock', 'SqueezeSynthesisBlock', 'SYNTHESIS_BLOCKS',
    'SQUEEZE_TORGB_SOURCES', 'synthesis_block_class', 'BlockOption', 'synthesis_block_options', 'SynthesisNetwork', 'Generator', 'DiscriminatorBlock',
    'MinibatchStdLayer', 'DiscriminatorEpilogue', 'Discriminator', 'num_params', 'PRECISIONS',
    'low_precision_on_cpu',
]
