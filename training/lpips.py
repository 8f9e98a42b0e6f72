"""The reconstruction distance of GLeaD's real branch (SPEC §5): LPIPS-AlexNet v0.1 (Zhang et al., "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018), and `mse`, which needs no file.

`reconstruction_distance(kind, weights, device)` returns a module `(x, y) -> [N]`: one distance per sample for
two [N, 3, H, W] image batches in [-1, 1]; the caller takes the batch mean. Both kinds are fixed metrics: they
have no trainable parameters, and the gradient flows to both inputs.

LPIPS-AlexNet v0.1, as published: shift the inputs by (-.030, -.088, -.188) and scale them by (.458, .448, .450)
per channel; run AlexNet's `features` trunk and tap it after each of its five ReLUs; unit-normalize every tap
over its channels, x / (sqrt(sum_c x^2) + 1e-10); square the difference of the two images' taps; weight the
channels with a learned non-negative 1x1 convolution without bias (C_k -> 1); average over the positions; sum
over the five taps. (The published lin layers have a dropout before the 1x1 convolution, which is the identity
in evaluation, so it is left out.)

Weights are never downloaded by this module; the user supplies one of:
- two files, `(trunk, lin)`: torchvision's AlexNet state dict `alexnet-owt-7be5be79.pth` (TRUNK_URL; keys
  `features.{0,3,6,8,10}.{weight,bias}`, the classifier keys are ignored) and the lpips package's
  `lpips/weights/v0.1/alex.pth` (keys `lin{0..4}.model.1.weight`, shape [1, C, 1, 1]; `pip install --no-deps
  lpips` puts it where `installed_lin_file()` finds it);
- one combined file holding both key sets, as `save_combined(weights, path)` writes it (our own format: a plain
  dict of tensors under the published key names, so `torch.load(weights_only=True)` reads it).
Every key and shape is checked, and the lin weights must be non-negative (the published ones are: lpips clamps
them at zero during training); each problem is a FileNotFoundError or ValueError of one line that names the
file, what was expected and where to get it.

Small images, our deliberate choice: the trunk needs at least MIN_INPUT_SIZE = 31 pixels per side (the second
max-pool needs a 3x3 input), and the official package is meant for 64x64 and up, where the last three taps are
still 3x3. GLeaD compares 64²-256² images, but tiny test configurations use 8-32 px, so an image with a side
below `min_size` (default 64) is first upsampled bilinearly (align_corners=False, aspect ratio kept) until its
shorter side is `min_size`. This is not the official metric at those sizes (the official package would run
31-63 px images unchanged and fail below 31); `min_size=0` turns the upsampling off, and then an image below
31 px is a ValueError.
"""

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

import dnnlib

KINDS = ('lpips', 'mse')

TRUNK_FILE = 'alexnet-owt-7be5be79.pth'
TRUNK_URL = 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth'
LIN_PACKAGE = 'lpips'
LIN_FILE_IN_PACKAGE = 'lpips/weights/v0.1/alex.pth'

TRUNK_SOURCE = f"torchvision's AlexNet state dict {TRUNK_FILE} ({TRUNK_URL})"
LIN_SOURCE = (f"the lpips package's {LIN_FILE_IN_PACKAGE} (pip install --no-deps {LIN_PACKAGE}, or "
              f"https://github.com/richzhang/PerceptualSimilarity)")
COMBINED_SOURCE = 'or one file holding both, written by training.lpips.save_combined'

SHIFT = (-0.030, -0.088, -0.188)    # Per-channel input shift of LPIPS v0.1 (RGB), for inputs in [-1, 1].
SCALE = (0.458, 0.448, 0.450)       # Per-channel input scale, applied after the shift.
EPS = 1e-10                         # Added to the channel norm before dividing by it.
MIN_INPUT_SIZE = 31                 # Smallest side the trunk runs on: conv0 must give 7 so that pool1 gets 3.
DEFAULT_MIN_SIZE = 64               # Sides below this are upsampled first (see the module docstring).


