"""Generate images with a trained generator.

Examples:

    # Six curated images of a pretrained network:
    python generate.py --outdir=out --trunc=0.7 --seeds=600-605 --network=network-snapshot-000100.pkl

    # Class 3 of a conditional network, seeds 0 to 3 and 10:
    python generate.py --outdir=out --seeds=0-3,10 --class=3 --network=cifar10.pkl

    # Render latents found by projector.py:
    python generate.py --outdir=out --projected-w=projected_w.npz --network=ffhq.pkl

The network may be an official or our own `.pkl` snapshot, a TensorFlow pickle of the StyleGAN2(-ADA)
TensorFlow releases, or a weights-only `.pt` file (training/snapshot_io.py); a weights-only file runs no code stored
in it. Networks of official snapshots are rebuilt as this code base's classes ("adopted": fp32 on the CPU, our
kernels); `--adopt=0` runs the classes embedded in the pickle instead. Image i of seed s uses
z = RandomState(s).randn(1, z_dim), as the official script does, so seeds name the same images in both code bases.
"""

import os
import types
from typing import Any, List, Optional

import click
import numpy as np
import torch

# The helpers the generator scripts share live in the package (a script should not import another script);
# they stay importable from here because they were first defined here and outside code imports them so.
from runner import host_memory
from runner.errors import FiniteFloatRange
from runner.sampling import (
    ADOPT_HELP,
    MAX_SEED,
    adopt_option,
    check_compile,
    compile_option,
    compiled,
    load_generator,
    make_label,
    outdir_callback,
    parse_range,
    script_device,
    seed_to_z,
    seeds_callback,
    to_pil,
    to_uint8,
)

__all__ = ['ADOPT_HELP', 'MAX_SEED', 'adopt_option', 'generate_images', 'load_generator', 'load_projected_w', 'main',
           'make_label', 'num_range', 'parse_range', 'render_images', 'script_device', 'seed_to_z', 'seeds_callback',
           'synthesize_projected', 'to_pil', 'to_uint8']

def num_range(s: str) -> List[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]: the official name (third-party code imports it) of parse_range."""
    return parse_range(s)


# ----------------------------------------------------------------------------
# Images from seeds and from projected latents.


@torch.no_grad()
def render_images(
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
@click.option('--trunc', 'truncation_psi', type=FiniteFloatRange(), default=1.0, show_default=True, help='Truncation psi')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), help='Class label (conditional networks)')
@click.option('--noise-mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True,
              help='Noise mode')
@click.option('--projected-w', type=click.Path(exists=True, dir_okay=False), help='Render latents from an .npz file '
              '(key "w", shape [N, num_ws, w_dim]) instead of seeds')
@click.option('--outdir', type=click.Path(file_okay=False), callback=outdir_callback, required=True,
              help='Where to save the images')
@click.option('--device', default=None, help='Torch device  [default: cuda if available, else cpu]')
@adopt_option
@compile_option
def main(
    ctx:            click.Context,
    network_pkl:    str,
    seeds:          Optional[List[int]],
    truncation_psi: float,
    class_idx:      Optional[int],
    noise_mode:     str,
    projected_w:    Optional[str],
    outdir:         str,
    device:         Optional[str] = None,
    adopt:          bool = True,
    compile_net:    bool = False,
) -> None:
    """Generate images with a trained network, one PNG per seed (seed0000.png, ...) or per projected latent."""
    if projected_w is None and seeds is None:
        raise click.UsageError('--seeds is required unless --projected-w is given', ctx=ctx)
    host_memory.keep_freed_memory()
    device = script_device(device)
    if compile_net:
        check_compile(device)
    print(f'Loading network from "{network_pkl}"...')
    G = load_generator(network_pkl, device, adopt=adopt)
    os.makedirs(outdir, exist_ok=True)
    if compile_net:
        # The wrapper answers G's attributes (z_dim, c_dim, ...) from G itself; projected latents run G.synthesis.
        G = compiled(G, device) if projected_w is None else _with_compiled_synthesis(G, device)

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
        image = render_images(G, [seed], truncation_psi=truncation_psi, noise_mode=noise_mode,
                              class_idx=class_idx, device=device)[0]
        to_pil(image).save(os.path.join(outdir, f'seed{seed:04d}.png'))


def _with_compiled_synthesis(G: torch.nn.Module, device: Any) -> types.SimpleNamespace:
    """What synthesize_projected reads of G (--projected-w runs only the synthesis network), compiled."""
    return types.SimpleNamespace(num_ws=G.num_ws, w_dim=G.w_dim, synthesis=compiled(G.synthesis, device))


# The official name of the command, which third-party code imports and invokes (SPEC §7).
generate_images = main

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
