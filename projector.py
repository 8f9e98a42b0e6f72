"""Project an image into the latent space W of a trained generator.

Example:

    python projector.py --outdir=out --target=face.png --network=ffhq.pkl

    # Render the result again later, with generate.py:
    python generate.py --outdir=out --projected-w=out/projected_w.npz --network=ffhq.pkl

The LPIPS distance needs the metrics' VGG16 network, `vgg16.pt`: it is taken from --detector-dir (default
$STYLEGAN_DETECTOR_DIR) when there, else downloaded once into the cache. The script checks that it can be found
before it loads anything else, so an offline machine without the file fails at once, in one line.

The search is the one of the StyleGAN2 paper (Karras et al. 2020, Sec. 5 and its appendix on projection): a
single w, shared by every synthesis layer, starts at the average latent and is optimized with Adam together with
the per-layer constant noise maps, so that the generated image matches the target under the LPIPS distance
(features of the VGG16 network used by the metrics). Gaussian noise added to w early on, whose scale ramps down
to zero, helps the search explore; a penalty on the spatial autocorrelation of the noise maps, at every octave,
keeps them from encoding the image. The projection runs on a copy of the generator: the network passed in is
never modified, and only w is kept (the optimized noise maps are discarded, as in the paper's code).

Writes to --outdir: `target.png` (the cropped and resized target), `proj.png` (the projected w rendered with
noise_mode='const' by the unmodified network), `projected_w.npz` (key 'w', [1, num_ws, w_dim] float32) and, when
the optional video writer imageio (with its ffmpeg plugin) is installed, `proj.mp4` showing the search.
"""

import copy
import math
import os
import time
from typing import Any, Iterator, Optional

import click
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import dnnlib
from metrics import metric_utils
from metrics.metric_utils import DETECTOR_DIR_ENV, LPIPS_RESOLUTION, VGG16_URL
from runner import host_memory
from runner.sampling import (
    adopt_option,
    load_generator,
    make_label,
    outdir_callback,
    script_device,
    to_pil,
    to_uint8,
)

# ----------------------------------------------------------------------------
# The LPIPS feature network.


def find_vgg16(detector_dir: Optional[str] = None) -> str:
    """The local path of `vgg16.pt`: in `detector_dir` (default $STYLEGAN_DETECTOR_DIR) or the download cache,
    fetched if needed. Raises an OSError (metrics' DetectorNotFoundError) when the file cannot be had.

    Cheap when the file is there: projector.py calls it before any other work.
    """
    return metric_utils.detector_path(VGG16_URL, detector_dir)


def _vgg16_problem(error: BaseException, detector_dir: Optional[str]) -> str:
    """One line for a missing VGG16: why, and where the file should go."""
    reason = str(error).strip().splitlines()[0].rstrip('.') if str(error).strip() else type(error).__name__
    folder = detector_dir or os.environ.get(DETECTOR_DIR_ENV)
    where = (f'put it at {os.path.join(folder, os.path.basename(VGG16_URL))}' if folder else
             f'put it into a folder and name that folder with --detector-dir (or ${DETECTOR_DIR_ENV})')
    return f'{reason}; download {VGG16_URL} on a machine with network access and {where}'


def _load_vgg16(device: Any, detector_dir: Optional[str] = None) -> torch.jit.ScriptModule:
    """The VGG16 TorchScript module of the metrics, on `device`, through the metrics' loader (which caches
    detectors and knows the download rules). A missing file raises an OSError."""
    return metric_utils.get_feature_detector(VGG16_URL, device=torch.device(device), detector_dir=detector_dir)


def _lpips_features(vgg16: Any, images: torch.Tensor) -> torch.Tensor:
    """LPIPS features of NCHW images with values in [0, 255].

    Images larger than 256x256 are first reduced by area averaging, as the paper's projector does; grayscale
    images are repeated to three channels, the input VGG16 expects.
    """
    if images.shape[2] > LPIPS_RESOLUTION:
        images = F.interpolate(images, size=(LPIPS_RESOLUTION, LPIPS_RESOLUTION), mode='area')
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    return vgg16(images, resize_images=False, return_lpips=True)


