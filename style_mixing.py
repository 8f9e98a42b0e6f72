"""Style mixing: images whose coarse or fine styles come from another latent.

Example (the figure of the StyleGAN paper):

    python style_mixing.py --outdir=out --rows=85,100,75,458,1500 --cols=55,821,1789,293 \\
        --network=network-snapshot-000100.pkl

Every row seed and column seed is mapped to w (with truncation). The image at (row, col) takes the w rows
listed in --styles (layers of the synthesis network, 0 = the 4x4 block) from the column seed and all other rows
from the row seed. Writes `<row>-<col>.png` for every mix, `<seed>-<seed>.png` for the unmixed images, and
`grid.png` with the column images on top, the row images on the left and the mixes in between.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import click
import numpy as np
import PIL.Image
import torch

from runner import host_memory
from runner.errors import FiniteFloatRange
from runner.sampling import (
    adopt_option,
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

# ----------------------------------------------------------------------------


def num_range(s: str) -> List[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]: the official name (third-party code imports it) of parse_range."""
    return parse_range(s)


# ----------------------------------------------------------------------------


@torch.no_grad()
def style_mix(
    G:              torch.nn.Module,        # Generator, already on `device`.
    row_seeds:      List[int],              # Seeds that give the styles not listed in col_styles.
    col_seeds:      List[int],              # Seeds that give the styles listed in col_styles.
    col_styles:     List[int],              # Indices of the w rows taken from the column seed.
    truncation_psi: float = 1.0,            # Truncation applied to every w.
    noise_mode:     str = 'const',          # 'const', 'random' or 'none'.
    class_idx:      Optional[int] = None,   # Class of a conditional network.
    device:         Any = 'cpu',            # Device of G.
) -> Dict[Tuple[int, int], np.ndarray]:
    """HWC uint8 images keyed by (row seed, col seed); (s, s) is seed s unmixed."""
    bad = [idx for idx in col_styles if not 0 <= idx < G.num_ws]
    if bad:
        raise ValueError(f'Style index {bad[0]} is out of range: this network has {G.num_ws} w rows (0-{G.num_ws - 1})')
    label = make_label(G, class_idx, device)

    # The official script's batching and arithmetic, step by step, so that its PNGs come out byte for byte (a
    # batched matmul or grouped convolution may round differently for another batch size or row order): all
    # seeds in one batch, in the order of a set of them, through the mapping without truncation; truncation as
    # w_avg + (w - w_avg) * psi on every row (also at psi = 1, where it can move the last bit); the unmixed
    # images in that same batch; then every mix on its own, a batch of one.
    all_seeds = list(set(row_seeds + col_seeds))
    z = torch.cat([seed_to_z(seed, G.z_dim, device) for seed in all_seeds])
    ws = G.mapping(z, label.expand(len(all_seeds), -1))
    w_avg = G.mapping.w_avg
    ws = w_avg + (ws - w_avg) * truncation_psi
    w_of = dict(zip(all_seeds, ws, strict=True))

    images = dict()
    for seed, image in zip(all_seeds, to_uint8(G.synthesis(ws, noise_mode=noise_mode)), strict=True):
        images[(seed, seed)] = image
    for row_seed in row_seeds:
        for col_seed in col_seeds:
            w = w_of[row_seed].clone()
            w[col_styles] = w_of[col_seed][col_styles]
            images[(row_seed, col_seed)] = to_uint8(G.synthesis(w.unsqueeze(0), noise_mode=noise_mode))[0]
    return images


def make_grid(images: Dict[Tuple[int, int], np.ndarray], row_seeds: List[int], col_seeds: List[int]) -> PIL.Image.Image:
    """The grid figure: an empty corner, column images along the top, row images down the left, mixes inside."""
    height, width = next(iter(images.values())).shape[:2]
    mode = to_pil(next(iter(images.values()))).mode
    canvas = PIL.Image.new(mode, (width * (len(col_seeds) + 1), height * (len(row_seeds) + 1)), 'black')
    for col_idx, col_seed in enumerate(col_seeds):
        canvas.paste(to_pil(images[(col_seed, col_seed)]), (width * (col_idx + 1), 0))
    for row_idx, row_seed in enumerate(row_seeds):
        canvas.paste(to_pil(images[(row_seed, row_seed)]), (0, height * (row_idx + 1)))
        for col_idx, col_seed in enumerate(col_seeds):
            canvas.paste(to_pil(images[(row_seed, col_seed)]), (width * (col_idx + 1), height * (row_idx + 1)))
    return canvas


