"""Adoption: networks of classes embedded in a snapshot rebuilt as this code base's classes.

An official `.pkl` unpickles into the classes embedded in it, which, for example, compute their fp16 layers in
float16 even on the CPU (two orders of magnitude slower than float32 there). `adopt_network` rebuilds such a
network as the class of the same name in `training.networks` / `training.augment` from its constructor
arguments and copies every tensor, after checking that the two compute the same outputs. A network that cannot
be adopted (a class we lack, arguments our class rejects, tensors that do not fit, other outputs) keeps its
embedded class, and a one-line note says why. `snapshot_io.load_network` (what the scripts call) adopts by
default; `snapshot_io.load_network_pkl` keeps the official behaviour (embedded classes) unless asked.
"""

from typing import Dict, Optional, Tuple

import torch

from torch_utils import misc, persistence
from training import augment, networks
from training.snapshot_dict import NETWORK_KEYS, device_of, first_line, list_some

ADOPT_TOLERANCE = 1e-3  # Largest output difference, relative to the output's magnitude, that counts as "the same".


def adoptable_classes() -> Dict[str, type]:
    """Class name -> class, for every persistent class of training.networks and training.augment: the classes
    an embedded network of the same name can be rebuilt as."""
    classes = dict()
    for module in (networks, augment):
        for name, value in vars(module).items():
            if isinstance(value, type) and persistence.is_persistent(value) and value.__name__ == name:
                classes[name] = value
    return classes


def _class_origin(cls: type) -> str:
    """How a note names a class: embedded classes live in modules made from snapshot source (persistence)."""
    if cls.__module__.startswith('_imported_module_'):
        return f'{cls.__name__}, from the source stored in the snapshot'
    return f'{cls.__module__}.{cls.__name__}'


def adopt_network(
    net:            Optional[torch.nn.Module],  # A network of a loaded snapshot (or None).
    name:           str = 'network',            # What the note calls it ("G_ema", "D", ...).
    verify:         bool = True,                # Compare the fp32 outputs of G / D before accepting the rebuild.
) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    """Rebuild `net` as this code base's class of the same name and return `(network, note)`.

    The rebuilt network is constructed from `net.init_args` / `net.init_kwargs`, receives every parameter and
    buffer (`misc.copy_params_and_buffers(..., require_all=True)`; both sides must hold the same names and
    shapes), is in eval mode without gradients, on the device of `net`. With `verify`, a Generator or
    Discriminator is accepted only if it computes the same fp32 outputs as `net` on a fixed input (const
    noise), so a snapshot whose code was changed while keeping the names keeps its own class.

    `note` is None when `net` was rebuilt, is already of our classes or is None; otherwise `net` is returned
    unchanged and `note` is one line saying why (e.g. "Kept the snapshot's own class for D (MyD, ...): ...").
    """
    if net is None:
        return None, None
    cls = type(net)
    ours = adoptable_classes().get(cls.__name__)
    if ours is cls:
        return net, None

    def keep(reason: str) -> Tuple[torch.nn.Module, str]:
        return net, f"Kept the snapshot's own class for {name} ({_class_origin(cls)}): {reason}"

    if ours is None:
        return keep(f'this code base has no class named {cls.__name__} (training.networks, training.augment)')
    our_name = f'{ours.__module__}.{ours.__name__}'
    if not persistence.is_persistent(net):
        return keep('it does not record its constructor arguments')
    try:
        new = ours(*net.init_args, **net.init_kwargs)
    except Exception as e:  # Whatever the constructor dislikes about foreign arguments.
        return keep(f'{our_name} rejects its constructor arguments ({type(e).__name__}: {first_line(e)})')
    mismatch = _tensor_mismatch(net, new)
    if mismatch is not None:
        return keep(f'its tensors do not fit {our_name}: {mismatch}')
    new = new.eval().requires_grad_(False).to(device_of(net))
    misc.copy_params_and_buffers(net, new, require_all=True)
    if verify and ours in (networks.Generator, networks.Discriminator):
        problem = _output_mismatch(net, new)
        if problem is not None:
            return keep(f'{our_name} with the same weights {problem}')
    return new, None


def adopt_snapshot(
    data:           dict,                       # A snapshot dict as load_network_pkl returns it.
    verbose:        bool = True,                # Print the note of every network that keeps its embedded class.
    verify:         bool = True,                # See adopt_network.
) -> dict:
    """A copy of the snapshot dict with every network adopted (see adopt_network)."""
    data = dict(data)
    for key in NETWORK_KEYS:
        if isinstance(data.get(key), torch.nn.Module):
            data[key], note = adopt_network(data[key], name=key, verify=verify)
            if note is not None and verbose:
                print(note)
    return data


def _tensor_mismatch(src: torch.nn.Module, dst: torch.nn.Module) -> Optional[str]:
    """None if both hold the same tensor names with the same shapes, else a short description."""
    src_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(src)}
    dst_shapes = {name: tuple(t.shape) for name, t in misc.named_params_and_buffers(dst)}
    problems = []
    missing = [name for name in dst_shapes if name not in src_shapes]
    extra = [name for name in src_shapes if name not in dst_shapes]
    reshaped = [name for name in dst_shapes if name in src_shapes and src_shapes[name] != dst_shapes[name]]
    if extra:
        problems.append(f'only the snapshot has {list_some(extra)}')
    if missing:
        problems.append(f'the snapshot lacks {list_some(missing)}')
    for name in reshaped[:3]:
        problems.append(f'{name} is {list(src_shapes[name])} in the snapshot, {list(dst_shapes[name])} here')
    return '; '.join(problems) if problems else None


@torch.no_grad()
def _output_mismatch(old: torch.nn.Module, new: torch.nn.Module) -> Optional[str]:
    """None if `old` and `new` give the same fp32 outputs on a fixed input, else what differs.

    Generators run with const noise, so neither draws random numbers; the global RNG state is kept anyway.
    """
    device = device_of(new)
    gen = torch.Generator().manual_seed(123)
    c_dim = int(getattr(new, 'c_dim', 0))
    c = torch.zeros([1, c_dim], device=device)
    c[:, :1] = 1  # Class 0 of a conditional network.
    # One sample: the check costs one forward pass of each network (seconds for a 1024x1024 G on a CPU).
    if isinstance(new, networks.Generator):
        inputs = (torch.randn([1, new.z_dim], generator=gen).to(device), c)
        kwargs = dict(noise_mode='const', force_fp32=True)
    else:
        img = torch.randn([1, new.img_channels, new.img_resolution, new.img_resolution], generator=gen)
        inputs = (img.to(device), c)
        kwargs = dict(force_fp32=True)
    was_training = old.training
    try:
        with torch.random.fork_rng(devices=[]):
            old.eval()
            ref = old(*inputs, **kwargs).to(torch.float32)
            out = new(*inputs, **kwargs).to(torch.float32)
    except Exception as e:  # The snapshot's code may not take the official call signature.
        return f'cannot be compared to the snapshot\'s network ({type(e).__name__}: {first_line(e)})'
    finally:
        old.train(was_training)
    if ref.shape != out.shape:
        return f'gives outputs of shape {list(out.shape)}, the snapshot\'s network {list(ref.shape)}'
    diff = float((out - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    if not diff <= ADOPT_TOLERANCE * scale:  # Also catches NaN.
        return (f'computes other outputs (max |difference| {diff:.3g}): the snapshot\'s own code computes something '
                f'else than the official code that class reproduces')
    return None