# ----------------------------------------------------------------------------
# Schedules and the noise penalty.


def learning_rate_at(
    t:                      float,          # Progress of the search, step / num_steps, in [0, 1).
    initial_learning_rate:  float = 0.1,    # Peak learning rate.
    lr_rampdown_length:     float = 0.25,   # Fraction of the search spent ramping down (half cosine) at the end.
    lr_rampup_length:       float = 0.05,   # Fraction of the search spent ramping up (linearly) at the start.
) -> float:
    """The learning rate of the search at progress `t`: linear warm-up, plateau, cosine ramp-down to 0."""
    ramp = min(1.0, (1.0 - t) / lr_rampdown_length)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / lr_rampup_length)
    return initial_learning_rate * ramp


def w_noise_scale_at(
    t:                      float,          # Progress of the search, step / num_steps, in [0, 1).
    w_std:                  float,          # Spread of w over the latent distribution (estimate_w_stats).
    initial_noise_factor:   float = 0.05,   # Noise scale at the start, in units of w_std.
    noise_ramp_length:      float = 0.75,   # Progress at which the noise reaches zero.
) -> float:
    """Standard deviation of the noise added to w at progress `t`; it reaches 0 (quadratically) at noise_ramp_length."""
    return w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp_length) ** 2


def noise_regularization(noise_maps: Any) -> torch.Tensor:
    """The autocorrelation penalty on the noise maps (StyleGAN2 paper, projection method).

    For every [H, W] map, and for each of its 2x average-pooled versions down to 8x8, the squared mean of the
    map times itself shifted by one pixel, horizontally and vertically. White noise scores about zero; noise
    that has picked up image structure is correlated with its neighbours and is penalized, at every scale.
    """
    total = None
    for noise in noise_maps:
        noise = noise[None, None, :, :]
        while True:
            term = (noise * torch.roll(noise, shifts=1, dims=3)).mean() ** 2
            term = term + (noise * torch.roll(noise, shifts=1, dims=2)).mean() ** 2
            total = term if total is None else total + term
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    if total is None:
        return torch.zeros([])
    return total


# ----------------------------------------------------------------------------
# The search.


@torch.no_grad()
def estimate_w_stats(G: torch.nn.Module, num_samples: int = 10000, label: Optional[torch.Tensor] = None,
                     device: Any = 'cpu') -> tuple:
    """Mean w ([1, 1, w_dim]) and the scalar spread sqrt(E||w - w_avg||^2) of `num_samples` mapped latents.

    The latents are drawn from np.random.RandomState(123), as in the paper's projector, so the statistics do
    not depend on the global seed. `label` is the [1, c_dim] label of a conditional network.
    """
    z = np.random.RandomState(123).randn(num_samples, G.z_dim)
    z = torch.from_numpy(z).to(device=device, dtype=torch.float32)
    if label is None:
        label = torch.zeros([1, G.c_dim], device=device)
    c = label.to(device).repeat([num_samples, 1])
    w = G.mapping(z, c, skip_w_avg_update=True)[:, :1, :].to(torch.float32)  # All rows equal without truncation.
    w_avg = w.mean(dim=0, keepdim=True)
    w_std = float(((w - w_avg).square().sum() / num_samples) ** 0.5)
    return w_avg, w_std