def styles_callback(_ctx, _param, value: str) -> List[int]:
    return parse_range(value)


# ----------------------------------------------------------------------------


EXAMPLES = """\b
Examples:

\b
  # The style-mixing figure of the StyleGAN paper (coarse styles, w rows 0-6, from the column seeds):
  python style_mixing.py --outdir=out --rows=85,100,75,458,1500 --cols=55,821,1789,293 \\
      --network=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metfaces.pkl

\b
  # Fine styles only (w rows 8 and up of a 256x256 stock network, whose 14 rows are 0-13):
  python style_mixing.py --outdir=out --rows=1-3 --cols=10-12 --styles=8-13 --network=ffhq256.pkl
"""


@click.command(epilog=EXAMPLES)
@click.option('--network', 'network_pkl', help='Network snapshot: .pkl or weights-only .pt, path or URL', required=True)
@click.option('--rows', 'row_seeds', callback=seeds_callback, required=True, help='Seeds of the rows, e.g. 0-3,7')
@click.option('--cols', 'col_seeds', callback=seeds_callback, required=True, help='Seeds of the columns, e.g. 10-12')
@click.option('--styles', 'col_styles', callback=styles_callback, default='0-6', show_default=True,
              help='w rows (synthesis layers) taken from the column seed')
@click.option('--trunc', 'truncation_psi', type=FiniteFloatRange(), default=1.0, show_default=True, help='Truncation psi')
@click.option('--class', 'class_idx', type=click.IntRange(min=0), help='Class label (conditional networks)')
@click.option('--noise-mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True,
              help='Noise mode')
@click.option('--outdir', type=click.Path(file_okay=False), callback=outdir_callback, required=True,
              help='Where to save the images')
@click.option('--device', default=None, help='Torch device  [default: cuda if available, else cpu]')
@adopt_option
def main(
    network_pkl:    str,
    row_seeds:      List[int],
    col_seeds:      List[int],
    col_styles:     List[int],
    truncation_psi: float,
    class_idx:      Optional[int] = None,
    noise_mode:     str = 'const',
    outdir:         str = None,
    device:         Optional[str] = None,
    adopt:          bool = True,
) -> None:
    """Write a style-mixing grid (grid.png) and its images (<row>-<col>.png)."""
    host_memory.keep_freed_memory()
    device = script_device(device)
    print(f'Loading network from "{network_pkl}"...')
    G = load_generator(network_pkl, device, adopt=adopt)
    bad = [idx for idx in col_styles if idx >= G.num_ws]
    if bad:
        raise click.BadParameter(f'style index {bad[0]} is out of range: this network has {G.num_ws} w rows '
                                 f'(0-{G.num_ws - 1})', param_hint='--styles')
    if G.c_dim == 0 and class_idx is not None:
        print(f'warn: --class={class_idx} ignored when running on an unconditional network')
        class_idx = None
    try:
        make_label(G, class_idx, device)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--class') from e

    print('Generating images...')
    images = style_mix(G, row_seeds, col_seeds, col_styles, truncation_psi=truncation_psi, noise_mode=noise_mode,
                       class_idx=class_idx, device=device)
    os.makedirs(outdir, exist_ok=True)
    print('Saving images...')
    for (row_seed, col_seed), image in images.items():
        to_pil(image).save(os.path.join(outdir, f'{row_seed}-{col_seed}.png'))
    print('Saving image grid...')
    make_grid(images, row_seeds, col_seeds).save(os.path.join(outdir, 'grid.png'))


# The official name of the command (third-party code imports it and calls it or its callback).
generate_style_mix = main

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
