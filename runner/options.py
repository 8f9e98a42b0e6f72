"""The options of a training run: the preset table, the defaults, and the pure builder from command-line values
to the kwargs tree of `training.training_loop.training_loop` (train.py's docstring describes the tree, the run
description and the resume rules for the user).

`build_training_plan(**opts)` composes section builders (dataset, preset, networks, schedule, augmentation,
transfer), each of which returns its part of the tree and its run-description pieces; a `--resume` that names
a training state continues that run instead (`_continue_state`). What the builder needs from outside (the
dataset, the resume snapshot, the CUDA devices) goes through one small hook each (`inspect_dataset`,
`inspect_snapshot`, `_cuda_device_count`, `check_metrics_ready`), so that tests can build trees without image
files, snapshots, GPUs or feature networks.
"""

import copy
import os
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch

import dnnlib
from runner import metric_plan
from runner.errors import UserError, warn
from runner.metric_plan import parse_metrics
from torch_utils import compiler
from torch_utils import distributed as launcher  # Not `distributed`: that names the launch-environment argument.
from training import checkpoint, regularizers, snapshot_io
from training.augment import AUGPIPE_SPECS
from training.checkpoint import STATE_FILE_NAME
from training.dataset import data_loader_kwargs
from training.flags import Option
from training.networks import SYNTHESIS_BLOCKS, is_power_of_two, resolutions, synthesis_block_options
from training.regularizers.term import NetworkFacts

# ----------------------------------------------------------------------------
# Constants: presets, defaults, names.


class Preset(NamedTuple):
    """One row of the preset table (the official `--cfg` values)."""
    ref_gpus:   int             # Number of GPUs the preset was tuned for; batch_gpu = mb // ref_gpus.
    kimg:       int             # Training length in thousands of real images shown to D.
    mb:         int             # Total minibatch size.
    mbstd:      int             # Minibatch-std group size of D.
    fmaps:      float           # Capacity: channel_base = fmaps * 32768.
    lrate:      float           # Adam learning rate of G and D.
    gamma:      float           # R1 weight.
    ema:        float           # Half-life of G_ema in kimg.
    ramp:       Optional[float] # EMA ramp-up (fraction of images seen), None = off.
    map:        int             # Number of mapping-network layers.
    loss:       Mapping[str, Any] = {}  # Extra loss_kwargs.
    D:          Mapping[str, Any] = {}  # Extra D_kwargs.


PRESETS = {
    'stylegan2': Preset(ref_gpus=8, kimg=25000,  mb=32, mbstd=4,  fmaps=1.0, lrate=0.002,  gamma=10.0, ema=10.0,
                        ramp=None, map=8),
    'paper256':  Preset(ref_gpus=8, kimg=25000,  mb=64, mbstd=8,  fmaps=0.5, lrate=0.0025, gamma=1.0,  ema=20.0,
                        ramp=None, map=8),
    'paper512':  Preset(ref_gpus=8, kimg=25000,  mb=64, mbstd=8,  fmaps=1.0, lrate=0.0025, gamma=0.5,  ema=20.0,
                        ramp=None, map=8),
    'paper1024': Preset(ref_gpus=8, kimg=25000,  mb=32, mbstd=4,  fmaps=1.0, lrate=0.002,  gamma=2.0,  ema=10.0,
                        ramp=None, map=8),
    'cifar':     Preset(ref_gpus=2, kimg=100000, mb=64, mbstd=32, fmaps=1.0, lrate=0.0025, gamma=0.01, ema=500.0,
                        ramp=0.05, map=2, loss=dict(pl_weight=0, style_mixing_prob=0), D=dict(architecture='orig')),
}
CFG_NAMES = ('auto',) + tuple(PRESETS)

# Official transfer-learning sources for `--resume=<name>`.
_RESUME_URL_BASE = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/transfer-learning-source-nets/'
RESUME_PRESETS = {
    'ffhq256':      _RESUME_URL_BASE + 'ffhq-res256-mirror-paper256-noaug.pkl',
    'ffhq512':      _RESUME_URL_BASE + 'ffhq-res512-mirror-stylegan2-noaug.pkl',
    'ffhq1024':     _RESUME_URL_BASE + 'ffhq-res1024-mirror-stylegan2-noaug.pkl',
    'celebahq256':  _RESUME_URL_BASE + 'celebahq-res256-mirror-paper256-kimg100000-ada-target0.5.pkl',
    'lsundog256':   _RESUME_URL_BASE + 'lsundog-res256-paper256-kimg100000-noaug.pkl',
}

# The augmentation presets of `training/augment.py` (AUGPIPE_SPECS holds their parameters).
AUGPIPE_NAMES = tuple(AUGPIPE_SPECS)
AUG_MODES = ('ada', 'noaug', 'fixed')
PRECISIONS = ('fp16', 'bf16', 'fp32')   # --precision of the num_fp16_res blocks (training.networks.PRECISIONS + fp32).