def iter_projection(
    G:                          torch.nn.Module,            # Generator; it is copied, never modified.
    target:                     torch.Tensor,               # [C, H, W] image with values in [0, 255]; H = W = G.img_resolution.
    *,
    num_steps:                  int = 1000,                 # Optimization steps.
    w_avg_samples:              int = 10000,                # Mapped latents used to estimate w_avg and w_std.
    initial_learning_rate:      float = 0.1,                # Peak Adam learning rate.
    initial_noise_factor:       float = 0.05,               # Scale of the noise on w at the start, in units of w_std.
    lr_rampdown_length:         float = 0.25,               # Fraction of the steps spent ramping the lr down.
    lr_rampup_length:           float = 0.05,               # Fraction of the steps spent ramping the lr up.
    noise_ramp_length:          float = 0.75,               # Fraction of the steps after which w gets no noise.
    regularize_noise_weight:    float = 1e5,                # Weight of the noise autocorrelation penalty.
    class_idx:                  Optional[int] = None,       # Class of a conditional network.
    device:                     Any = 'cpu',                # Where to run.
    vgg16:                      Any = None,                 # LPIPS feature network; None loads the metrics' VGG16.
) -> Iterator[dnnlib.EasyDict]:
    """Run the projection one step at a time.

    Checks the arguments at once and returns an iterator that yields, after each step, `EasyDict(step,
    num_steps, w, dist, loss)`: `w` is the latent after the step's update, [1, 1, w_dim] on `device`; `dist` is
    the LPIPS distance to the target that the step measured before updating (with the noisy w it used), `loss`
    that distance plus the weighted noise penalty. The noise maps of a private copy of G are optimized along
    with w.
    """
    device = torch.device(device)
    expected = (G.img_channels, G.img_resolution, G.img_resolution)
    if tuple(target.shape) != expected:
        raise ValueError(f'Target has shape {list(target.shape)}; this network needs {list(expected)} (C, H, W)')
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    label = make_label(G, class_idx, device)    # Raises ValueError for a conditional network without a class.
    if vgg16 is None:
        vgg16 = _load_vgg16(device)
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    return _projection_steps(G, target.to(device=device, dtype=torch.float32), label, vgg16, num_steps,
                             w_avg_samples, initial_learning_rate, initial_noise_factor, lr_rampdown_length,
                             lr_rampup_length, noise_ramp_length, regularize_noise_weight, device)


def _projection_steps(G, target, label, vgg16, num_steps, w_avg_samples, initial_learning_rate, initial_noise_factor,
                      lr_rampdown_length, lr_rampup_length, noise_ramp_length, regularize_noise_weight, device):
    """The body of iter_projection, on the private copy of G; see there."""
    w_avg, w_std = estimate_w_stats(G, w_avg_samples, label=label, device=device)
    noise_maps = [buf for name, buf in G.synthesis.named_buffers() if 'noise_const' in name]

    with torch.no_grad():
        target_features = _lpips_features(vgg16, target.unsqueeze(0))

    # The copied noise maps start as fresh white noise and become leaves of the optimization.
    with torch.no_grad():
        for buf in noise_maps:
            buf.copy_(torch.randn_like(buf))
    for buf in noise_maps:
        buf.requires_grad_(True)

    w_opt = w_avg.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt] + noise_maps, betas=(0.9, 0.999), lr=initial_learning_rate)

    for step in range(num_steps):
        t = step / num_steps
        lr = learning_rate_at(t, initial_learning_rate, lr_rampdown_length, lr_rampup_length)
        for group in optimizer.param_groups:
            group['lr'] = lr

        w_noise = torch.randn_like(w_opt) * w_noise_scale_at(t, w_std, initial_noise_factor, noise_ramp_length)
        ws = (w_opt + w_noise).repeat([1, G.num_ws, 1])
        synth = G.synthesis(ws, noise_mode='const')
        synth = (synth.to(torch.float32) + 1) * (255 / 2)
        dist = (target_features - _lpips_features(vgg16, synth)).square().sum()
        loss = dist + noise_regularization(noise_maps) * regularize_noise_weight

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Keep the noise maps white: zero mean and unit variance after every update.
        with torch.no_grad():
            for buf in noise_maps:
                buf -= buf.mean()
                buf *= buf.square().mean().rsqrt()

        yield dnnlib.EasyDict(step=step, num_steps=num_steps, w=w_opt.detach().clone(),
                               dist=dist.item(), loss=loss.item())


