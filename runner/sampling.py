"""What the generator scripts (generate.py, style_mixing.py, projector.py) share: seed lists and the latents
they name, class labels, the conversion of images to uint8 and PIL, and loading a network onto a device behind
the --device and --adopt options, with every problem turned into a one-line click error.

It lives in the package, not in one of the scripts, so that a script does not import another script; generate.py
re-exports these names for the users that import them from there.
"""

import re
import warnings
from typing import Any, List, Optional

import click
import numpy as np
import PIL.Image
import torch

from runner.run_dir import directory_problem
from torch_utils import compiler
from training import snapshot_io

MAX_SEED = 2 ** 32 - 1  # np.random.RandomState accepts seeds up to this value.
# Most numbers one list may expand to: 20 times the 50k images of an FID, and far below a list whose Python ints
# alone would exhaust memory (`0-4294967295` would hold 4e9 of them before the first image is made).
MAX_LIST_LENGTH = 1_000_000

# ----------------------------------------------------------------------------
# Seeds, latents and labels.


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
        if len(values) + last - first + 1 > MAX_LIST_LENGTH:
            raise click.BadParameter(f'{text!r} names more than {MAX_LIST_LENGTH:,} numbers; give at most that '
                                     f'many per call')
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


def outdir_callback(_ctx, _param, value: Optional[str]) -> Optional[str]:
    """click callback of --outdir: refuse, before the network is loaded, a folder that could not be made (one
    below a regular file, or in a read-only place), instead of a traceback from os.makedirs after the work."""
    if value is not None:
        problem = directory_problem(value)
        if problem is not None:
            raise click.BadParameter(f'cannot create "{value}": {problem}')
    return value


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


# ----------------------------------------------------------------------------
# Images.


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


# ----------------------------------------------------------------------------
# Loading a network for a script.


def script_device(name: Optional[str]) -> torch.device:
    """The --device of a one-process script: any torch device name ('cuda:1', 'cpu'); None picks CUDA when
    available, else the CPU. (torch_utils.distributed.resolve_device places the processes of a launch instead:
    --gpus and --device auto|cuda|cpu.)"""
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
        return snapshot_io.load_network(network, key='G_ema', device=device, adopt=adopt)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(f'Cannot load network "{network}": {e}') from e


# The --adopt option, shared by the scripts that load a generator.
ADOPT_HELP = ("Rebuild an official snapshot's networks as this code base's classes (fp32 off the GPU, our kernels); "
              "0 runs the classes embedded in the pickle")


def adopt_option(fn):
    return click.option('--adopt', type=bool, default=True, show_default=True, metavar='BOOL', help=ADOPT_HELP)(fn)


# The --compile option of the scripts that run a generator (and calc_metrics.py).
COMPILE_HELP = ('torch.compile the network (inductor; the first images wait for the compilation, later ones run '
                'faster; results agree with eager to float rounding)')


def compile_option(fn):
    return click.option('--compile', 'compile_net', is_flag=True, default=False, help=COMPILE_HELP)(fn)


def check_compile(device: Any) -> None:
    """A click error (one line) unless torch.compile can work on `device`; call it before loading anything."""
    try:
        compiler.check_available(torch.device(device))
    except compiler.CompileUnavailable as e:
        raise click.ClickException(f'--compile: {e}') from e


def compiled(module: torch.nn.Module, device: Any):
    """`module` compiled for `device` (a wrapper with the module's attributes; the module itself is unchanged)."""
    return compiler.compile_module(module, torch.device(device))
