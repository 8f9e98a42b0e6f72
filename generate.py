"""Generate images with a trained generator.

Examples:

    # Six curated images of a pretrained network:
    python generate.py --outdir=out --trunc=0.7 --seeds=600-605 --network=network-snapshot-000100.pkl

    # Class 3 of a conditional network, seeds 0 to 3 and 10:
    python generate.py --outdir=out --seeds=0-3,10 --class=3 --network=cifar10.pkl

    # Render latents found by projector.py:
    python generate.py --outdir=out --projected-w=projected_w.npz --network=ffhq.pkl

The network may be an official or our own `.pkl` snapshot, a TensorFlow pickle of the StyleGAN2(-ADA)
TensorFlow releases, or a weights-only `.pt` file (training/legacy.py); a weights-only file runs no code stored
in it. Networks of official snapshots are rebuilt as this code base's classes ("adopted": fp32 on the CPU, our
kernels); `--adopt=0` runs the classes embedded in the pickle instead. Image i of seed s uses
z = RandomState(s).randn(1, z_dim), as the official script does, so seeds name the same images in both code bases.
"""

import os
import re
import warnings
from typing import Any, List, Optional

import click
import numpy as np
import PIL.Image
import torch

from training import legacy

MAX_SEED = 2 ** 32 - 1  # np.random.RandomState accepts seeds up to this value.

# ----------------------------------------------------------------------------
# Pure helpers (also used by style_mixing.py and the tests).


def parse_range(text: str) -> List[int]:
    """Parse a comma-separated list of integers and inclusive ranges: '0-3,7,10-12' -> [0, 1, 2, 3, 7, 10, 11, 12].

    Order and repeats are kept as written. Raises click.BadParameter on anything else.
    """
    if not isinstance(text, str) or not text.strip():
        raise click.BadParameter(f'expected a list such as "0-3,7,10-12", got {text!r}')
    values = []
    for part in text.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if match is None:
            raise click.BadParameter(f'cannot parse {part!r} in {text!r}; expected non-negative integers or '
                                     f'ranges such as "0-3,7,10-12"')
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise click.BadParameter(f'range {part.strip()!r} in {text!r} ends before it starts')
        values.extend(range(first, last + 1))
    return values


def seeds_callback(_ctx, _param, value: Optional[str]) -> Optional[List[int]]:
    """click callback: parse a seed list and check that every seed fits np.random.RandomState."""
    if value is None:
        return None
    seeds = parse_range(value)
    too_big = [seed for seed in seeds if seed > MAX_SEED]
    if too_big:
        raise click.BadParameter(f'seeds must be at most {MAX_SEED}, got {too_big[0]}')
    return seeds


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW images in about [-1, 1] -> NHWC uint8 array (the official rounding: x * 127.5 + 128, clamped)."""
    images = (images.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(image: np.ndarray) -> PIL.Image.Image:
    """HWC uint8 image -> PIL image: 1 channel is grayscale ('L'), 3 is RGB, 4 is RGBA."""
    modes = {1: 'L', 3: 'RGB', 4: 'RGBA'}
    channels = image.shape[2]
    if channels not in modes:
        raise ValueError(f'Cannot save an image with {channels} channels; PNG takes 1, 3 or 4')
    return PIL.Image.fromarray(image[:, :, 0] if channels == 1 else image, modes[channels])


def make_label(G: torch.nn.Module, class_idx: Optional[int], device: Any) -> torch.Tensor:
    """The one-hot label [1, c_dim] for `class_idx` (an empty [1, 0] label for unconditional networks).

    Raises ValueError when a conditional network gets no class or a class out of range. An unconditional
    network ignores `class_idx` with a warning, as the official script does.
    """
    label = torch.zeros([1, G.c_dim], device=device)
    if G.c_dim == 0:
        if class_idx is not None:
            warnings.warn(f'class {class_idx} ignored: the network is unconditional', stacklevel=2)
        return label
    if class_idx is None:
        raise ValueError(f'The network is conditional ({G.c_dim} classes): give a class label with --class')
    if not 0 <= class_idx < G.c_dim:
        raise ValueError(f'Class {class_idx} is out of range: the network has classes 0 to {G.c_dim - 1}')
    label[:, class_idx] = 1
    return label


def seed_to_z(seed: int, z_dim: int, device: Any) -> torch.Tensor:
    """The latent [1, z_dim] of a seed, as the official scripts draw it."""
    z = np.random.RandomState(seed).randn(1, z_dim)
    return torch.from_numpy(z).to(device=device, dtype=torch.float32)


@torch.no_grad()
def generate_images(
    G:              torch.nn.Module,        # Generator, already on `device`.
    seeds:          List[int],              # One image per seed.
    truncation_psi: float = 1.0,            # Truncation: 1 = none, 0 = the average image.
    noise_mode:     str = 'const',          # 'const', 'random' or 'none'.
    class_idx:      Optional[int] = None,   # Class of a conditional network.
    device:         Any = 'cpu',            # Device of G.
) -> List[np.ndarray]:
    """One HWC uint8 image per seed."""
    label = make_label(G, class_idx, device)
    images = []
    for seed in seeds:
        z = seed_to_z(seed, G.z_dim, device)
        img = G(z, label, truncation_psi=truncation_psi, noise_mode=noise_mode)
        images.append(to_uint8(img)[0])
    return images


def load_projected_w(path: str) -> np.ndarray:
    """The array under key 'w' of an .npz file, as projector.py writes it."""
    data = np.load(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f'"{path}" is not an .npz archive; expected one with key "w" (np.savez(path, w=...))')
    with data:
        if 'w' not in data.files:
            raise ValueError(f'"{path}" has no key "w" (it has: {", ".join(data.files) or "nothing"})')
        return data['w']


@torch.no_grad()
def synthesize_projected(G: torch.nn.Module, ws: np.ndarray, noise_mode: str = 'const', device: Any = 'cpu') -> List[np.ndarray]:
    """One HWC uint8 image per latent of `ws` ([N, num_ws, w_dim], e.g. from projector.py)."""
    ws = np.asarray(ws)
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f'Projected w has shape {list(ws.shape)}; this network needs [N, {G.num_ws}, {G.w_dim}]')
    ws = torch.from_numpy(ws).to(device=device, dtype=torch.float32)
    return [to_uint8(G.synthesis(w.unsqueeze(0), noise_mode=noise_mode))[0] for w in ws]


def resolve_device(name: Optional[str]) -> torch.device:
    """The --device option: None picks CUDA when available, else the CPU."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint='--device') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter(f'"{name}" asks for CUDA, but this PyTorch sees no CUDA device; use --device=cpu',
                                 param_hint='--device')
    return device