# train.py's own options, each declared once: the click flag (runner/command_line.py), the default, the range
# check, the run-name piece (`desc`, under the option's name in RUN_DESC_ORDER) and, where the value lands in the
# tree as it is, the path (`tree`; the sections below decide the others). Given options with a `tree` replace the
# preset's value after the sections ran (`_apply_overrides`). In the order of `train.py --help`; the synthesis
# blocks' options follow --tick, the regularizers' follow --augpipe (`command_line_options`).
OPTIONS = (
    # General options.
    Option('gpus', int, 1, 'Number of processes (GPUs); 0 = train on the CPU', min=0, on_resume=True),
    Option('device', str, 'auto', 'Where the processes run; cpu runs --gpus processes on the CPU (gloo)',
           choices=launcher.DEVICES),
    Option('snap', int, 50, 'Ticks between image and network snapshots', min=1, on_resume=True,
           tree=('image_snapshot_ticks', 'network_snapshot_ticks')),
    Option('state_kimg', float, None, 'Also write the training state every N kimg (at the next tick), so that a '
           'preemption loses at most that much', min=0, min_open=True, on_resume=True, tree='state_kimg',
           default_help='with the network snapshots only'),
    Option('stop_snapshot', bool, True, 'On SIGTERM/SIGINT/SIGUSR1, write a network snapshot besides the training '
           'state', on_resume=True, tree='stop_snapshot'),
    Option('metrics', str, metric_plan.DEFAULT_METRICS, 'Comma-separated list of metrics, or "none"',
           parse=metric_plan.parse_metrics, on_resume=True),
    Option('seed', int, 0, 'Random seed', min=0, max=2 ** 32 - 1, tree='random_seed'),  # And the dataset's (_dataset_section).
    Option('desc', str, None, 'Extra text for the run directory name', desc='-{value}'),
    Option('detector_dir', str, None, 'Folder with the metrics\' feature networks (inception-2015-12-05.pt, '
           'vgg16.pt) for offline machines', metavar='DIRECTORY', on_resume=True, tree='detector_dir',
           default_help='$STYLEGAN_DETECTOR_DIR or the download cache'),
    # Dataset.
    Option('data', str, None, 'Dataset folder or .zip (as dataset_tool.py writes them)'),
    Option('cond', bool, False, 'Condition G and D on the dataset labels (dataset.json)', desc='-cond'),
    Option('subset', int, None, 'Use only this many images, drawn at random with --seed', min=1,
           desc='-subset{value}'),
    Option('mirror', bool, False, 'Also train on left-right mirrored copies', desc='-mirror'),
    # Base configuration.
    Option('cfg', str, 'auto', 'Preset (batch, learning rate, gamma, capacity, ...)', choices=CFG_NAMES),
    Option('gamma', float, None, 'R1 weight gamma (replaces the preset value)', min=0, tree='loss_kwargs.r1_gamma',
           desc='-gamma{value:g}'),
    Option('kimg', float, None, 'Training length in kimg (replaces the preset value; fractions allowed for short '
           'tests)', min=0, min_open=True, on_resume=True, tree='total_kimg', desc='-kimg{value:g}'),
    Option('batch', int, None, 'Total batch over all processes (replaces the preset value)', min=1,
           desc='-batch{value}'),
    Option('batch_gpu', int, None, 'Images per process and round: a smaller value accumulates gradients over more '
           'rounds (the out-of-memory fix; same result up to rounding)', min=1, on_resume=True),
    Option('glr', float, None, 'G learning rate (replaces the preset value)', min=0, min_open=True,
           tree='G_opt_kwargs.lr', desc='-glr{value:g}'),
    Option('dlr', float, None, 'D learning rate (replaces the preset value)', min=0, min_open=True,
           tree='D_opt_kwargs.lr', desc='-dlr{value:g}'),
    Option('mbstd_group', int, None, 'Minibatch-std group size of D (replaces the preset value)', min=1,
           tree='D_kwargs.epilogue_kwargs.mbstd_group_size', desc='-mbstd{value}'),
    # Capacity flags (named as in StyleGAN3's train.py) make small networks for CPU runs possible.
    Option('cbase', int, None, 'Capacity multiplier channel_base (replaces the preset value)', min=1,
           tree=('G_kwargs.synthesis_kwargs.channel_base', 'D_kwargs.channel_base'), desc='-cbase{value:d}'),
    Option('cmax', int, None, 'Max. feature maps per layer (replaces the preset value 512)', min=1,
           tree=('G_kwargs.synthesis_kwargs.channel_max', 'D_kwargs.channel_max'), desc='-cmax{value:d}'),
    Option('map_depth', int, None, 'Mapping network depth (replaces the preset value; --map is an alias)', min=1,
           aliases=('--map',), tree='G_kwargs.mapping_kwargs.num_layers', desc='-map{value:d}'),
    Option('tick', float, None, 'kimg per tick (progress line, snapshot unit)', min=0, min_open=True,
           on_resume=True, tree='kimg_per_tick', default_help='4'),
    # Augmentation.
    Option('aug', str, 'ada', 'ada: adaptive p; fixed: constant --p; noaug: none', choices=AUG_MODES,
           desc='-{value}', desc_always=True),
    Option('p', float, None, 'The constant probability of --aug=fixed', min=0, max=1, desc='-p{value:g}'),
    Option('target', float, 0.6, 'Overfitting heuristic r_t that --aug=ada steers towards', min=0, max=1,
           desc='-target{value:g}', desc_always=True),
    Option('augpipe', str, 'bgc', 'Which transforms the augmentation applies (preset name)', choices=AUGPIPE_NAMES,
           desc='-{value}', desc_always=True),
    # Transfer learning and resuming.
    Option('resume', str, None, f'Start from a snapshot ({", ".join(RESUME_PRESETS)}, .pkl path or URL), or '
           f'continue a run (its directory or {STATE_FILE_NAME})'),
    Option('freezed', int, None, 'Keep the D layers below this index fixed (transfer learning)', min=0,
           tree='D_kwargs.block_kwargs.freeze_layers', desc='-freezed{value:d}'),
    # Performance.
    Option('precision', str, 'fp16', 'Precision of the 4 highest-resolution blocks of G and D on a GPU: fp16 '
           '(official), bf16 (no overflow; H100/H200), or fp32 (= --fp32); everything else is float32',
           choices=PRECISIONS),
    Option('fp32', bool, False, 'Float32 everywhere: no fp16 layers, no activation clamping (= --precision=fp32)'),
    Option('nhwc', bool, False, 'Channels-last memory format for the fp16 layers'),
    Option('fast_demod', bool, None, 'Demodulation coefficients of G from one small matmul instead of the '
           'per-sample weights: the same values up to float rounding, training about 1.3x faster at the cifar '
           'shapes on the CPU (not bitwise the official numbers)', tree='loss_kwargs.fast_demod', default_help='off', on_resume=True),
    Option('nobench', bool, False, 'Do not let cuDNN time its algorithms (cudnn.benchmark off)'),
    Option('allow_tf32', bool, False, 'Let matmuls and convolutions run in TF32 on recent GPUs', tree='allow_tf32'),
    Option('compile', bool, None, 'torch.compile G and D in the main training phases (the regularization passes '
           'stay eager); snapshots are unchanged', on_resume=True, tree='compile', default_help='off'),
    Option('workers', int, 3, 'Data-loading worker processes per training process', min=0, on_resume=True),
)
ARCH_DEFAULT = 'skip'       # --arch: the official generator.


def arch_option() -> Option:
    """--arch, with the names registered in training.networks.SYNTHESIS_BLOCKS now."""
    return Option('arch', str, ARCH_DEFAULT, 'Generator synthesis block', choices=tuple(SYNTHESIS_BLOCKS))