class _ConvSpec(NamedTuple):
    key:            str     # Prefix of the weight and bias in torchvision's AlexNet state dict.
    in_channels:    int
    out_channels:   int     # Also the channels of the tap after this conv's ReLU.
    kernel_size:    int
    stride:         int
    padding:        int
    pool_before:    bool    # A 3x3 stride-2 max-pool (no padding) runs before this conv.


# AlexNet's `features` trunk ("one weird trick" variant, as in torchvision); tap k follows the ReLU of conv k.
TRUNK = (
    _ConvSpec('features.0',    3,  64, 11, 4, 2, False),
    _ConvSpec('features.3',   64, 192,  5, 1, 2, True),
    _ConvSpec('features.6',  192, 384,  3, 1, 1, True),
    _ConvSpec('features.8',  384, 256,  3, 1, 1, False),
    _ConvSpec('features.10', 256, 256,  3, 1, 1, False),
)
TAP_CHANNELS = tuple(spec.out_channels for spec in TRUNK)

# Key -> shape of every tensor the module reads, under the published key names.
TRUNK_SHAPES: Dict[str, Tuple[int, ...]] = {
    key: shape for spec in TRUNK for key, shape in (
        (f'{spec.key}.weight', (spec.out_channels, spec.in_channels, spec.kernel_size, spec.kernel_size)),
        (f'{spec.key}.bias', (spec.out_channels,)))}
LIN_SHAPES: Dict[str, Tuple[int, ...]] = {f'lin{k}.model.1.weight': (1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)}

WeightsArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, torch.Tensor]]


# ----------------------------------------------------------------------------
# Weight files.

def installed_lin_file() -> Optional[str]:
    """Path of the installed lpips package's v0.1 alex.pth, or None when it is not installed. The package is
    never imported (its __init__ imports torchvision)."""
    return dnnlib.util.installed_package_file(LIN_PACKAGE, LIN_FILE_IN_PACKAGE)


