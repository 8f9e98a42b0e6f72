"""Snapshot loading and conversion where official scripts and third-party tools look for it: `import legacy`.

The code lives in package `training` (snapshot_io.py: reading, writing, converting; adoption.py; tf_import.py;
weights_only.py); this module re-exports the names official code and the README use, so that

    import legacy
    with dnnlib.util.open_url(url) as f:
        G = legacy.load_network_pkl(f)['G_ema']

works as with the official code base (plus `legacy.load_network(url)`, which also adopts official networks
into this code base's classes). As a script it is the official converter, and our two-argument one:

    python legacy.py --source=stylegan2-ffhq-config-f.pkl --dest=ffhq.pkl [--force-fp16=BOOL] [--adopt=BOOL]
    python legacy.py convert network-snapshot-000100.pkl network-snapshot-000100.pt
"""

import sys
from typing import List, Optional

import click
import torch

import dnnlib
from training.adoption import adopt_network, adopt_snapshot, adoptable_classes
from training.snapshot_dict import NETWORK_KEYS, first_line
from training.snapshot_io import (
    convert,
    load_network,
    load_network_pkl,
    refuse_overwriting_the_source,
    save_network_pkl,
    saver_for,
)
from training.tf_import import TFNetworkStub, convert_tf_discriminator, convert_tf_generator, convert_tf_snapshot
from training.weights_only import (
    WEIGHTS_FORMAT,
    WEIGHTS_VERSION,
    load_weights_only,
    save_weights_only,
    snapshot_to_weights_only,
)

_TFNetworkStub = TFNetworkStub  # The name official code uses for its stand-in.

__all__ = [
    'NETWORK_KEYS', 'TFNetworkStub', 'WEIGHTS_FORMAT', 'WEIGHTS_VERSION', 'adopt_network', 'adopt_snapshot',
    'adoptable_classes', 'cli', 'convert', 'convert_command', 'convert_network_pickle', 'convert_tf_discriminator',
    'convert_tf_generator', 'convert_tf_snapshot', 'load_network', 'load_network_pkl', 'load_weights_only', 'main',
    'save_network_pkl', 'save_weights_only', 'snapshot_to_weights_only',
]

# ----------------------------------------------------------------------------
# Command line.


@click.group()
def cli() -> None:
    """Snapshot tools."""


@cli.command('convert')
@click.argument('src')
@click.argument('dst')
def convert_command(src: str, dst: str) -> None:
    """Convert snapshot SRC (.pkl or weights-only .pt, path or URL) to DST; DST's extension picks the format.

    A weights-only file loads with torch.load(weights_only=True), without running code stored in the file.
    """
    try:
        data = convert(src, dst)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(str(e)) from e
    networks_found = [key for key, value in data.items() if isinstance(value, torch.nn.Module)]
    click.echo(f'Wrote {dst} ({", ".join(networks_found)})')


CONVERT_EXAMPLES = """\b
Examples:

\b
  # A TensorFlow StyleGAN2 pickle as a PyTorch pickle of this code base's classes:
  python legacy.py \\
      --source=https://nvlabs-fi-cdn.nvidia.com/stylegan2/networks/stylegan2-cat-config-f.pkl \\
      --dest=stylegan2-cat-config-f.pkl

\b
  # An official PyTorch snapshot, adopted into our classes and prepared for fp16 training:
  python legacy.py --source=ffhq.pkl --dest=ffhq-ours.pkl --force-fp16=1

\b
  # Keep the classes embedded in the source pickle; write a weights-only file instead of a pickle:
  python legacy.py --source=ffhq.pkl --dest=ffhq-copy.pkl --adopt=0
  python legacy.py --source=ffhq.pkl --dest=ffhq.pt
"""


@click.command(epilog=CONVERT_EXAMPLES)
@click.option('--source', required=True, metavar='PATH|URL',
              help='Snapshot to convert: a TensorFlow or PyTorch .pkl, or a weights-only .pt')
@click.option('--dest', required=True, metavar='PATH',
              help='Output: a PyTorch pickle, or a weights-only file if the name ends in .pt')
@click.option('--force-fp16', type=bool, default=False, show_default=True, metavar='BOOL',
              help='Rebuild G, D, G_ema with the training-time fp16 settings (num_fp16_res=4, conv_clamp=256)')
@click.option('--adopt', type=bool, default=True, show_default=True, metavar='BOOL',
              help="Rebuild networks as this code base's classes; 0 keeps the classes embedded in the pickle")
def convert_network_pickle(source: str, dest: str, force_fp16: bool, adopt: bool) -> None:
    """Convert a network snapshot into this code base's PyTorch format.

    Reads TensorFlow pickles of the StyleGAN2 and StyleGAN2-ADA TensorFlow releases (config E/F networks;
    not StyleGAN1, configs A-D or the comparison methods), official and our PyTorch pickles, and weights-only
    files. No TensorFlow needed.
    """
    try:
        refuse_overwriting_the_source(source, dest)
        print(f'Loading "{source}"...')
        with dnnlib.util.open_url(source) as f:
            data = load_network_pkl(f, force_fp16=force_fp16, adopt=adopt)
        print(f'Saving "{dest}"...')
        saver_for(dest, default=save_network_pkl)(data, dest)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(first_line(e)) from None
    print('Done.')


def main(args: Optional[List[str]] = None) -> None:
    """`convert SRC DST` runs our two-argument converter (`cli`); any other command line is the official one."""
    args = sys.argv[1:] if args is None else list(args)
    command = cli if args[:1] == ['convert'] else convert_network_pickle
    command(args)


if __name__ == '__main__':
    main()