def project(
    G:                          torch.nn.Module,            # Generator; it is copied, never modified.
    target:                     torch.Tensor,               # [C, H, W] image with values in [0, 255]; H = W = G.img_resolution.
    *,
    num_steps:                  int = 1000,                 # Optimization steps.
    w_avg_samples:              int = 10000,                # Mapped latents used to estimate w_avg and w_std.
    initial_learning_rate:      float = 0.1,                # Peak Adam learning rate.
    initial_noise_factor:       float = 0.05,               # Scale of the noise on w at the start, in units of w_std.
    lr_rampdown_length:         float = 0.25,               # Fraction of the steps spent ramping the lr down.
    lr_rampup_length:           float = 0.05,               # Fraction of the steps spent ramping the lr up.
    noise_ramp_length:          float = 0.75,               # Fraction of the steps after which w gets no noise.
    regularize_noise_weight:    float = 1e5,                # Weight of the noise autocorrelation penalty.
    verbose:                    bool = False,               # Print the distance and loss of every step.
    class_idx:                  Optional[int] = None,       # Class of a conditional network.
    device:                     Any = 'cpu',                # Where to run.
    vgg16:                      Any = None,                 # LPIPS feature network; None loads the metrics' VGG16.
) -> torch.Tensor:
    """Find the w whose image best matches `target`; returns the w of every step, [num_steps, num_ws, w_dim].

    Row -1 is the result. As in the paper's projector, the same w fills all num_ws rows.
    """
    steps = iter_projection(
        G, target, num_steps=num_steps, w_avg_samples=w_avg_samples, initial_learning_rate=initial_learning_rate,
        initial_noise_factor=initial_noise_factor, lr_rampdown_length=lr_rampdown_length,
        lr_rampup_length=lr_rampup_length, noise_ramp_length=noise_ramp_length,
        regularize_noise_weight=regularize_noise_weight, class_idx=class_idx, device=device, vgg16=vgg16)
    w_out = []
    for state in steps:
        w_out.append(state.w[0])
        if verbose:
            print(f'step {state.step + 1:>4d}/{num_steps}: dist {state.dist:<4.2f} loss {state.loss:<5.2f}')
    return torch.cat(w_out, dim=0).unsqueeze(1).repeat([1, G.num_ws, 1])


# ----------------------------------------------------------------------------
# Script helpers.


def load_target(path: str, resolution: int, channels: int) -> np.ndarray:
    """Read an image, crop the centered square, resize it to `resolution` (Lanczos): HWC uint8 with `channels`."""
    modes = {1: 'L', 3: 'RGB'}
    if channels not in modes:
        raise ValueError(f'Cannot project onto a network with {channels} image channels; only 1 (grayscale) '
                         f'and 3 (RGB) are supported')
    with PIL.Image.open(path) as image:
        image = image.convert(modes[channels])
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), PIL.Image.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def _open_video_writer(path: str) -> Any:
    """An imageio writer for an H.264 video at `path`, or None (with a note) when imageio/ffmpeg is missing.

    imageio is optional: the projection itself never needs it.
    """
    try:
        import imageio  # Optional package: only the video needs it (requirements-extras.txt).
    except ImportError:
        print(f'note: not writing "{path}": the video needs the optional package imageio with its ffmpeg plugin '
              f'(pip install imageio imageio-ffmpeg); pass --save-video=false to silence this')
        return None
    try:
        return imageio.get_writer(path, mode='I', fps=10, codec='libx264', bitrate='16M')
    except (ImportError, RuntimeError, ValueError, OSError) as e:
        print(f'note: not writing "{path}": imageio cannot write MP4 video here ({e})')
        return None


def _rgb_frame(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with 1 or 3 channels -> HWC uint8 RGB (video frames are RGB)."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


# ----------------------------------------------------------------------------


EXAMPLES = """\b
Examples:

\b
  # Project an image (cropped to its center square and resized) and save the video of the search:
  python projector.py --outdir=out --target=face.png \\
      --network=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl

\b
  # Offline machine: vgg16.pt lies in a local folder; 300 steps, no video:
  python projector.py --outdir=out --target=face.png --network=ffhq.pkl \\
      --detector-dir=/data/detectors --num-steps=300 --save-video=0

\b
  # Render the result again later:
  python generate.py --outdir=out --projected-w=out/projected_w.npz --network=ffhq.pkl
"""


@click.command(epilog=EXAMPLES)
@click.option('--network', 'network_pkl', help='Network snapshot: .pkl or weights-only .pt, path or URL', required=True)
@click.option('--target', 'target_fname', type=click.Path(exists=True, dir_okay=False), required=True,
              help='Image file to project')
@click.option('--num-steps', type=click.IntRange(min=1), default=1000, show_default=True,
              help='Number of optimization steps')
@click.option('--seed', type=click.IntRange(min=0, max=2 ** 32 - 1), default=303, show_default=True,
              help='Random seed')
@click.option('--save-video', type=bool, default=True, show_default=True,
              help='Save an MP4 video of the optimization progress (needs imageio with ffmpeg)')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), help='Class label (conditional networks)')
