"""Perceptual path length (Karras et al. 2019, "A Style-Based Generator Architecture for GANs", §4.2; the
'ppl2' variant of StyleGAN2 §3.2): the LPIPS distance between images at two latents ε apart along an
interpolation path, divided by ε², averaged after dropping the outer percentiles.

Z paths interpolate spherically (slerp), W paths linearly (lerp). 'full' sampling takes t ~ U(0, 1), 'end'
sampling t = 0 (the path starts at an endpoint). Each image pair shares one set of noise inputs.
"""

import copy
from typing import Any

import numpy as np
import torch

import dnnlib

from . import metric_utils

# The feature network this metric runs (VGG16 LPIPS distances); metric_main registers it with the metric so that
# check_metrics_ready() can find the file before a training run starts.
DETECTOR_URL = metric_utils.VGG16_URL

SPACES = ('z', 'w')
SAMPLINGS = ('full', 'end')


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point at fraction `t` of the great-circle arc from a/|a| to b/|b| (along the last dimension); unit norm."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    cos_omega = (a * b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    angle = torch.acos(cos_omega) * t
    # Unit vector in the plane of a and b, orthogonal to a, pointing towards b.
    ortho = b - cos_omega * a
    ortho = ortho / ortho.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = a * torch.cos(angle) + ortho * torch.sin(angle)
    return out / out.norm(dim=-1, keepdim=True)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a + t·(b − a)."""
    return a + (b - a) * t


def crop_face(images: torch.Tensor) -> torch.Tensor:
    """The central face region used by the original PPL protocol: rows 3/8..7/8, columns 2/8..6/8."""
    assert images.shape[2] == images.shape[3], 'Cropping needs square images'
    c = images.shape[2] // 8
    return images[:, :, c * 3: c * 7, c * 2: c * 6]


def filtered_mean(dist: np.ndarray) -> float:
    """Mean of the values between the 1st (lower) and 99th (higher) percentiles, inclusive."""
    dist = np.asarray(dist, dtype=np.float64)
    lo = np.percentile(dist, 1, method='lower')
    hi = np.percentile(dist, 99, method='higher')
    return float(dist[(dist >= lo) & (dist <= hi)].mean())


class PPLSampler(torch.nn.Module):
    """Per-sample path lengths (official name and signature, SPEC §7; third-party code builds it): `forward(c)`
    draws, from torch's global generator on c's device, t (U(0, 1) for 'full', 0 for 'end'), then z0 and z1 as
    one [2N, z_dim] normal batch, then G's noise buffers, and returns LPIPS(img(t), img(t + ε)) / ε², [N].
    compute_ppl draws its own reproducible latents and calls `distances` directly."""

    def __init__(self,
        G:          Any,        # Generator (copied).
        G_kwargs:   dict,       # Extra keywords of G.synthesis.
        epsilon:    float,      # Step along the path.
        space:      str,        # 'z' (slerp in Z) or 'w' (lerp in W).
        sampling:   str,        # 'full' (t ~ U(0, 1)) or 'end' (t = 0).
        crop:       bool,       # Measure the central face region only (crop_face).
        vgg16:      Any,        # LPIPS feature network, called as vgg16(img, resize_images=False, return_lpips=True).
    ):
        if space not in SPACES:
            raise ValueError(f'PPL space must be one of {", ".join(SPACES)}, got {space!r}')
        if sampling not in SAMPLINGS:
            raise ValueError(f'PPL sampling must be one of {", ".join(SAMPLINGS)}, got {sampling!r}')
        super().__init__()
        self.G = copy.deepcopy(G)
        self.G_kwargs = dict(G_kwargs)
        self.epsilon = epsilon
        self.space = space
        self.sampling = sampling
        self.crop = crop
        self.vgg16 = copy.deepcopy(vgg16)

    def randomize_noise(self) -> None:
        """Fresh normal values in G's noise_const buffers, from the current generator: each image pair shares them."""
        for name, buf in self.G.named_buffers():
            if name.endswith('.noise_const'):
                buf.copy_(torch.randn_like(buf))

    def distances(self, z0: torch.Tensor, z1: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """LPIPS(img(t), img(t + ε)) / ε² for each row of the paths z0 -> z1 with labels c; t has shape [N]."""
        t = t.unsqueeze(1)
        if self.space == 'z':
            zt0, zt1 = slerp(z0, z1, t), slerp(z0, z1, t + self.epsilon)
            wt0, wt1 = self.G.mapping(torch.cat([zt0, zt1]), torch.cat([c, c])).chunk(2)
        else:
            w0, w1 = self.G.mapping(torch.cat([z0, z1]), torch.cat([c, c])).chunk(2)
            wt0 = lerp(w0, w1, t.unsqueeze(2))
            wt1 = lerp(w0, w1, t.unsqueeze(2) + self.epsilon)
        # Pairs side by side ([a0, a1, b0, b1, ...]) so that both images of a pair go through the same batch.
        images = self.G.synthesis(torch.stack([wt0, wt1], dim=1).flatten(0, 1), noise_mode='const', force_fp32=True,
                                  **self.G_kwargs)
        if self.crop:
            images = crop_face(images)
        factor = images.shape[2] // metric_utils.LPIPS_RESOLUTION
        if factor > 1:
            # LPIPS was calibrated on 256x256 images: box-downsample larger ones.
            n, ch, h, w = images.shape
            images = images.reshape([n, ch, h // factor, factor, w // factor, factor]).mean([3, 5])
        images = (images + 1) * (255 / 2)
        lpips = metric_utils.run_detector(self.vgg16, images, dict(resize_images=False, return_lpips=True))
        lpips = lpips.reshape([-1, 2, lpips.shape[1]])
        return (lpips[:, 0] - lpips[:, 1]).square().sum(dim=1) / self.epsilon ** 2

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        t = torch.rand([c.shape[0]], device=c.device) * (1 if self.sampling == 'full' else 0)
        z0, z1 = torch.randn([c.shape[0] * 2, self.G.z_dim], device=c.device).chunk(2)
        self.randomize_noise()
        return self.distances(z0, z1, c, t)


def compute_ppl(opts: metric_utils.MetricOptions, num_samples: int, epsilon: float, space: str, sampling: str,
                crop: bool, batch_size: int, seed: int = 0) -> float:
    """PPL over `num_samples` paths (rank 0; NaN elsewhere)."""
    vgg16 = metric_utils.get_feature_detector(DETECTOR_URL, device=opts.device, num_gpus=opts.num_gpus, rank=opts.rank,
                                              verbose=opts.progress.verbose, detector_dir=opts.detector_dir)
    # G_kwargs stays empty: opts.G_kwargs are keywords of G(z, c) (truncation, noise mode), not of G.synthesis.
    ppl = PPLSampler(G=opts.G, G_kwargs={}, epsilon=epsilon, space=space, sampling=sampling, crop=crop, vgg16=vgg16)
    ppl.eval().requires_grad_(False).to(opts.device)
    dataset = dnnlib.util.construct_class_by_name(**opts.dataset_kwargs)
    sampler = metric_utils.LatentSampler(ppl.G, dataset, seed=seed)
    end_sampler = metric_utils.LatentSampler(ppl.G, dataset, seed=seed + 1)
    stats = metric_utils.FeatureStats(capture_all=True, max_items=num_samples)
    progress = opts.progress.sub(tag='ppl features', num_items=num_samples)
    step = 0
    with torch.no_grad():
        while not stats.is_full():
            indices = metric_utils.step_indices(step, batch_size, opts.num_gpus, opts.rank)
            z0, c = sampler(indices, opts.device)
            z1, _ = end_sampler(indices, opts.device)
            if sampling == 'full':
                t = torch.tensor([np.random.default_rng([seed, index, 2]).random() for index in indices],
                                 dtype=torch.float32, device=opts.device)
            else:
                t = torch.zeros([len(indices)], device=opts.device)
            with metric_utils.forked_rng(opts, [seed, step, opts.rank, 2]):
                ppl.randomize_noise()
            dist = ppl.distances(z0, z1, c, t)
            stats.append_torch(dist.unsqueeze(1), num_gpus=opts.num_gpus, rank=opts.rank)
            progress.update(stats.num_items)
            step += 1
    if opts.rank != 0:
        return float('nan')
    return filtered_mean(stats.get_all()[:, 0])
