"""Bilinear `grid_sample` that is twice differentiable with respect to both the image and the grid.

The ADA augmentation pipeline warps images with `grid_sample`, and R1 differentiates the discriminator's output
through the augmentation, which needs the second derivative of the sampler. Old PyTorch releases had no double
backward for `grid_sample`; current ones do. Rather than trusting a version number, the first call (with
`enabled` on) runs a tiny float64 probe that takes a second derivative through `torch.nn.functional.grid_sample`
and compares it with our own sampler. If the native op passes, it is used; otherwise `_grid_sample_ref`, a pure
PyTorch bilinear sampler built from `gather` and arithmetic, which is differentiable to any order.

The sampling convention is fixed: bilinear, zero padding, `align_corners=False`.
"""

from typing import Dict

import torch
import torch.nn.functional as F

enabled = False     # Make sure the result is twice differentiable (the training loop sets this).

_native_probe_results: Dict[str, bool] = {}    # device type -> does the native double backward work there.

# ----------------------------------------------------------------------------
# Public function.


def grid_sample(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample `input` [N, C, H, W] at `grid` [N, Ho, Wo, 2] (x, y in [-1, 1]) bilinearly -> [N, C, Ho, Wo]."""
    if enabled and not _native_double_backward_works(input.device):
        return _grid_sample_ref(input, grid)
    return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

# ----------------------------------------------------------------------------
# Our own sampler.


def _grid_sample_ref(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with zero padding and align_corners=False, from gather and arithmetic only.

    The corner indices are integers (no gradient); the corner weights are polynomials in the grid and the
    gathered values are linear in the input, so every derivative of any order is exact.
    """
    assert input.ndim == 4 and grid.ndim == 4 and grid.shape[-1] == 2, 'expected input NCHW and grid [N, Ho, Wo, 2]'
    assert grid.shape[0] == input.shape[0], 'input and grid must have the same batch size'
    N, C, H, W = input.shape
    _, Ho, Wo, _ = grid.shape

    # align_corners=False: -1 and +1 are the outer edges of the border pixels, not their centres.
    x = ((grid[..., 0] + 1) * W - 1) / 2
    y = ((grid[..., 1] + 1) * H - 1) / 2
    x0 = torch.floor(x).detach()
    y0 = torch.floor(y).detach()
    fx = x - x0
    fy = y - y0

    flat = input.reshape(N, C, H * W)
    out = 0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            out = out + _gather_corner(flat, x0 + dx, y0 + dy, wx * wy, H, W)
    return out.reshape(N, C, Ho, Wo)


def _gather_corner(flat: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor, weight: torch.Tensor,
                   H: int, W: int) -> torch.Tensor:
    """weight * input[yi, xi] for one of the four corners, zero where the corner lies outside the image."""
    N, C, _ = flat.shape
    inside = (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)     # Also False for NaN coordinates.
    # Outside corners read pixel 0 (any valid index would do; a NaN or huge index must not reach the integer
    # cast) and are then multiplied by a zero weight. Multiplying, rather than selecting, keeps a NaN grid
    # point NaN in the output, as PyTorch's grid_sample does.
    index = torch.where(inside, yi * W + xi, torch.zeros_like(xi)).long().reshape(N, 1, -1)
    values = flat.gather(2, index.expand(N, C, index.shape[2]))
    weight = (weight * inside).reshape(N, 1, -1)
    return values * weight

# ----------------------------------------------------------------------------
# Feature probe.


def _native_double_backward_works(device: torch.device) -> bool:
    """Whether PyTorch's grid_sample has a correct second derivative on this device type (probed once)."""
    key = torch.device(device).type
    if key not in _native_probe_results:
        _native_probe_results[key] = _probe_native_double_backward(torch.device(device))
    return _native_probe_results[key]


def _reset_probe() -> None:
    """Forget the probe results (tests)."""
    _native_probe_results.clear()


def _probe_native_double_backward(device: torch.device) -> bool:
    # Fixed, deterministic values (no random numbers, so the probe does not move the global RNG), with sample
    # points inside, near and outside the border but never on a pixel boundary, where derivatives are one-sided.
    try:
        with torch.inference_mode(False), torch.enable_grad():
            image = torch.linspace(-1, 2, 2 * 3 * 4, dtype=torch.float64, device=device).reshape(1, 2, 3, 4)
            grid = torch.tensor([[[-0.83, 0.31], [0.47, -0.58], [1.12, 0.9]],
                                 [[0.05, 1.07], [-1.2, -0.2], [0.61, 0.36]]], dtype=torch.float64, device=device)
            grid = grid.unsqueeze(0)
            native = _second_derivatives(image, grid, lambda i, g: F.grid_sample(
                i, g, mode='bilinear', padding_mode='zeros', align_corners=False))
            ours = _second_derivatives(image, grid, _grid_sample_ref)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return all(torch.allclose(a, b, rtol=1e-7, atol=1e-9) for a, b in zip(native, ours, strict=True))


def _second_derivatives(image: torch.Tensor, grid: torch.Tensor, sampler) -> tuple:
    """Gradients w.r.t. image and grid of a scalar built from the first derivatives of `sampler`."""
    image = image.detach().requires_grad_(True)
    grid = grid.detach().requires_grad_(True)
    out = sampler(image, grid)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    g_image, g_grid = torch.autograd.grad((out * out * weights).sum(), [image, grid], create_graph=True)
    penalty = g_image.square().sum() + (g_grid * g_grid.flip(-1)).sum()
    return torch.autograd.grad(penalty, [image, grid])