def reg_option() -> Option:
    """--reg, with the regularizers registered in training.regularizers.REGULARIZERS now."""
    helps = ', '.join(regularizers.regularizer_class(name).help for name in regularizers.REGULARIZERS)
    return Option('reg', str, 'none', f'D regularizers, a comma-separated list: {helps}; none = off',
                  metavar='LIST', parse=_checked_regularizers)


def _checked_regularizers(value: str) -> str:
    regularizers.parse_regularizers(value)
    return value


def declared_options() -> Dict[str, Tuple[Option, str]]:
    """The options the synthesis blocks (networks.BlockOption) and the regularizers (training.flags.Option)
    declare: name -> (Option, the flags they apply to, e.g. '--arch=squeeze'), read from the registries now."""
    options = dict()
    for name, (block_option, owners) in synthesis_block_options().items():
        option = Option(name, block_option.type, block_option.default, block_option.help,
                        choices=block_option.choices, min=block_option.min)
        options[name] = (option, ' or '.join(f'--arch={owner}' for owner in owners))
    for name, (option, owners) in regularizers.regularizer_options().items():
        options[name] = (option, ' or '.join(f'--reg={owner}' for owner in owners))
    return options


def command_line_options() -> List[Tuple[Option, str]]:
    """Every option of train.py in the order of its help, as (Option, what it applies to or '')."""
    table = [(option, '') for option in OPTIONS]
    declared = declared_options()
    names = [option.name for option in OPTIONS]
    blocks = [(arch_option(), '')] + [declared[name] for name in synthesis_block_options()]
    regs = [(reg_option(), '')] + [declared[name] for name in regularizers.regularizer_options()]
    at_blocks, at_regs = names.index('tick') + 1, names.index('augpipe') + 1
    return table[:at_blocks] + blocks + table[at_blocks:at_regs] + regs + table[at_regs:]


def option_defaults() -> Dict[str, Any]:
    """The value of every option the user did not give (None: the builder decides), read from the registries
    now; click shows the same defaults."""
    return {option.name: option.default for option, _owners in command_line_options()}


# The options that may change when a training state is resumed; every other option is fixed by the state.
STATE_OVERRIDES = tuple(option.name for option in OPTIONS if option.on_resume)
DEFAULTS = {option.name: option.default for option in OPTIONS}   # Of train.py's own options (option_defaults()).
# Options that choose how to launch, not what to train: never reported as ignored.
_LAUNCH_OPTIONS = ('resume', 'device', 'distributed', 'check_devices', 'check_files')

# training_loop arguments that differ between the processes of one run; never part of the stored options.
_PER_PROCESS_KEYS = ('rank', 'device')



# ----------------------------------------------------------------------------
# Small helpers.


def _to_easydict(obj: Any) -> Any:
    """Nested dicts (e.g. read back from JSON or a state file) as nested EasyDicts."""
    if isinstance(obj, dict):
        return dnnlib.EasyDict({key: _to_easydict(value) for key, value in obj.items()})
    if isinstance(obj, list):
        return [_to_easydict(value) for value in obj]
    return obj


# ----------------------------------------------------------------------------
# Hooks into the data, the snapshots and the devices. Each is one small function, so that tests can build option
# trees without image files, snapshots or GPUs (they replace them).


def _cuda_device_count() -> int:
    """The CUDA devices this process sees; tests replace this hook."""
    return launcher.cuda_device_count()



def inspect_snapshot(path_or_url: str) -> dnnlib.EasyDict:
    """Load the snapshot `--resume` names and return what must fit the run: EasyDict(networks={name:
    EasyDict(img_resolution, img_channels, c_dim)}). Tests replace this hook.

    Everything that can go wrong with a resume target (missing, truncated, not a snapshot, unreachable URL)
    is reported here, before the run directory exists. The training loop loads the file again; a download is
    cached, so that costs a second read of the file, not a second download.
    """
    try:
        with dnnlib.util.open_url(path_or_url) as f:
            data = snapshot_io.load_network_pkl(f)
    except Exception as e:  # Unpickling an arbitrary file can raise anything; the message is what matters.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'--resume: cannot use "{path_or_url}": {first_line}') from None
    networks = dnnlib.EasyDict()
    for name in ('G', 'D', 'G_ema'):
        net = data.get(name)
        if isinstance(net, torch.nn.Module):
            networks[name] = dnnlib.EasyDict({key: getattr(net, key, None)
                                              for key in ('img_resolution', 'img_channels', 'c_dim')})
    return dnnlib.EasyDict(networks=networks)


def _check_resume_fits(resume_pkl: str, info: Mapping[str, Any]) -> None:
    """A snapshot can seed a run of another architecture or conditioning (the weights that fit are copied),
    but not one of another image size or channel count: those mismatches cannot be meant."""
    snapshot = inspect_snapshot(resume_pkl)
    if not snapshot.networks:
        raise UserError(f'--resume: "{resume_pkl}" holds none of the networks G, D, G_ema')
    for name, net in snapshot.networks.items():
        if net.img_resolution is not None and net.img_resolution != info.resolution:
            raise UserError(f'--resume: {name} of "{resume_pkl}" makes {net.img_resolution}x{net.img_resolution} '
                            f'images, but the training data is {info.resolution}x{info.resolution}; resize the '
                            f'dataset (dataset_tool.py --width --height) or resume from a matching snapshot')
        channels = info.get('num_channels')
        if net.img_channels is not None and channels is not None and net.img_channels != channels:
            raise UserError(f'--resume: {name} of "{resume_pkl}" has {net.img_channels} image channel(s), but the '
                            f'training data has {channels}')


def inspect_dataset(training_set_kwargs: Mapping[str, Any]) -> dnnlib.EasyDict:
    """Open the dataset once and return what the options depend on: name, resolution, has_labels, size,
    num_channels, label_dim.

    Tests replace this function with a stand-in, so that option trees can be built without image files.
    """
    try:
        dataset = dnnlib.util.construct_class_by_name(**training_set_kwargs)
    except ImportError as e:
        raise UserError(f'--data: cannot load the dataset class {training_set_kwargs["class_name"]}: {e}') from None
    except (OSError, ValueError) as e:
        raise UserError(f'--data: {e}') from None
    try:
        return dnnlib.EasyDict(name=dataset.name, resolution=dataset.resolution, has_labels=dataset.has_labels,
                               size=len(dataset), num_channels=dataset.num_channels, label_dim=dataset.label_dim)
    finally:
        if hasattr(dataset, 'close'):
            dataset.close()