def _read_state_dict(path: str, expected: str, source: str) -> Dict[str, torch.Tensor]:
    """torch.load a plain dict of tensors, or raise one line that names the file, the expectation and the source."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'LPIPS weights: no such file {path!r}; expected {expected}, from {source}')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # Pickle, zip and torch errors alike: the file is not a weights-only torch file.
        raise ValueError(f'LPIPS weights: {path!r} is not a PyTorch weights file ({type(error).__name__}); '
                         f'expected {expected}, from {source}') from None
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f'LPIPS weights: {path!r} holds a {type(data).__name__}, not a state dict of tensors; '
                         f'expected {expected}, from {source}')
    return dict(data)


def _check_keys(data: Mapping[str, torch.Tensor], shapes: Mapping[str, Tuple[int, ...]], where: str,
                expected: str, source: str) -> Dict[str, torch.Tensor]:
    """The entries of `shapes` from `data` as float32, after checking that each is there with its shape."""
    picked = {}
    for key, shape in shapes.items():
        if key not in data:
            found = ', '.join(repr(k) for k in list(data)[:3]) or 'no keys at all'
            raise ValueError(f'LPIPS weights: {where} has no key {key!r} (it holds {found}); expected {expected}, '
                             f'from {source}')
        if tuple(data[key].shape) != shape:
            raise ValueError(f'LPIPS weights: {where} key {key!r} has shape {list(data[key].shape)}, expected '
                             f'{list(shape)}; expected {expected}, from {source}')
        picked[key] = data[key].detach().to(device='cpu', dtype=torch.float32)
    return picked


def _check_lin_signs(lin: Mapping[str, torch.Tensor], where: str) -> None:
    for key, value in lin.items():
        if not torch.isfinite(value).all() or bool((value < 0).any()):
            raise ValueError(f'LPIPS weights: {where} key {key!r} has negative or non-finite values, but the v0.1 '
                             f'lin layers are non-negative; expected {LIN_SOURCE}')


def load_weights(weights: WeightsArg) -> Dict[str, torch.Tensor]:
    """Read and check LPIPS-AlexNet weights: a `(trunk_path, lin_path)` pair, one combined file, or a state dict
    already in memory. Returns float32 CPU tensors under the published key names (TRUNK_SHAPES, LIN_SHAPES)."""
    trunk_what = f'the AlexNet trunk ({len(TRUNK_SHAPES)} tensors features.0.weight ... features.10.bias)'
    lin_what = f'the LPIPS v0.1 lin layers ({len(LIN_SHAPES)} tensors lin0.model.1.weight ... lin4.model.1.weight)'
    both_what = f'{trunk_what} and {lin_what}'
    both_source = f'{TRUNK_SOURCE} and {LIN_SOURCE}, {COMBINED_SOURCE}'
    if isinstance(weights, Mapping):
        trunk = _check_keys(weights, TRUNK_SHAPES, 'the given state dict', both_what, both_source)
        lin = _check_keys(weights, LIN_SHAPES, 'the given state dict', both_what, both_source)
        where = 'the given state dict'
    elif isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        data = _read_state_dict(path, both_what, both_source)
        trunk = _check_keys(data, TRUNK_SHAPES, repr(path), both_what, both_source)
        lin = _check_keys(data, LIN_SHAPES, repr(path), both_what, both_source)
        where = repr(path)
    elif isinstance(weights, Sequence) and len(weights) == 2:
        trunk_path, lin_path = (os.fspath(p) for p in weights)
        trunk = _check_keys(_read_state_dict(trunk_path, trunk_what, TRUNK_SOURCE), TRUNK_SHAPES,
                            repr(trunk_path), trunk_what, TRUNK_SOURCE)
        lin = _check_keys(_read_state_dict(lin_path, lin_what, LIN_SOURCE), LIN_SHAPES,
                          repr(lin_path), lin_what, LIN_SOURCE)
        where = repr(lin_path)
    else:
        raise ValueError(f'LPIPS weights: expected a path, a (trunk_path, lin_path) pair or a state dict, got '
                         f'{weights!r}; get {both_source}')
    _check_lin_signs(lin, where)
    return {**trunk, **lin}


def save_combined(weights: WeightsArg, path: Union[str, os.PathLike]) -> None:
    """Write the checked weights as one combined file (a plain dict of tensors under the published key names),
    e.g. `save_combined(('alexnet-owt-7be5be79.pth', 'alex.pth'), 'lpips_alex.pt')`."""
    torch.save(load_weights(weights), os.fspath(path))


# ----------------------------------------------------------------------------
# The metrics.

class _FrozenConv(torch.nn.Module):
    """A fixed convolution (its parameters never require a gradient) that computes in the input's dtype."""

    def __init__(self,
        weight:         torch.Tensor,               # [out, in, k, k] float32.
        bias:           Optional[torch.Tensor],     # [out] float32, or None.
        stride:         int = 1,                    # Convolution stride in pixels.
        padding:        int = 0,                    # Zero padding on every side, in pixels.
        pool_before:    bool = False,               # Run a 3x3 stride-2 max-pool on the input first.
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)
        self.stride = stride
        self.padding = padding
        self.pool_before = pool_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_before:
            x = F.max_pool2d(x, kernel_size=3, stride=2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_channels, in_channels, k, _ = self.weight.shape
        return (f'in={in_channels}, out={out_channels}, kernel={k}, stride={self.stride}, padding={self.padding}, '
                f'bias={self.bias is not None}, pool_before={self.pool_before}')


class LPIPSAlex(torch.nn.Module):
    """LPIPS-AlexNet v0.1: `forward(x, y)` takes two [N, 3, H, W] batches in [-1, 1] and returns [N] distances.

    Computes in float64 for float64 inputs (for derivative checks) and in float32 otherwise, on the device of
    the inputs (move the module there with .to()). The parameters are frozen; the gradient reaches both inputs.
    """

    def __init__(self,
        weights:    WeightsArg,                     # Anything load_weights accepts: files or a published-key dict.
        min_size:   int = DEFAULT_MIN_SIZE,         # Upsample images whose shorter side is below this (0: never).
    ):
        super().__init__()
        weights = load_weights(weights)
        self.min_size = int(min_size)
        self.convs = torch.nn.ModuleList([
            _FrozenConv(weights[f'{spec.key}.weight'], weights[f'{spec.key}.bias'], spec.stride, spec.padding,
                        spec.pool_before) for spec in TRUNK])
        self.lins = torch.nn.ModuleList([_FrozenConv(weights[key], None) for key in LIN_SHAPES])
        self.register_buffer('shift', torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)

    def published_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights under the published key names: the combined file format (see save_combined)."""
        out = {}
        for spec, conv in zip(TRUNK, self.convs, strict=True):
            out[f'{spec.key}.weight'] = conv.weight.detach().cpu().clone()
            out[f'{spec.key}.bias'] = conv.bias.detach().cpu().clone()
        for key, lin in zip(LIN_SHAPES, self.lins, strict=True):
            out[key] = lin.weight.detach().cpu().clone()
        return out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the trunk's input: compute dtype, upsampling of small images, shift and scale."""
        assert images.ndim == 4 and images.shape[1] == 3, f'expected [N, 3, H, W] images, got {list(images.shape)}'
        x = images if images.dtype == torch.float64 else images.to(torch.float32)
        h, w = x.shape[2:]
        if min(h, w) < self.min_size:
            # Bilinear upsampling is an average with weights summing to one, so it commutes with the per-channel
            # shift and scale below; doing it first keeps the [-1, 1] range of the caller's images.
            factor = self.min_size / min(h, w)
            size = (max(self.min_size, round(h * factor)), max(self.min_size, round(w * factor)))
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            h, w = size
        if min(h, w) < MIN_INPUT_SIZE:
            raise ValueError(f'LPIPS-AlexNet needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got '
                             f'{h}x{w}; keep min_size >= {MIN_INPUT_SIZE} (default {DEFAULT_MIN_SIZE}) to upsample '
                             f'small images first (min_size={self.min_size} here)')
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def taps(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The five ReLU outputs of the trunk for images in [-1, 1], before the channel normalization."""
        x = self.prepare(images)
        taps = []
        for conv in self.convs:
            x = F.relu(conv(x))
            taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape == y.shape, f'the two image batches differ in shape: {list(x.shape)} vs {list(y.shape)}'
        n = x.shape[0]
        # One trunk pass over both batches: half the kernel launches, and x and y see the same arithmetic.
        dist = 0
        for tap, lin in zip(self.taps(torch.cat([x, y])), self.lins, strict=True):
            unit = tap / (tap.square().sum(dim=1, keepdim=True).sqrt() + EPS)
            dist = dist + lin((unit[:n] - unit[n:]).square()).mean(dim=(1, 2, 3))
        return dist

    def extra_repr(self) -> str:
        return f'min_size={self.min_size}'


class MSEDistance(torch.nn.Module):
    """`forward(x, y)`: the mean over C, H, W of (x - y)^2, one value per sample ([N]); needs no weights."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape == y.shape, f'the two image batches differ in shape: {list(x.shape)} vs {list(y.shape)}'
        assert x.ndim >= 2, f'expected [N, ...] batches, got {list(x.shape)}'
        return (x - y).square().flatten(1).mean(dim=1)


def reconstruction_distance(
    kind:       str = 'lpips',                  # 'lpips' (LPIPS-AlexNet v0.1) or 'mse'.
    weights:    Optional[WeightsArg] = None,    # LPIPS only: combined file, (trunk_path, lin_path), or state dict.
    device:     Any = 'cpu',                    # Where the module's weights live.
    min_size:   int = DEFAULT_MIN_SIZE,         # LPIPS only: upsample images with a shorter side below this.
) -> torch.nn.Module:
    """The distance module `(x, y) -> [N]` that GLeaD's loss calls for `kind`."""
    if kind not in KINDS:
        raise ValueError(f'unknown reconstruction distance {kind!r}; valid choices: {", ".join(KINDS)}')
    if kind == 'mse':
        return MSEDistance().to(device)
    if weights is None:
        raise ValueError(f"LPIPS needs weights: pass a (trunk, lin) pair of files, {TRUNK_SOURCE} and "
                         f"{LIN_SOURCE}, {COMBINED_SOURCE}; or use the distance 'mse', which needs none")
    return LPIPSAlex(weights, min_size=min_size).to(device).eval()