def load_generator(network: str, device: Any, adopt: bool = True) -> torch.nn.Module:
    """Load G_ema for a script (adopted into our classes unless `adopt` is False); every problem becomes a
    one-line click error."""
    try:
        return legacy.load_network(network, key='G_ema', device=device, adopt=adopt)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(f'Cannot load network "{network}": {e}') from e


# The --adopt option, shared by the scripts that load a generator.
ADOPT_HELP = ("Rebuild an official snapshot's networks as this code base's classes (fp32 off the GPU, our kernels); "
              "0 runs the classes embedded in the pickle")


def adopt_option(fn):
    return click.option('--adopt', type=bool, default=True, show_default=True, metavar='BOOL', help=ADOPT_HELP)(fn)


# ----------------------------------------------------------------------------


EXAMPLES = """\b
Examples:

\b
  # Six curated images of a pretrained network:
  python generate.py --outdir=out --trunc=0.7 --seeds=600-605 \\
      --network=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metfaces.pkl

\b
  # Class 3 of a conditional network, seeds 0 to 3 and 10:
  python generate.py --outdir=out --seeds=0-3,10 --class=3 --network=cifar10.pkl

\b
  # Render latents found by projector.py:
  python generate.py --outdir=out --projected-w=out/projected_w.npz --network=ffhq.pkl

\b
  # Run the classes embedded in an official pickle instead of adopting them:
  python generate.py --outdir=out --seeds=0-3 --network=ffhq.pkl --adopt=0
"""


@click.command(epilog=EXAMPLES)
@click.pass_context
@click.option('--network', 'network_pkl', help='Network snapshot: .pkl or weights-only .pt, path or URL', required=True)
@click.option('--seeds', callback=seeds_callback, help='Seeds, e.g. 0-3,7,10-12')
@click.option('--trunc', 'truncation_psi', type=float, default=1.0, show_default=True, help='Truncation psi')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), help='Class label (conditional networks)')
@click.option('--noise-mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True,
              help='Noise mode')
@click.option('--projected-w', type=click.Path(exists=True, dir_okay=False), help='Render latents from an .npz file '
              '(key "w", shape [N, num_ws, w_dim]) instead of seeds')
@click.option('--outdir', type=click.Path(file_okay=False), required=True, help='Where to save the images')
@click.option('--device', default=None, help='Torch device  [default: cuda if available, else cpu]')
@adopt_option
def main(
    ctx:            click.Context,
    network_pkl:    str,
    seeds:          Optional[List[int]],
    truncation_psi: float,
    class_idx:      Optional[int],
    noise_mode:     str,
    projected_w:    Optional[str],
    outdir:         str,
    device:         Optional[str],
    adopt:          bool,
) -> None:
    """Generate images with a trained network, one PNG per seed (seed0000.png, ...) or per projected latent."""
    if projected_w is None and seeds is None:
        raise click.UsageError('--seeds is required unless --projected-w is given', ctx=ctx)
    device = resolve_device(device)
    print(f'Loading network from "{network_pkl}"...')
    G = load_generator(network_pkl, device, adopt=adopt)
    os.makedirs(outdir, exist_ok=True)

    if projected_w is not None:
        if seeds is not None:
            print('warn: --seeds is ignored when using --projected-w')
        try:
            ws = load_projected_w(projected_w)
            images = synthesize_projected(G, ws, noise_mode=noise_mode, device=device)
        except (OSError, ValueError) as e:
            raise click.BadParameter(str(e), param_hint='--projected-w') from e
        for idx, image in enumerate(images):
            to_pil(image).save(os.path.join(outdir, f'proj{idx:02d}.png'))
        print(f'Wrote {len(images)} image(s) to "{outdir}"')
        return

    if G.c_dim == 0 and class_idx is not None:
        print(f'warn: --class={class_idx} ignored when running on an unconditional network')
        class_idx = None
    if G.c_dim != 0:
        if class_idx is None:
            raise click.UsageError(f'The network is conditional ({G.c_dim} classes): give a class label with --class',
                                   ctx=ctx)
        if class_idx >= G.c_dim:
            raise click.BadParameter(f'the network has classes 0 to {G.c_dim - 1}, got {class_idx}',
                                     param_hint='--class')

    for idx, seed in enumerate(seeds):
        print(f'Generating image for seed {seed} ({idx + 1}/{len(seeds)}) ...')
        image = generate_images(G, [seed], truncation_psi=truncation_psi, noise_mode=noise_mode,
                                class_idx=class_idx, device=device)[0]
        to_pil(image).save(os.path.join(outdir, f'seed{seed:04d}.png'))


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