# ----------------------------------------------------------------------------
# Devices and processes.


def distributed_env(environ: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """Where torchrun or an srun step placed this process, or None when it starts its ranks itself (see
    torch_utils/distributed.py for when SLURM variables count). Returns dict(rank, world_size, local_rank,
    master_addr, master_port); an incomplete or inconsistent environment is a UserError.
    """
    try:
        return launcher.launch_env(environ)
    except launcher.LaunchError as e:
        raise UserError(str(e)) from None


def resolve_launch(
    gpus:           Optional[int] = None,               # --gpus; None = default (1). 0 = one CPU process.
    device:         Optional[str] = None,               # --device: auto, cuda or cpu; None = auto.
    distributed:    Optional[Mapping[str, Any]] = None, # distributed_env() of a torchrun/srun process, or None.
    probe_devices:  bool = True,                        # Check that the CUDA devices exist (False: --dry-run).
) -> dnnlib.EasyDict:
    """How many processes train and on what: EasyDict(num_gpus, device_type) (torch_utils.distributed.
    resolve_device). Raises UserError on a mismatch. Without `probe_devices`, a CUDA request is taken at its
    word: a login node without GPUs can prepare a GPU job.
    """
    if gpus is None and distributed is None:
        gpus = DEFAULTS['gpus']
    try:
        return launcher.resolve_device(gpus, device or DEFAULTS['device'], distributed, probe_devices,
                                           count_devices=_cuda_device_count, work='train')
    except launcher.LaunchError as e:
        raise UserError(str(e)) from None


def _split_batch(batch_size: int, batch_gpu: int, num_gpus: int, mbstd: Optional[int], hint: str) -> None:
    """Check that `batch_size` splits into rounds of `batch_gpu` images on each of `num_gpus` processes."""
    if batch_size % num_gpus != 0:
        raise UserError(f'The batch size ({batch_size}) must be a multiple of the number of GPUs ({num_gpus}); '
                        f'{hint}')
    if batch_gpu < 1 or batch_size % (batch_gpu * num_gpus) != 0:
        raise UserError(f'The batch size ({batch_size}) must be a multiple of {num_gpus} GPU(s) x {batch_gpu} '
                        f'images per GPU; {hint}')
    if mbstd is not None and batch_gpu % min(mbstd, batch_gpu) != 0:
        raise UserError(f'The minibatch-std group of D ({mbstd}) must divide the per-GPU batch ({batch_gpu}); '
                        f'{hint}')


# ----------------------------------------------------------------------------
# The option builder.


def auto_preset(resolution: int, num_gpus: int) -> Preset:
    """The official `--cfg=auto` formulas: a preset scaled to the resolution and the number of processes."""
    mb = max(min(num_gpus * min(4096 // resolution, 32), 64), num_gpus)
    return Preset(
        ref_gpus    = num_gpus,
        kimg        = 25000,
        mb          = mb,
        mbstd       = min(mb // num_gpus, 4),
        fmaps       = 1 if resolution >= 512 else 0.5,
        lrate       = 0.002 if resolution >= 1024 else 0.0025,
        gamma       = 0.0002 * (resolution ** 2) / mb,
        ema         = mb * 10 / 32,
        ramp        = 0.05,
        map         = 2,
    )


def _find_state_file(resume: str) -> Optional[str]:
    """The training-state file that `--resume` names, or None when it names a snapshot (.pkl, URL, preset)."""
    if resume in RESUME_PRESETS or resume == 'noresume' or dnnlib.util.is_url(resume, allow_file_urls=True):
        return None
    if not os.path.exists(resume):
        raise UserError(f'--resume: "{resume}" does not exist (expected a preset ({", ".join(RESUME_PRESETS)}), '
                        f'a URL, a .pkl snapshot, a run directory or a {STATE_FILE_NAME} file)')
    is_dir = os.path.isdir(resume)
    if not is_dir and resume.lower().endswith('.pkl'):
        return None
    state_path = checkpoint.find_state_file(resume)
    if state_path is None:
        if is_dir:
            raise UserError(f'--resume: the directory "{resume}" holds no {STATE_FILE_NAME}')
        raise UserError(f'--resume: "{resume}" is neither a .pkl snapshot nor a training-state file')
    return state_path


def _continue_state(state_path: str, given: Mapping[str, Any]) -> tuple:
    """Options of a run that continues from its training state (see the docstring of train.py)."""
    try:
        stored = checkpoint.read_state_options(state_path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f'--resume: cannot read the options stored in "{state_path}": {e}') from None
    missing = [key for key in ('batch_size', 'batch_gpu', 'num_gpus', 'total_kimg', 'data_loader_kwargs')
               if not isinstance(stored, Mapping) or key not in stored]
    if missing:
        raise UserError(f'--resume: the options stored in "{state_path}" lack {", ".join(missing)}')
    args = _to_easydict(copy.deepcopy(dict(stored)))
    # The launcher gives each process its rank and device; a state may have recorded the values of the process
    # that wrote it.
    for key in _PER_PROCESS_KEYS:
        args.pop(key, None)

    ignored = [name for name in given if name not in STATE_OVERRIDES and name not in _LAUNCH_OPTIONS + ('data',)]
    if ignored:
        flags = ', '.join('--' + name.replace('_', '-') for name in ignored)
        warn(f'{flags} ignored: a resumed training state keeps its own options (only '
              f'{", ".join("--" + name.replace("_", "-") for name in STATE_OVERRIDES)} may change)')
    _apply_state_overrides(args, given)
    _check_length_left(state_path, args, given)

    if given.get('data') is not None:
        _relocate_data(args, given['data'], state_path)
    # The stored data must still be there: a dataset moved since the run started is reported now, not by the
    # data loader after the networks are built.
    try:
        inspect_dataset(args.training_set_kwargs)
    except UserError as e:
        raise UserError(f'--resume: the training data of this run cannot be read: {e.message.removeprefix("--data: ")}'
                        ) from None

    # Without --gpus the stored process count stays (under torchrun or srun, their world size decides); without
    # --device the run continues on the kind of device it ran on (a CPU run stays on the CPU).
    gpus = given.get('gpus')
    if gpus is None and given.get('distributed') is None:
        gpus = args.num_gpus
    device = given.get('device')
    if device is None and args.get('device_type') == 'cpu':
        device = 'cpu'
    launch = resolve_launch(gpus, device, given.get('distributed'), probe_devices=False)
    batch_gpu = given.get('batch_gpu') or args.batch_gpu
    if launch.num_gpus != args.num_gpus and given.get('batch_gpu') is None:
        # Keep the stored per-GPU batch where it still splits the batch evenly, so that each forward pass
        # sees the same number of images as before; otherwise give each process an equal share.
        if args.batch_size % (batch_gpu * launch.num_gpus) != 0:
            batch_gpu = args.batch_size // launch.num_gpus
    mbstd = args.get('D_kwargs', {}).get('epilogue_kwargs', {}).get('mbstd_group_size')
    _split_batch(args.batch_size, batch_gpu, launch.num_gpus, mbstd,
                 hint=f'the resumed run has batch {args.batch_size}: choose --gpus and --batch-gpu to divide it')
    args.num_gpus, args.batch_gpu, args.device_type = launch.num_gpus, batch_gpu, launch.device_type
    if given.get('check_files', True):
        metric_plan.check_metrics_ready(args.metrics, args.get('detector_dir'))
    if given.get('check_devices', True):
        resolve_launch(gpus, device, given.get('distributed'))

    # The state holds every weight; the snapshot the run once started from has done its job.
    args.resume_pkl = None
    _check_compile(args)
    args.resume_state = os.path.abspath(state_path)
    args.run_dir = os.path.dirname(os.path.abspath(state_path))
    run_desc = re.sub(r'^\d+-', '', os.path.basename(args.run_dir))
    return run_desc, args, launch


def _check_length_left(state_path: str, args: dnnlib.EasyDict, given: Mapping[str, Any]) -> None:
    """A resumed state must have images left to train: the loop trains one step before it looks at the length,
    so a `--kimg` at or below the run's progress would train a step past it and write a snapshot beyond the
    requested length. Refuse before anything is written, naming the progress and the final snapshot."""
    try:
        progress = checkpoint.load_training_state(state_path, mmap=True)['progress']
    except (OSError, ValueError) as e:
        raise UserError(f'--resume: cannot read the progress stored in "{state_path}": {e}') from None
    done_nimg = int(progress.get('cur_nimg', 0)) if isinstance(progress, Mapping) else 0
    if done_nimg < args.total_kimg * 1000:
        return
    run_dir = os.path.dirname(os.path.abspath(state_path))
    newest = checkpoint.newest_snapshot(run_dir)
    final = f'; its last snapshot is {newest}' if newest else ''
    asked = f'--kimg={given["kimg"]:g} is' if given.get('kimg') is not None else f'its length of {args.total_kimg:g} kimg is'
    raise UserError(f'--resume: the run in "{run_dir}" has already trained {done_nimg / 1000:g} kimg, so {asked} '
                    f'reached{final}. Nothing was written; give a --kimg above {done_nimg / 1000:g} to train on')


def _apply_state_overrides(args: dnnlib.EasyDict, given: Mapping[str, Any]) -> None:
    """The options in STATE_OVERRIDES that the command line gives replace the stored ones (except --gpus and
    --batch-gpu, which the launch decides)."""
    for option in OPTIONS:
        if option.on_resume and given.get(option.name) is not None:
            _write_option(args, option, given[option.name])
    if given.get('metrics') is not None:
        args.metrics = _metric_list(given['metrics'])
    if given.get('workers') is not None:
        args.data_loader_kwargs = _data_loader_kwargs(given['workers'], args.data_loader_kwargs)


def _relocate_data(args: dnnlib.EasyDict, data: str, state_path: str) -> None:
    """`--resume=<run> --data=<new path>`: continue on a moved (or copied) dataset, if it is the same data as
    far as the run can tell: image count, resolution, channels and labels. Otherwise name the differences."""
    recorded = args.training_set_kwargs
    # As the builder opened it: every image once (no subset, no x-flips), with labels if it has them.
    info = inspect_dataset({**recorded, 'path': data, 'max_size': None, 'xflip': False, 'use_labels': True})
    trained = checkpoint.read_state_data_info(state_path)
    differences = []
    if info.resolution != recorded.resolution:
        differences.append(f'{info.resolution}x{info.resolution} images instead of {recorded.resolution}x'
                           f'{recorded.resolution}')
    channels = trained.get('img_channels')
    if channels is not None and info.get('num_channels', channels) != channels:
        differences.append(f'{info.num_channels} image channel(s) instead of {channels}')
    c_dim = trained.get('c_dim')
    if recorded.use_labels and not info.has_labels:
        differences.append('no labels, but the run is conditional')
    elif recorded.use_labels and c_dim is not None and info.get('label_dim', c_dim) != c_dim:
        differences.append(f'labels of dimension {info.label_dim} instead of {c_dim}')
    # --subset runs train on max_size images drawn from a larger dataset; others on all of them.
    is_subset = '-subset' in os.path.basename(os.path.dirname(os.path.abspath(state_path)))
    if info.size < recorded.max_size or (info.size != recorded.max_size and not is_subset):
        differences.append(f'{info.size} images instead of {recorded.max_size}')
    if differences:
        raise UserError(f'--data: "{data}" does not match the data this run was trained on ("{recorded.path}"): '
                        f'{"; ".join(differences)}')
    warn(f'continuing on the data at "{data}" (was "{recorded.path}")')
    recorded.path = data


def _data_loader_kwargs(workers: int, base: Optional[Mapping[str, Any]] = None) -> dnnlib.EasyDict:
    """--workers as the run's DataLoader options; training.dataset.data_loader_kwargs decides them."""
    if workers < 0:
        raise UserError(f'--workers must be at least 0, got {workers}')
    return data_loader_kwargs(workers, base)


def build_training_plan(
    distributed:        Optional[dict] = None,      # distributed_env() under torchrun or srun, else None.
    check_devices:      bool = True,                # Check that the CUDA devices exist (False: --dry-run).
    check_files:        bool = True,                # Load the resume snapshot, find the metrics' feature networks
                                                    # (False: torchrun/srun ranks other than 0, which rank 0 speaks for).
    **options,                                      # train.py's options by name (command_line_options(): OPTIONS,
                                                    # --arch, --reg and what the blocks and the regularizers declare),
                                                    # None = not given; any other keyword is a TypeError naming it.
) -> tuple:
    """Command-line values -> (run_desc, args, EasyDict(num_gpus, device_type)): the options tree where
    `training_loop(run_dir=..., **args)` trains, and how to launch it (train.setup_training_options drops the
    latter).

    The values are those the click types of `main` accept (ranges and choices are checked there, once); this
    builder checks what depends on several options or on the data. Data and option errors come before device
    errors: a wrong --data is reported as such on any machine.
    """
    defaults = option_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f'build_training_plan() got unknown option(s) {", ".join(unknown)}')
    given = {name: options[name] for name in defaults if options.get(name) is not None}  # In the help's order.
    opts = dnnlib.EasyDict({**defaults, **given})
    launch_given = dict(distributed=distributed, check_devices=check_devices, check_files=check_files)

    # A training state continues its own run; nothing below applies to it.
    state_path = _find_state_file(opts.resume) if opts.resume is not None else None
    if state_path is not None:
        return _continue_state(state_path, {**given, **launch_given})

    launch = resolve_launch(given.get('gpus'), given.get('device'), distributed, probe_devices=False)
    args = _base_args(opts, launch)
    dataset, pieces, info = _dataset_section(opts)
    spec, preset_pieces = _preset_section(opts, info.resolution, launch.num_gpus)
    networks, network_pieces = _network_section(opts, given, spec)
    schedule = _schedule_section(opts, given, spec, launch.num_gpus)
    augment = _augment_section(opts, given)
    transfer, transfer_pieces = _transfer_section(opts, info, check_files)
    args.training_set_kwargs = dataset
    for part in (networks, schedule, augment, transfer):  # In this order: a transfer resets the EMA ramp-up.
        args.update(part)
    table_pieces = _apply_table_options(args, opts, given)
    reg_pieces = _regularizer_section(opts, given, info, args)  # After the capacity flags: it reads C[res].
    _check_freezed(opts.get('freezed'), args.D_kwargs, info.resolution)
    _check_desc(opts.get('desc'))
    for part in (preset_pieces, network_pieces, transfer_pieces, table_pieces, reg_pieces):
        pieces.update(part)
    run_desc = ''.join(pieces[key] for key in RUN_DESC_ORDER if key in pieces)

    if check_files:
        metric_plan.check_metrics_ready(args.metrics, opts.detector_dir)
    if check_devices:
        resolve_launch(given.get('gpus'), given.get('device'), distributed)
    _check_compile(args)
    return run_desc, args, launch


def _check_compile(args: Mapping[str, Any]) -> None:
    """--compile needs a working torch.compile where the run trains (a C++ compiler for inductor on the CPU):
    found missing now rather than after the dataset and the networks are set up."""
    if not args.get('compile'):
        return
    try:
        compiler.check_available(torch.device('cpu' if args.get('device_type') == 'cpu' else 'cuda'))
    except compiler.CompileUnavailable as e:
        raise UserError(f'--compile: {e}') from None


def _metric_list(value: Any) -> List[str]:
    """--metrics as a list of names the registry knows (a list passes through)."""
    try:
        metrics = parse_metrics(value)
    except ValueError as e:
        raise UserError(f'--metrics: {e}') from None
    metric_plan.validate_metrics(metrics)
    return metrics


def _apply_table_options(args: dnnlib.EasyDict, opts: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """Every option of OPTIONS with a `tree` writes its value (given, or a default that is not None) there,
    replacing what the sections derived from the preset; returns the run-name pieces (`desc`) of those given
    (the official script names --aug and --augpipe when they are given, even at their defaults)."""
    pieces = dict()
    for option in OPTIONS:
        value = opts.get(option.name)
        if value is None:
            continue
        _write_option(args, option, value)
        if option.name in given and option.desc_piece(value):
            pieces[option.name] = option.desc_piece(value)
    return pieces


def _write_option(args: dnnlib.EasyDict, option: Option, value: Any) -> None:
    """args[a][b] = value for each path 'a.b' of the option's `tree` (the dicts on the way exist: the sections
    made them)."""
    for path in option.tree_paths:
        *parents, key = path.split('.')
        node = args
        for parent in parents:
            node = node[parent]
        node[key] = option.tree_value(value)


def _check_desc(desc: Optional[str]) -> None:
    if desc is not None and not re.fullmatch(r'[A-Za-z0-9_.+=-]+', desc):
        raise UserError(f'--desc may hold letters, digits and _.+=- only (it becomes part of a directory name), '
                        f'got {desc!r}')


# The order of the run-description pieces (see the docstring of train.py); `block` holds the block options' pieces.
RUN_DESC_ORDER = ('data', 'cond', 'subset', 'mirror', 'cfg', 'arch', 'block', 'reg', 'cbase', 'cmax', 'map_depth', 'glr',
                  'dlr', 'mbstd_group', 'gamma', 'kimg', 'batch', 'aug', 'p', 'target', 'augpipe', 'resume', 'freezed',
                  'desc')


def _base_args(opts: dnnlib.EasyDict, launch: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """The options tree with what no section decides: the loop's fixed settings and the run's switches (None:
    written by OPTIONS' `tree`, `_apply_table_options`)."""
    metrics = _metric_list(opts.metrics)
    return dnnlib.EasyDict(
        training_set_kwargs     = None,
        data_loader_kwargs      = _data_loader_kwargs(opts.workers),
        G_kwargs                = None,
        D_kwargs                = None,
        G_opt_kwargs            = None,
        D_opt_kwargs            = None,
        augment_kwargs          = None,
        loss_kwargs             = None,
        metrics                 = metrics,
        random_seed             = None,
        num_gpus                = launch.num_gpus,
        batch_size              = None,
        batch_gpu               = None,
        ema_kimg                = None,
        ema_rampup              = None,
        G_reg_interval          = 4,
        D_reg_interval          = 16,
        augment_p               = 0.0,
        ada_target              = None,
        ada_kimg                = 500,
        total_kimg              = None,
        kimg_per_tick           = 4,
        image_snapshot_ticks    = None,
        network_snapshot_ticks  = None,
        resume_pkl              = None,
        resume_state            = None,
        cudnn_benchmark         = not opts.nobench,
        allow_tf32              = None,
        device_type             = launch.device_type,
        detector_dir            = None,
        state_kimg              = None,
        stop_snapshot           = None,
    )


def _dataset_section(opts: dnnlib.EasyDict) -> tuple:
    """--data --cond --subset --mirror -> (training_set_kwargs, the dataset's run-name piece, what the dataset
    holds). The random seed is the run's: a subset is drawn with it."""
    if opts.get('data') is None:
        raise UserError('--data is required: a dataset folder or .zip archive (see dataset_tool.py)')
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=True,
                             max_size=None, xflip=False, resolution=None, random_seed=opts.seed)
    info = inspect_dataset(kwargs)
    res = info.resolution
    if not is_power_of_two(res) or res < 4:
        raise UserError(f'--data: the images of "{opts.data}" are {res}x{res}; training needs a power of two '
                        f'(at least 4), e.g. 256 (dataset_tool.py can resize)')
    kwargs.update(resolution=res, max_size=info.size, use_labels=bool(opts.cond), xflip=bool(opts.mirror))
    if opts.cond and not info.has_labels:
        raise UserError(f'--cond=1 needs labels, but "{opts.data}" has none (dataset.json with "labels")')
    if opts.get('subset') is not None:
        if opts.subset > info.size:
            raise UserError(f'--subset must be between 1 and the dataset size ({info.size}), got {opts.subset}')
        kwargs.max_size = opts.subset
    return kwargs, dict(data=info.name), info


def _preset_section(opts: dnnlib.EasyDict, resolution: int, num_gpus: int) -> tuple:
    """--cfg -> (Preset, run-name pieces); `auto` is scaled to the resolution and the process count."""
    if opts.cfg == 'auto':
        return auto_preset(resolution, num_gpus), dict(cfg=f'-auto{num_gpus}')
    return PRESETS[opts.cfg], dict(cfg=f'-{opts.cfg}')


def _network_section(opts: dnnlib.EasyDict, given: Mapping[str, Any], spec: Preset) -> tuple:
    """--arch and the block options, the preset's capacity, mapping depth and mbstd group, precision ->
    (dict(G_kwargs, D_kwargs), run-name pieces). The flags that replace preset values are OPTIONS' `tree`."""
    synthesis_kwargs, pieces = _synthesis_section(opts, given)
    channel_base, channel_max = int(spec.fmaps * 32768), 512    # --cbase, --cmax replace them (OPTIONS).
    synthesis_kwargs.update(channel_base=channel_base, channel_max=channel_max)
    G_kwargs = dnnlib.EasyDict(class_name='training.networks.Generator', z_dim=512, w_dim=512,
                               mapping_kwargs=dnnlib.EasyDict(num_layers=spec.map), synthesis_kwargs=synthesis_kwargs)
    D_kwargs = dnnlib.EasyDict(class_name='training.networks.Discriminator', channel_base=channel_base,
                               channel_max=channel_max, num_fp16_res=4, conv_clamp=256, block_kwargs=dnnlib.EasyDict(),
                               mapping_kwargs=dnnlib.EasyDict(),
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=spec.mbstd), **spec.D)
    _apply_precision(opts, given.get('precision'), G_kwargs, D_kwargs)
    return dict(G_kwargs=G_kwargs, D_kwargs=D_kwargs), pieces


def freezable_d_layers(D_kwargs: Mapping[str, Any], resolution: int) -> int:
    """How many layers --freezed can freeze in the discriminator that `D_kwargs` builds for `resolution`: the
    layers of its blocks (b<resolution> ... b8), numbered as training.networks.DiscriminatorBlock numbers them:
    fromrgb in the first block (in every block with architecture 'skip'), conv0, conv1, and the skip
    connection with 'resnet'. The epilogue (b4) is never frozen."""
    architecture = D_kwargs.get('architecture', 'resnet')  # Discriminator's default.
    count = 0
    for res in resolutions(8, int(resolution)):
        count += int(res == resolution or architecture == 'skip') + 2 + int(architecture == 'resnet')
    return count


def _check_freezed(freezed: Optional[int], D_kwargs: Mapping[str, Any], resolution: int) -> None:
    """--freezed above D's layer count would freeze nothing more than all of them: the user meant a smaller
    number (or another network), so say how many there are."""
    if freezed is None:
        return
    count = freezable_d_layers(D_kwargs, resolution)
    if freezed > count:
        raise UserError(f'--freezed={freezed}: the discriminator at {resolution}x{resolution} has {count} layers that '
                        f'can be frozen (architecture {D_kwargs.get("architecture", "resnet")}); give at most {count}')


def _synthesis_section(opts: dnnlib.EasyDict, given: Mapping[str, Any]) -> tuple:
    """--arch and the options its block declares -> (synthesis_kwargs, run-name pieces). An option of another
    block is refused: `--squeeze-r` means nothing to `--arch=skip`."""
    kwargs = dnnlib.EasyDict(channel_base=None, channel_max=None, num_fp16_res=4, conv_clamp=256,
                             architecture=opts.arch)
    pieces = dict()
    if opts.arch != ARCH_DEFAULT:
        pieces['arch'] = f'-{opts.arch}'
    block_pieces = []
    for name, (option, owners) in synthesis_block_options().items():
        if opts.arch in owners:
            kwargs[option.block_kwarg] = option.block_value(opts[name])
            block_pieces.append(option.desc_piece(opts[name]))
        elif name in given:
            raise UserError(f'--{name.replace("_", "-")} applies only to '
                            f'{" or ".join("--arch=" + owner for owner in owners)} (got --arch={opts.arch})')
    pieces['block'] = ''.join(block_pieces)
    return kwargs, pieces


def _apply_precision(opts: dnnlib.EasyDict, precision: Optional[str], G_kwargs: dnnlib.EasyDict,
                     D_kwargs: dnnlib.EasyDict) -> None:
    """--precision (`precision`: the value given, or None) / --fp32 and --nhwc: performance switches, not part
    of the run name. --fp32 is the official spelling of --precision=fp32."""
    if opts.fp32 and precision not in (None, 'fp32'):
        raise UserError(f'--fp32 contradicts --precision={precision}')
    chosen = 'fp32' if opts.fp32 else opts.precision
    synthesis_kwargs = G_kwargs.synthesis_kwargs
    if chosen == 'fp32':
        synthesis_kwargs.num_fp16_res = D_kwargs.num_fp16_res = 0
        synthesis_kwargs.conv_clamp = D_kwargs.conv_clamp = None
    elif chosen == 'bf16':
        # Recorded only when not the default, so that fp16 runs keep the official init kwargs.
        synthesis_kwargs.precision = D_kwargs.precision = 'bf16'
    if opts.nhwc:
        synthesis_kwargs.fp16_channels_last = D_kwargs.block_kwargs.fp16_channels_last = True


def _schedule_section(opts: dnnlib.EasyDict, given: Mapping[str, Any], spec: Preset, num_gpus: int) -> tuple:
    """Optimizers, loss, length, batch and EMA from the preset, --batch and --batch-gpu -> options (--glr --dlr
    --gamma --kimg --tick replace preset values through OPTIONS' `tree`)."""
    part = dnnlib.EasyDict(
        G_opt_kwargs    = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=spec.lrate, betas=(0.0, 0.99), eps=1e-8),
        D_opt_kwargs    = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=spec.lrate, betas=(0.0, 0.99), eps=1e-8),
        loss_kwargs     = dnnlib.EasyDict(class_name='training.loss.StyleGAN2Loss', r1_gamma=spec.gamma, **spec.loss),
        total_kimg      = spec.kimg,
        batch_size      = spec.mb,
        # Presets fix the per-GPU batch for their reference GPU count; with more processes each gets a share.
        batch_gpu       = spec.mb // max(spec.ref_gpus, num_gpus),
        ema_kimg        = spec.ema,
        ema_rampup      = spec.ramp,
    )
    if given.get('batch') is not None:
        if given['batch'] % num_gpus != 0:
            raise UserError(f'--batch={given["batch"]} must be a multiple of the number of GPUs ({num_gpus})')
        part.batch_size = given['batch']
        part.batch_gpu = given['batch'] // num_gpus
    if given.get('batch_gpu') is not None:
        # Not part of the description: it changes memory use, not the result (up to float rounding).
        part.batch_gpu = given['batch_gpu']
    mbstd = given.get('mbstd_group') or spec.mbstd
    _split_batch(part.batch_size, part.batch_gpu, num_gpus, mbstd,
                 hint='choose --batch (a multiple of --gpus), --batch-gpu (a divisor of the per-GPU batch) '
                      'or another --gpus')
    return part


def _augment_section(opts: dnnlib.EasyDict, given: Mapping[str, Any]) -> tuple:
    """--aug --p --target --augpipe -> dict(augment_kwargs, augment_p, ada_target) (their run-name pieces are
    the table's)."""
    part = dnnlib.EasyDict(augment_kwargs=None, augment_p=0.0, ada_target=None)
    if opts.aug == 'fixed' and opts.get('p') is None:
        raise UserError('--aug=fixed requires --p (the fixed augmentation probability)')
    if opts.get('p') is not None:
        if opts.aug != 'fixed':
            raise UserError('--p can only be given with --aug=fixed')
        part.augment_p = float(opts.p)
    if 'target' in given:
        if opts.aug != 'ada':
            raise UserError('--target can only be given with --aug=ada')
    if opts.aug == 'ada':
        part.ada_target = float(opts.target)
    if 'augpipe' in given:
        if opts.aug == 'noaug':
            raise UserError('--augpipe cannot be given with --aug=noaug')
    if opts.aug != 'noaug':
        part.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', **AUGPIPE_SPECS[opts.augpipe])
    return part


def _transfer_section(opts: dnnlib.EasyDict, info: Mapping[str, Any], check_files: bool) -> tuple:
    """--resume with a snapshot: a new run that starts from its weights -> (options, run-name pieces)."""
    resume = opts.get('resume')
    if resume is None:
        return dict(), dict()
    if resume == 'noresume':
        return dict(), dict(resume='-noresume')
    resume_pkl = RESUME_PRESETS.get(resume, resume)
    piece = f'-resume{resume}' if resume in RESUME_PRESETS else '-resumecustom'
    part = dict(resume_pkl=resume_pkl)
    if check_files:
        _check_resume_fits(resume_pkl, info)
        part.update(ada_kimg=100,       # Let ADA react faster at the start of a transfer.
                    ema_rampup=None)    # The loaded G_ema is already a good average.
    return part, dict(resume=piece)


def _regularizer_section(opts: dnnlib.EasyDict, given: Mapping[str, Any], info: Mapping[str, Any],
                         args: dnnlib.EasyDict) -> dict:
    """--reg (a comma list of training.regularizers.REGULARIZERS) and their options -> the loss terms
    (loss_kwargs.d_terms) and D's decoder (D_kwargs.decoder_kwargs), written into `args`; returns the run-name
    pieces. Nothing changes with --reg=none."""
    try:
        names = regularizers.parse_regularizers(opts.reg)
    except ValueError as e:
        raise UserError(f'--reg: {e}') from None
    for name, (option, owners) in regularizers.regularizer_options().items():
        if name in given and not set(owners) & set(names):
            raise UserError(f'{option.flag} applies only to {" or ".join("--reg=" + owner for owner in owners)} '
                            f'(got --reg={opts.reg})')
    if not names:
        return dict()
    synthesis = args.G_kwargs.synthesis_kwargs
    net = NetworkFacts(resolution=info.resolution, img_channels=info.num_channels, w_dim=args.G_kwargs.w_dim,
                       channel_base=synthesis.channel_base, channel_max=synthesis.channel_max)
    terms, decoders, desc = [], dict(), ''
    for name in names:
        term_class = regularizers.regularizer_class(name)
        try:
            plan = term_class.plan({option.name: opts[option.name] for option in term_class.options}, net)
        except ValueError as e:
            raise UserError(str(e)) from None
        terms.append(dnnlib.EasyDict(class_name=regularizers.REGULARIZERS[name], **plan.term))
        if plan.decoder is not None:
            decoders[name] = plan.decoder
        desc += plan.desc
    if len({repr(sorted(decoder.items())) for decoder in decoders.values()}) > 1:
        raise UserError(f'--reg={opts.reg}: {" and ".join(decoders)} each need a decoder of D, but not the same '
                        f'one; combine at most one of them with the others')
    if decoders:
        args.D_kwargs.decoder_kwargs = dnnlib.EasyDict(next(iter(decoders.values())))
    args.loss_kwargs.d_terms = terms
    return dict(reg=desc)