@click.option('--outdir', type=click.Path(file_okay=False), callback=outdir_callback, required=True,
              help='Where to save the output images')
@click.option('--device', default=None, help='Torch device  [default: cuda if available, else cpu]')
@click.option('--detector-dir', metavar='DIR', default=None,
              help=f'Folder with vgg16.pt [default: ${DETECTOR_DIR_ENV} or download]')
@adopt_option
def main(
    network_pkl:    str,
    target_fname:   str,
    num_steps:      int,
    seed:           int,
    save_video:     bool,
    class_idx:      Optional[int] = None,
    outdir:         str = None,
    device:         Optional[str] = None,
    detector_dir:   Optional[str] = None,
    adopt:          bool = True,
) -> None:
    """Project an image into the W space of a network; writes target.png, proj.png, projected_w.npz (and proj.mp4)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    host_memory.keep_freed_memory()
    device = script_device(device)
    try:
        find_vgg16(detector_dir)  # Before any work: an offline machine without the file fails now.
    except OSError as e:
        raise click.ClickException(_vgg16_problem(e, detector_dir)) from None

    print(f'Loading network from "{network_pkl}"...')
    G = load_generator(network_pkl, device, adopt=adopt)
    if G.c_dim == 0 and class_idx is not None:
        print(f'warn: --class={class_idx} ignored when running on an unconditional network')
        class_idx = None
    if G.c_dim != 0:
        if class_idx is None:
            raise click.UsageError(f'The network is conditional ({G.c_dim} classes): give a class label with --class')
        if class_idx >= G.c_dim:
            raise click.BadParameter(f'the network has classes 0 to {G.c_dim - 1}, got {class_idx}',
                                     param_hint='--class')

    try:
        target_uint8 = load_target(target_fname, G.img_resolution, G.img_channels)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f'cannot use "{target_fname}" as the target: {e}', param_hint='--target') from e

    try:
        vgg16 = _load_vgg16(device, detector_dir)
    except OSError as e:
        raise click.ClickException(_vgg16_problem(e, detector_dir)) from None
    except (RuntimeError, ValueError) as e:  # A damaged file: torch.jit.load's error, first line.
        raise click.ClickException(f'Cannot load the VGG16 feature network: '
                                   f'{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}') from None

    start_time = time.time()
    target = torch.tensor(target_uint8.transpose([2, 0, 1]), device=device)
    projected_w_steps = project(G, target, num_steps=num_steps, class_idx=class_idx, device=device, vgg16=vgg16,
                                verbose=True)
    print(f'Elapsed: {time.time() - start_time:.1f} s')

    os.makedirs(outdir, exist_ok=True)
    if save_video:
        video_path = os.path.join(outdir, 'proj.mp4')
        writer = _open_video_writer(video_path)
        if writer is not None:
            print(f'Saving optimization progress video "{video_path}"')
            try:
                with torch.no_grad():
                    for projected_w in projected_w_steps:
                        synth = to_uint8(G.synthesis(projected_w.unsqueeze(0), noise_mode='const'))[0]
                        writer.append_data(np.concatenate([_rgb_frame(target_uint8), _rgb_frame(synth)], axis=1))
            finally:
                writer.close()

    to_pil(target_uint8).save(os.path.join(outdir, 'target.png'))
    projected_w = projected_w_steps[-1]
    with torch.no_grad():
        synth = to_uint8(G.synthesis(projected_w.unsqueeze(0), noise_mode='const'))[0]
    to_pil(synth).save(os.path.join(outdir, 'proj.png'))
    np.savez(os.path.join(outdir, 'projected_w.npz'), w=projected_w.unsqueeze(0).cpu().numpy().astype(np.float32))
    print(f'Wrote target.png, proj.png and projected_w.npz to "{outdir}"')


# The official name of the command (third-party code imports it and calls it or its callback).
run_projection = main

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
