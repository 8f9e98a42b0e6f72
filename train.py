"""Train a StyleGAN2-ADA generator, stock or with the image squeeze connection (`--arch=squeeze`).

Examples:

    # Preview the options of a run without touching the disk:
    python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256 --arch=squeeze --dry-run

    # Train the squeeze generator on FFHQ 256x256 with 8 GPUs:
    python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256 --mirror=1 --gpus=8 --arch=squeeze --squeeze-r=8

    # Continue that run where it stopped, in the same directory with the same options, now up to 30000 kimg:
    python train.py --resume=runs/00003-ffhq256-mirror-paper256-squeeze-r8 --kimg=30000

    # Fine-tune from an official snapshot (a new run that starts from its weights):
    python train.py --outdir=runs --data=afhqcat.zip --cfg=paper512 --resume=ffhq512 --aug=ada --target=0.7

    # Several processes: `--gpus=N` spawns them here, or let torchrun start them (also across nodes):
    torchrun --nproc_per_node=4 train.py --outdir=runs --data=ffhq256.zip --cfg=paper256

    # Or SLURM, one task per GPU on 2 nodes of 8 GPUs (each task seeing all GPUs of its node), without --gpus:
    srun --nodes=2 --ntasks-per-node=8 python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256

Structure. `setup_training_options(**opts)` is a pure function from command-line values to
`(run_desc, args)`: `args` is the kwargs tree of `training.training_loop.training_loop`, with `class_name`
strings that the loop resolves through `dnnlib.util.construct_class_by_name`. It is written whole to
`<run_dir>/training_options.json` and printed by `--dry-run`. An option the user did not give is passed as
None (or left out) and takes its value from `DEFAULTS`, so the builder also knows what was given explicitly;
`main` passes only the options whose click parameter source is not the default. Presets are the table
`PRESETS`; `auto` is computed from the dataset resolution and the number of processes (`auto_preset`). The
builder composes section builders (dataset, preset, networks, schedule, augmentation, transfer), each of which
returns its part of the tree and its run-description pieces. Ranges and choices are checked once, by the click
types; the builder checks what depends on several options or on the data. `--arch` and the flags of the
synthesis blocks come from `training.networks.SYNTHESIS_BLOCKS` (`make_main`): a block registered there
brings its own flags, defaults, run-description pieces and "applies only to --arch=X" check.

Run description (`run_desc`; the run directory is `<outdir>/<NNNNN>-<run_desc>`). The pieces, in order:
    <dataset name>
    -cond                   --cond=1
    -subset<N>              --subset=N
    -mirror                 --mirror=1
    -<cfg>                  always; `auto` is written with the number of processes: -auto1, -auto8
                            (--gpus=0 is one CPU process: -auto1)
    -<arch>                 --arch other than skip: -orig, -resnet, -squeeze
    <block options>         what the block of --arch declares (networks.BlockOption.desc); for squeeze:
      -r<r>                   --squeeze-r (always, default 8): -squeeze-r8
      -noblend                --squeeze-noblend=1
      -torgb<src>             --squeeze-torgb other than squeeze: -torgbconv0, -torgbexcite
    -cbase<n> -cmax<n>      --cbase, --cmax given (network capacity)
    -map<n>                 --map-depth (or its alias --map) given
    -glr<g:g> -dlr<d:g>     --glr, --dlr given
    -mbstd<n>               --mbstd-group given
    -gamma<g:g>             --gamma given
    -kimg<k>                --kimg given
    -batch<b>               --batch given
    -<aug>                  --aug given explicitly (even --aug=ada), as the official script does
    -p<p:g>                 --p given
    -target<t:g>            --target given
    -<augpipe>              --augpipe given explicitly (even --augpipe=bgc)
    -noresume               --resume=noresume
    -resume<name>           --resume=<preset>, e.g. -resumeffhq256
    -resumecustom           --resume=<.pkl path or URL>
    -freezed<n>             --freezed=n
    -<desc>                 --desc given (StyleGAN3's flag), last
Everything else (--gpus, --batch-gpu, --snap, --tick, --metrics, --seed, --workers, --fp32, --nhwc, --nobench,
--allow-tf32, --device, --detector-dir) leaves the description unchanged. Example: `00000-fakedata-paper256-squeeze-r8`.

Resuming. `--resume` takes one of three kinds of value:
- a preset name (`ffhq256`, ...), a URL, or a `.pkl` path: a new run that starts from those weights (the
  official meaning): `resume_pkl` is set, `ema_rampup = None` and `ada_kimg = 100`, as the official script does.
  The snapshot may have another architecture or conditioning: tensors whose name and shape match are copied,
  the others start fresh, and the loop prints a transfer report (training/transfer.py). Another image size or
  channel count is refused here, before the run directory exists;
- a run directory holding `training-state.pt`, or such a file itself: the same run continues in its own
  directory from the full training state (`resume_state`), with the options stored in the state, on the kind
  of device the run was started on (`device_type`). Only the options in STATE_OVERRIDES may change (`--gpus`
  must divide the stored batch); other options are ignored with a warning.

Checks. Everything a run needs is checked before its directory exists (`build_training_plan`, `check_outdir`):
a new run that fails anyway before saving anything leaves no directory (`finish_failed_run`), and an error in
the training processes is one line (`RunFailed`) with the traceback in log.txt.

Processes. `--gpus=N` runs N processes (one per CUDA device; `torch.multiprocessing.spawn` for N > 1, the
ranks meeting through a file in a temporary directory). `--gpus=0` is one CPU process; `--device=cpu` runs the
N processes on the CPU with the gloo backend. Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set) or as a task of an `srun` step of several tasks (SLURM_PROCID, SLURM_LOCALID,
SLURM_STEP_NUM_TASKS, the first node of the step; torch_utils/distributed.py has the rules) every process builds
the same options, the group forms, rank 0 creates the run directory and sends its path to the others. Any
process count works, not only powers of two. Process groups time out after 15 minutes of waiting
(torch_utils.distributed.PROCESS_GROUP_TIMEOUT) instead of hanging.
"""

import contextlib
import copy
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import click
import torch

import dnnlib
from metrics import metric_main
from torch_utils import distributed as launcher  # Not `distributed`: that names the launch-environment argument.
from training import checkpoint
from training.augment import AUGPIPE_SPECS
from training.checkpoint import STATE_FILE_NAME
from training.networks import SYNTHESIS_BLOCKS, synthesis_block_options

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

# The value of every option that the user did not give. click shows these as the defaults.
DEFAULTS = dict(
    gpus            = 1,
    device          = 'auto',
    snap            = 50,
    metrics         = 'fid50k_full',
    seed            = 0,
    cond            = False,
    mirror          = False,
    cfg             = 'auto',
    aug             = 'ada',
    target          = 0.6,
    augpipe         = 'bgc',
    fp32            = False,
    nhwc            = False,
    nobench         = False,
    allow_tf32      = False,
    workers         = 3,
    arch            = 'skip',
    stop_snapshot   = True,
    precision       = 'fp16',
)



def block_option_defaults() -> Dict[str, Any]:
    """The defaults of the synthesis blocks' own options (networks.BlockOption), which click shows too."""
    return {name: option.default for name, (option, _owners) in synthesis_block_options().items()}


# Options that may change when a training state is resumed; every other option is fixed by the state.
STATE_OVERRIDES = ('kimg', 'snap', 'metrics', 'workers', 'gpus', 'tick', 'batch_gpu', 'detector_dir', 'state_kimg',
                   'stop_snapshot')
# Options that choose how to launch, not what to train: never reported as ignored.
_LAUNCH_OPTIONS = ('resume', 'device', 'distributed', 'check_devices', 'check_files')

# training_loop arguments that differ between the processes of one run; never part of the stored options.
_PER_PROCESS_KEYS = ('rank', 'device')

OPTIONS_FILE_NAME = 'training_options.json'
# Exit status of a run stopped by SIGTERM/SIGINT/SIGUSR1 after saving its state: EX_TEMPFAIL of sysexits.h,
# "try again later", distinct from errors (1) and usage errors (2).
EXIT_STOPPED = 75
LOG_FILE_NAME = 'log.txt'
DEFAULT_TRAINING_LOOP = 'training.training_loop.training_loop'

# ----------------------------------------------------------------------------
# Errors and small helpers.


class UserError(click.ClickException):
    """A problem with the command line or the data; click prints 'Error: <message>' without a traceback."""


class RunFailed(UserError):
    """The training processes stopped with an error; the message is the one line the user sees. `traceback`
    says whether log.txt holds the traceback of the error (a killed process leaves none)."""

    def __init__(self, message: str, traceback: bool = True):
        super().__init__(message)
        self.traceback = traceback


def _warn(message: str) -> None:
    click.echo(f'warn: {message}', err=True)


def _to_easydict(obj: Any) -> Any:
    """Nested dicts (e.g. read back from JSON or a state file) as nested EasyDicts."""
    if isinstance(obj, dict):
        return dnnlib.EasyDict({key: _to_easydict(value) for key, value in obj.items()})
    if isinstance(obj, list):
        return [_to_easydict(value) for value in obj]
    return obj


def parse_metrics(value: Union[None, str, Sequence[str]]) -> List[str]:
    """'fid50k_full,kid50k_full' -> ['fid50k_full', 'kid50k_full']; 'none' -> []. A list passes through."""
    if value is None:
        value = DEFAULTS['metrics']
    names = value.split(',') if isinstance(value, str) else list(value)
    names = [name.strip() for name in names if name.strip()]
    if names == ['none']:
        return []
    if 'none' in names:
        raise UserError('--metrics: "none" cannot be combined with metric names')
    return names


def _metrics_callback(_ctx, _param, value):
    try:
        return parse_metrics(value)
    except UserError as e:
        raise click.BadParameter(e.message) from None


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf. FloatRange alone lets `--gamma=nan` through (every
    comparison with nan is false), and a nan R1 weight silently disables the regularization."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value


# ----------------------------------------------------------------------------
# Hooks into the data, the snapshots, the devices and the metrics' files. Each is one small function, so that
# tests can build option trees without image files, snapshots, GPUs or feature networks (they replace them).


def _cuda_device_count() -> int:
    """The CUDA devices this process sees; tests replace this hook."""
    return launcher.cuda_device_count()


def check_metrics_ready(metrics: Sequence[str], detector_dir: Optional[str]) -> None:
    """Find (or fetch) the feature network of every metric now, so that an offline machine without the file
    fails before the run directory exists instead of after the first tick. Tests replace this hook."""
    if not metrics:
        return
    try:
        metric_main.check_metrics_ready(list(metrics), detector_dir=detector_dir)
    except OSError as e:  # DetectorNotFoundError, DownloadError
        raise UserError(f'--metrics: {e}') from None


def inspect_snapshot(path_or_url: str) -> dnnlib.EasyDict:
    """Load the snapshot `--resume` names and return what must fit the run: EasyDict(networks={name:
    EasyDict(img_resolution, img_channels, c_dim)}). Tests replace this hook.

    Everything that can go wrong with a resume target (missing, truncated, not a snapshot, unreachable URL)
    is reported here, before the run directory exists. The training loop loads the file again; a download is
    cached, so that costs a second read of the file, not a second download.
    """
    from training import legacy
    try:
        with dnnlib.util.open_url(path_or_url) as f:
            data = legacy.load_network_pkl(f)
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


def _validate_metrics(metrics: List[str]) -> None:
    for name in metrics:
        if not metric_main.is_valid_metric(name):
            raise UserError(f'--metrics: unknown metric {name!r}; valid choices: '
                            f'{", ".join(metric_main.list_valid_metrics())} (or none)')


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
    """Options of a run that continues from its training state (see the module docstring)."""
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
        _warn(f'{flags} ignored: a resumed training state keeps its own options (only '
              f'{", ".join("--" + name.replace("_", "-") for name in STATE_OVERRIDES)} may change)')
    _apply_state_overrides(args, given)

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
        check_metrics_ready(args.metrics, args.get('detector_dir'))
    if given.get('check_devices', True):
        resolve_launch(gpus, device, given.get('distributed'))

    # The state holds every weight; the snapshot the run once started from has done its job.
    args.resume_pkl = None
    args.resume_state = os.path.abspath(state_path)
    args.run_dir = os.path.dirname(os.path.abspath(state_path))
    run_desc = re.sub(r'^\d+-', '', os.path.basename(args.run_dir))
    return run_desc, args, launch


def _apply_state_overrides(args: dnnlib.EasyDict, given: Mapping[str, Any]) -> None:
    """The options in STATE_OVERRIDES that the command line gives replace the stored ones (except --gpus and
    --batch-gpu, which the launch decides)."""
    if given.get('kimg') is not None:
        args.total_kimg = given['kimg']
    if given.get('snap') is not None:
        args.image_snapshot_ticks = args.network_snapshot_ticks = given['snap']
    if given.get('metrics') is not None:
        args.metrics = parse_metrics(given['metrics'])
        _validate_metrics(args.metrics)
    if given.get('workers') is not None:
        args.data_loader_kwargs = _data_loader_kwargs(given['workers'], args.data_loader_kwargs)
    if given.get('tick') is not None:
        args.kimg_per_tick = given['tick']
    for name in ('detector_dir', 'state_kimg', 'stop_snapshot'):
        if given.get(name) is not None:
            args[name] = given[name]


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
    _warn(f'continuing on the data at "{data}" (was "{recorded.path}")')
    recorded.path = data


def _data_loader_kwargs(workers: int, base: Optional[Mapping[str, Any]] = None) -> dnnlib.EasyDict:
    """--workers as the run's DataLoader options; training.dataset.data_loader_kwargs decides them."""
    from training.dataset import data_loader_kwargs
    if workers < 0:
        raise UserError(f'--workers must be at least 0, got {workers}')
    return data_loader_kwargs(workers, base)


def build_training_plan(
    data:               Optional[str] = None,       # --data: dataset folder or .zip.
    gpus:               Optional[int] = None,       # --gpus: number of processes, 0 = one CPU process.
    device:             Optional[str] = None,       # --device: auto, cuda or cpu.
    distributed:        Optional[dict] = None,      # distributed_env() under torchrun or srun, else None.
    snap:               Optional[int] = None,       # --snap: snapshot interval in ticks.
    metrics:            Any = None,                 # --metrics: list or comma-separated string, 'none' = [].
    seed:               Optional[int] = None,       # --seed: random seed.
    cond:               Optional[bool] = None,      # --cond: train with the dataset's labels.
    subset:             Optional[int] = None,       # --subset: train on this many images.
    mirror:             Optional[bool] = None,      # --mirror: add x-flipped images.
    cfg:                Optional[str] = None,       # --cfg: preset name or auto.
    gamma:              Optional[float] = None,     # --gamma: R1 weight override.
    kimg:               Optional[int] = None,       # --kimg: training length override.
    batch:              Optional[int] = None,       # --batch: total batch size override.
    aug:                Optional[str] = None,       # --aug: ada, noaug or fixed.
    p:                  Optional[float] = None,     # --p: augmentation probability for --aug=fixed.
    target:             Optional[float] = None,     # --target: ADA target for --aug=ada.
    augpipe:            Optional[str] = None,       # --augpipe: augmentation preset.
    resume:             Optional[str] = None,       # --resume: preset, URL, .pkl, run dir or training state.
    freezed:            Optional[int] = None,       # --freezed: number of frozen D layers.
    fp32:               Optional[bool] = None,      # --fp32: no mixed precision.
    nhwc:               Optional[bool] = None,      # --nhwc: channels-last for fp16 layers.
    nobench:            Optional[bool] = None,      # --nobench: no cuDNN benchmarking.
    allow_tf32:         Optional[bool] = None,      # --allow-tf32: allow TF32 matmul / convolutions.
    workers:            Optional[int] = None,       # --workers: DataLoader worker processes.
    arch:               Optional[str] = None,       # --arch: synthesis block type (SYNTHESIS_BLOCKS).
    cbase:              Optional[int] = None,       # --cbase: channel_base override (capacity).
    cmax:               Optional[int] = None,       # --cmax: channel_max override.
    map_depth:          Optional[int] = None,       # --map-depth (alias --map): mapping-network depth override.
    tick:               Optional[float] = None,     # --tick: kimg per tick (progress line, snapshot unit).
    batch_gpu:          Optional[int] = None,       # --batch-gpu: images per process and round (accumulation).
    glr:                Optional[float] = None,     # --glr: G learning rate override.
    dlr:                Optional[float] = None,     # --dlr: D learning rate override.
    mbstd_group:        Optional[int] = None,       # --mbstd-group: minibatch-std group size override.
    desc:               Optional[str] = None,       # --desc: extra text for the run directory name.
    detector_dir:       Optional[str] = None,       # --detector-dir: folder with the metrics' feature networks.
    state_kimg:         Optional[float] = None,     # --state-kimg: training state every N kimg besides snapshots.
    stop_snapshot:      Optional[bool] = None,      # --stop-snapshot: a network snapshot too when a signal stops it.
    precision:          Optional[str] = None,       # --precision: fp16, bf16 or fp32 for the num_fp16_res blocks.
    check_devices:      bool = True,                # Check that the CUDA devices exist (False: --dry-run).
    check_files:        bool = True,                # Load the resume snapshot, find the metrics' feature networks
                                                    # (False: torchrun/srun ranks other than 0, which rank 0 speaks for).
    **block_options,                                # The synthesis blocks' own options (BlockOption), e.g. squeeze_r.
) -> tuple:
    """`setup_training_options` plus how to launch: (run_desc, args, EasyDict(num_gpus, device_type)).

    The values are those the click types of `main` accept (ranges and choices are checked there, once); this
    builder checks what depends on several options or on the data. Data and option errors come before device
    errors: a wrong --data is reported as such on any machine.
    """
    given = {name: value for name, value in locals().items() if value is not None and name != 'block_options'}
    given.update({name: value for name, value in block_options.items() if value is not None})
    opts = dnnlib.EasyDict({**DEFAULTS, **block_option_defaults(), **given})

    # A training state continues its own run; nothing below applies to it.
    state_path = _find_state_file(resume) if resume is not None else None
    if state_path is not None:
        return _continue_state(state_path, given)

    launch = resolve_launch(gpus, device, distributed, probe_devices=False)
    args = _base_args(opts, launch)
    dataset, pieces, info = _dataset_section(opts)
    spec, preset_pieces = _preset_section(opts, info.resolution, launch.num_gpus)
    networks, network_pieces = _network_section(opts, given, spec)
    schedule, schedule_pieces = _schedule_section(opts, given, spec, launch.num_gpus)
    augment, augment_pieces = _augment_section(opts, given)
    transfer, transfer_pieces = _transfer_section(opts, info, check_files)
    args.training_set_kwargs = dataset
    for part in (networks, schedule, augment, transfer):  # In this order: a transfer resets the EMA ramp-up.
        args.update(part)
    for part in (preset_pieces, network_pieces, schedule_pieces, augment_pieces, transfer_pieces):
        pieces.update(part)
    if desc is not None:
        if not re.fullmatch(r'[A-Za-z0-9_.+=-]+', desc):
            raise UserError(f'--desc may hold letters, digits and _.+=- only (it becomes part of a directory name), '
                            f'got {desc!r}')
        pieces['desc'] = f'-{desc}'
    run_desc = ''.join(pieces[key] for key in RUN_DESC_ORDER if key in pieces)

    if check_files:
        check_metrics_ready(args.metrics, detector_dir)
    if check_devices:
        resolve_launch(gpus, device, distributed)
    return run_desc, args, launch


# The order of the run-description pieces (see the module docstring); `block` holds the block options' pieces.
RUN_DESC_ORDER = ('data', 'cond', 'subset', 'mirror', 'cfg', 'arch', 'block', 'cbase', 'cmax', 'map', 'glr', 'dlr',
                  'mbstd', 'gamma', 'kimg', 'batch', 'aug', 'p', 'target', 'augpipe', 'resume', 'freezed', 'desc')


def _base_args(opts: dnnlib.EasyDict, launch: dnnlib.EasyDict) -> dnnlib.EasyDict:
    """The options tree with what no section decides: the loop's fixed settings and the run's switches."""
    metrics = parse_metrics(opts.metrics)
    _validate_metrics(metrics)
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
        random_seed             = opts.seed,
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
        image_snapshot_ticks    = opts.snap,
        network_snapshot_ticks  = opts.snap,
        resume_pkl              = None,
        resume_state            = None,
        cudnn_benchmark         = not opts.nobench,
        allow_tf32              = bool(opts.allow_tf32),
        device_type             = launch.device_type,
        detector_dir            = opts.get('detector_dir'),
        state_kimg              = opts.get('state_kimg'),
        stop_snapshot           = bool(opts.stop_snapshot),
    )


def _dataset_section(opts: dnnlib.EasyDict) -> tuple:
    """--data --cond --subset --mirror -> (training_set_kwargs, run-name pieces, what the dataset holds)."""
    if opts.get('data') is None:
        raise UserError('--data is required: a dataset folder or .zip archive (see dataset_tool.py)')
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=True,
                             max_size=None, xflip=False, resolution=None, random_seed=opts.seed)
    info = inspect_dataset(kwargs)
    res = info.resolution
    if not isinstance(res, int) or res < 4 or res & (res - 1) != 0:
        raise UserError(f'--data: the images of "{opts.data}" are {res}x{res}; training needs a power of two '
                        f'(at least 4), e.g. 256 (dataset_tool.py can resize)')
    kwargs.update(resolution=res, max_size=info.size, use_labels=bool(opts.cond), xflip=bool(opts.mirror))
    pieces = dict(data=info.name)
    if opts.cond:
        if not info.has_labels:
            raise UserError(f'--cond=1 needs labels, but "{opts.data}" has none (dataset.json with "labels")')
        pieces['cond'] = '-cond'
    if opts.get('subset') is not None:
        if opts.subset > info.size:
            raise UserError(f'--subset must be between 1 and the dataset size ({info.size}), got {opts.subset}')
        pieces['subset'] = f'-subset{opts.subset}'
        kwargs.max_size = opts.subset
    if opts.mirror:
        pieces['mirror'] = '-mirror'
    return kwargs, pieces, info


def _preset_section(opts: dnnlib.EasyDict, resolution: int, num_gpus: int) -> tuple:
    """--cfg -> (Preset, run-name pieces); `auto` is scaled to the resolution and the process count."""
    if opts.cfg == 'auto':
        return auto_preset(resolution, num_gpus), dict(cfg=f'-auto{num_gpus}')
    return PRESETS[opts.cfg], dict(cfg=f'-{opts.cfg}')


def _network_section(opts: dnnlib.EasyDict, given: Mapping[str, Any], spec: Preset) -> tuple:
    """--arch and the block options, capacity, mapping depth, mbstd group, frozen D layers, precision ->
    (dict(G_kwargs, D_kwargs), run-name pieces)."""
    synthesis_kwargs, pieces = _synthesis_section(opts, given)
    channel_base = int(spec.fmaps * 32768) if opts.get('cbase') is None else opts.cbase
    channel_max = 512 if opts.get('cmax') is None else opts.cmax
    synthesis_kwargs.update(channel_base=channel_base, channel_max=channel_max)
    G_kwargs = dnnlib.EasyDict(class_name='training.networks.Generator', z_dim=512, w_dim=512,
                               mapping_kwargs=dnnlib.EasyDict(num_layers=spec.map), synthesis_kwargs=synthesis_kwargs)
    D_kwargs = dnnlib.EasyDict(class_name='training.networks.Discriminator', channel_base=channel_base,
                               channel_max=channel_max, num_fp16_res=4, conv_clamp=256, block_kwargs=dnnlib.EasyDict(),
                               mapping_kwargs=dnnlib.EasyDict(),
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=spec.mbstd), **spec.D)
    # Capacity flags (named as in StyleGAN3's train.py) make small networks for CPU runs possible.
    if opts.get('cbase') is not None:
        pieces['cbase'] = f'-cbase{opts.cbase:d}'
    if opts.get('cmax') is not None:
        pieces['cmax'] = f'-cmax{opts.cmax:d}'
    if opts.get('map_depth') is not None:
        pieces['map'] = f'-map{opts.map_depth:d}'
        G_kwargs.mapping_kwargs.num_layers = opts.map_depth
    if opts.get('mbstd_group') is not None:
        pieces['mbstd'] = f'-mbstd{opts.mbstd_group}'
        D_kwargs.epilogue_kwargs.mbstd_group_size = opts.mbstd_group
    if opts.get('freezed') is not None:
        pieces['freezed'] = f'-freezed{opts.freezed:d}'
        D_kwargs.block_kwargs.freeze_layers = opts.freezed
    _apply_precision(opts, given.get('precision'), G_kwargs, D_kwargs)
    return dict(G_kwargs=G_kwargs, D_kwargs=D_kwargs), pieces


def _synthesis_section(opts: dnnlib.EasyDict, given: Mapping[str, Any]) -> tuple:
    """--arch and the options its block declares -> (synthesis_kwargs, run-name pieces). An option of another
    block is refused: `--squeeze-r` means nothing to `--arch=skip`."""
    kwargs = dnnlib.EasyDict(channel_base=None, channel_max=None, num_fp16_res=4, conv_clamp=256,
                             architecture=opts.arch)
    pieces = dict()
    if opts.arch != DEFAULTS['arch']:
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
    """Optimizers, loss, length, batch and EMA from the preset and --glr --dlr --gamma --kimg --batch
    --batch-gpu --tick -> (options, run-name pieces)."""
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
    pieces = dict()
    for flag, opt_kwargs in (('glr', part.G_opt_kwargs), ('dlr', part.D_opt_kwargs)):
        if given.get(flag) is not None:
            pieces[flag] = f'-{flag}{given[flag]:g}'
            opt_kwargs.lr = given[flag]
    if given.get('gamma') is not None:
        pieces['gamma'] = f'-gamma{given["gamma"]:g}'
        part.loss_kwargs.r1_gamma = given['gamma']
    if given.get('kimg') is not None:
        pieces['kimg'] = f'-kimg{given["kimg"]:g}'
        part.total_kimg = given['kimg']
    if given.get('tick') is not None:
        part.kimg_per_tick = given['tick']
    if given.get('batch') is not None:
        if given['batch'] % num_gpus != 0:
            raise UserError(f'--batch={given["batch"]} must be a multiple of the number of GPUs ({num_gpus})')
        pieces['batch'] = f'-batch{given["batch"]}'
        part.batch_size = given['batch']
        part.batch_gpu = given['batch'] // num_gpus
    if given.get('batch_gpu') is not None:
        # Not part of the description: it changes memory use, not the result (up to float rounding).
        part.batch_gpu = given['batch_gpu']
    mbstd = given.get('mbstd_group') or spec.mbstd
    _split_batch(part.batch_size, part.batch_gpu, num_gpus, mbstd,
                 hint='choose --batch (a multiple of --gpus), --batch-gpu (a divisor of the per-GPU batch) '
                      'or another --gpus')
    return part, pieces


def _augment_section(opts: dnnlib.EasyDict, given: Mapping[str, Any]) -> tuple:
    """--aug --p --target --augpipe -> (dict(augment_kwargs, augment_p, ada_target), run-name pieces). The
    official script names --aug and --augpipe in the run when they are given, even at their defaults."""
    part = dnnlib.EasyDict(augment_kwargs=None, augment_p=0.0, ada_target=None)
    pieces = dict()
    if 'aug' in given:
        pieces['aug'] = f'-{opts.aug}'
    if opts.aug == 'fixed' and opts.get('p') is None:
        raise UserError('--aug=fixed requires --p (the fixed augmentation probability)')
    if opts.get('p') is not None:
        if opts.aug != 'fixed':
            raise UserError('--p can only be given with --aug=fixed')
        pieces['p'] = f'-p{opts.p:g}'
        part.augment_p = float(opts.p)
    if 'target' in given:
        if opts.aug != 'ada':
            raise UserError('--target can only be given with --aug=ada')
        pieces['target'] = f'-target{opts.target:g}'
    if opts.aug == 'ada':
        part.ada_target = float(opts.target)
    if 'augpipe' in given:
        if opts.aug == 'noaug':
            raise UserError('--augpipe cannot be given with --aug=noaug')
        pieces['augpipe'] = f'-{opts.augpipe}'
    if opts.aug != 'noaug':
        part.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', **AUGPIPE_SPECS[opts.augpipe])
    return part, pieces


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


def setup_training_options(**opts) -> tuple:
    """Command-line values -> (run_desc, args) where `training_loop(run_dir=..., **args)` trains.

    Keywords are the option names of `build_training_plan` (the click option names with '_' for '-'); one
    left out or None takes its value from DEFAULTS. Raises UserError for inconsistent options.
    """
    run_desc, args, _launch = build_training_plan(**opts)
    return run_desc, args


# ----------------------------------------------------------------------------
# Run directories.


def next_run_dir(outdir: str, run_desc: str) -> str:
    """`<outdir>/<NNNNN>-<run_desc>`, numbered one past the largest numeric prefix already in `outdir`."""
    run_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'^(\d+)', name)
            if match is not None and os.path.isdir(os.path.join(outdir, name)):
                run_ids.append(int(match.group(1)))
    run_id = max(run_ids, default=-1) + 1
    return os.path.join(outdir, f'{run_id:05d}-{run_desc}')


def write_options(args: Mapping[str, Any], run_dir: str) -> str:
    """Write `training_options.json` (atomically, so a crash never leaves half of it)."""
    path = os.path.join(run_dir, OPTIONS_FILE_NAME)
    text = json.dumps(args, indent=2) + '\n'
    dnnlib.util.write_atomically(path, lambda f: f.write(text.encode('utf-8')))
    return path


def check_outdir(outdir: Optional[str]) -> None:
    """Fail now if the run directory could not be made under `outdir`: its nearest existing ancestor must be a
    writable directory (not a regular file, not read-only)."""
    if outdir is None:
        raise UserError('--outdir is required: the directory that receives the run directory')
    probe = os.path.abspath(outdir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f'--outdir: cannot create "{outdir}": "{probe}" is a file, not a directory')
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'--outdir: cannot create the run directory under "{outdir}": "{probe}" is not writable')


def prepare_run_dir(args: dnnlib.EasyDict, outdir: Optional[str], run_desc: str) -> Any:
    """Create the run directory of a new run (or check that of a resumed state), set args.run_dir, lock it for
    this process's lifetime, sweep what interrupted writes left there, write the options. Returns the
    run_dir.RunLock, which the caller keeps while the run trains (one writer per run directory)."""
    from training import run_dir as run_dirs

    if args.get('run_dir') is not None:
        if not os.path.isdir(args.run_dir):
            raise UserError(f'The run directory "{args.run_dir}" of the resumed state does not exist')
        check_outdir(args.run_dir)
    else:
        check_outdir(outdir)
        os.makedirs(outdir, exist_ok=True)
        args.run_dir = next_run_dir(outdir, run_desc)
        try:
            os.makedirs(args.run_dir, exist_ok=False)
        except FileExistsError:
            raise UserError(f'The run directory "{args.run_dir}" already exists; refusing to overwrite it') from None
    try:
        lock = run_dirs.acquire_run_lock(args.run_dir)
    except run_dirs.RunDirLocked as e:
        raise UserError(str(e)) from None
    swept = run_dirs.sweep_temporary_files(args.run_dir)
    if swept:
        click.echo(f'Removed {len(swept)} temporary file(s) left by interrupted writes: {", ".join(swept)}')
    write_options(args, args.run_dir)
    return lock


def _has_saved_progress(run_dir: str) -> bool:
    """Whether the run wrote anything worth keeping: a network snapshot or a training state."""
    return any(name.startswith('network-snapshot-') or name == STATE_FILE_NAME for name in os.listdir(run_dir))


def finish_failed_run(error: RunFailed, run_dir: str, is_new_run: bool) -> RunFailed:
    """The error to report for a failed run. A new run that saved nothing (it failed before its first tick) leaves
    no numbered directory behind: its log moves to a temporary file that the message names."""
    log_path = os.path.join(run_dir, LOG_FILE_NAME)
    if not is_new_run or _has_saved_progress(run_dir):
        where = 'The traceback is in' if error.traceback else 'The log is'
        return RunFailed(f'{error.message}. {where} {log_path}', traceback=error.traceback)
    import shutil
    fd, kept_log = tempfile.mkstemp(prefix=f'{os.path.basename(run_dir)}-', suffix='-log.txt')
    os.close(fd)
    if os.path.isfile(log_path):
        shutil.copyfile(log_path, kept_log)
    shutil.rmtree(run_dir, ignore_errors=True)
    with_traceback = ', with the traceback,' if error.traceback else ''
    return RunFailed(f'{error.message}. Removed the run directory {run_dir} (nothing had been saved); its log'
                     f'{with_traceback} is {kept_log}', traceback=error.traceback)


def describe(args: Mapping[str, Any], run_dir: str, device_type: str) -> str:
    """The options tree as JSON plus a short summary (what --dry-run prints and a real run logs)."""
    data = args.get('training_set_kwargs') or {}
    synthesis = (args.get('G_kwargs') or {}).get('synthesis_kwargs') or {}
    lines = [
        'Training options:',
        json.dumps(args, indent=2),
        '',
        f'Output directory:   {run_dir}',
        f'Training data:      {data.get("path")}',
        f'Training duration:  {args.get("total_kimg")} kimg',
        f'Processes:          {args.get("num_gpus")} ({device_type})',
        f'Batch:              {args.get("batch_size")} ({args.get("batch_gpu")} per process and round)',
        f'Image resolution:   {data.get("resolution")}',
        f'Conditional model:  {data.get("use_labels")}',
        f'Dataset x-flips:    {data.get("xflip")}',
        f'Synthesis blocks:   {synthesis.get("architecture", "skip")}',
    ]
    if args.get('resume_state'):
        lines.append(f'Resuming state:     {args["resume_state"]}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Launching.


def _failure_line(error: BaseException) -> str:
    """One line for an error raised by the training loop (TrainingStopped carries its own)."""
    from training.training_loop import TrainingStopped, one_line
    if isinstance(error, TrainingStopped):
        return str(error)
    return f'Training stopped: {one_line(error)} ({type(error).__name__})'


def _log_traceback(run_dir: str, rank: int) -> None:
    """Append the traceback of the exception being handled to log.txt only (the console gets one line)."""
    import traceback
    with open(os.path.join(run_dir, LOG_FILE_NAME), 'a') as f:
        f.write(f'\nTraceback of rank {rank}:\n{traceback.format_exc()}')


def _run_rank(rank: int, world_size: int, args: Mapping[str, Any], device: torch.device, loop: str,
              stop_request: Any = None) -> Optional[str]:
    """One process of a run whose process group (if any) is ready: logging, statistics, the training loop.

    Returns the one-line stop message when a signal stopped the run (rank 0 only), else None. An error ends
    the process with RunFailed (one line) and leaves its traceback in log.txt.
    """
    from torch_utils import custom_ops, training_stats
    from training import preemption

    logger = None
    if rank == 0:
        logger = dnnlib.util.Logger(file_name=os.path.join(args['run_dir'], LOG_FILE_NAME), file_mode='a',
                                    should_flush=True)
    else:
        custom_ops.verbosity = 'none'  # One message per plugin build is enough.
    try:
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        training_stats.init_multiprocessing(rank=rank, sync_device=device if world_size > 1 else None)
        training_loop = dnnlib.util.get_obj_by_name(loop)
        extra = dict()
        if args.get('metrics'):
            # The loop (package `training`) may not import `metrics`; the script hands the evaluator in.
            extra['metric_fn'] = metric_main.run_training_metrics
        if stop_request is not None:
            extra['stop_request'] = stop_request
        state = training_loop(rank=rank, device=device, **args, **extra)
        signame = getattr(state, 'stopped_by', None)
        if rank != 0 or signame is None:
            return None
        message = preemption.stop_message(signame, state.cur_nimg / 1000, args['run_dir'])
        print(message)  # Into log.txt as well.
        return message
    except Exception as e:
        if logger is not None:
            logger.close()
            logger = None
        _log_traceback(args['run_dir'], rank)
        raise RunFailed(_failure_line(e)) from None
    finally:
        if logger is not None:
            logger.close()


def _spawned_rank(rank: int, device: torch.device, args: Mapping[str, Any], temp_dir: str, loop: str,
                  stop_value: Any) -> None:
    """A process that launcher.start() spawned, already in the process group. A failure leaves its one-line
    message in `<temp_dir>/rank<r>.error`, a signal stop in `<temp_dir>/stopped`, for the launching process."""
    from training import preemption

    try:
        message = _run_rank(rank, args['num_gpus'], args, device, loop, preemption.StopRequest(shared=stop_value))
        if message is not None:
            with open(os.path.join(temp_dir, 'stopped'), 'w') as f:
                f.write(message)
    except RunFailed as e:
        # Stamped with the system-wide monotonic clock (file times are too coarse to order the ranks). Written
        # before the launcher takes this rank out of the group, so before any peer can notice that it is gone.
        with open(os.path.join(temp_dir, f'rank{rank}.error'), 'w') as f:
            f.write(f'{time.monotonic_ns()}\n{e.message}')
        raise


def _first_error(temp_dir: str) -> Optional[str]:
    """The message of the rank that failed first. It wrote it before leaving the process group, so before any
    peer could notice that it was gone: the oldest stamp."""
    errors = []
    for name in os.listdir(temp_dir):
        if name.endswith('.error'):
            with open(os.path.join(temp_dir, name)) as f:
                stamp, message = f.read().split('\n', 1)
            errors.append((int(stamp), message))
    return min(errors)[1] if errors else None


@contextlib.contextmanager
def _forward_stop_signals(stop_value: Any, processes: List[Any]) -> Iterator[None]:
    """While the spawned ranks train, a stop signal to this launching process sets `stop_value` (which the
    ranks poll; see training/preemption.py for why it is not re-sent as a signal); a second one kills them."""
    import signal

    from training import preemption

    def handle(signum, _frame):
        if stop_value.value:
            for process in processes:
                process.kill()
            os._exit(128 + signum)
        stop_value.value = signum

    previous = {}
    try:
        for name in preemption.STOP_SIGNALS:
            signum = signal.Signals[name]
            previous[signum] = signal.signal(signum, handle)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start_resource_tracker_without_sigusr1() -> None:
    """multiprocessing's resource tracker, a helper process that the ranks' queues need, ignores SIGINT and
    SIGTERM but dies on SIGUSR1, which SLURM's --signal sends to every process of the job (it is relaunched with
    a traceback). Started with SIGUSR1 blocked, it inherits the blocked signal; a tracker already running is
    left as it is."""
    import signal
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def launch_training(args: Mapping[str, Any], device_type: str = 'cuda',
                    loop: str = DEFAULT_TRAINING_LOOP) -> Optional[str]:
    """Run `loop(rank=..., device=..., **args)` on args['num_gpus'] processes; args['run_dir'] must be set.
    Returns the stop message when a signal stopped the run, else None.

    One process runs here; more are spawned, meeting through a file in a fresh temporary directory. If one
    rank fails (an error, or killed), torch.multiprocessing.spawn ends the others and this raises RunFailed
    with one line about the first failure. `loop` is a dotted name (spawned processes import it), so tests can
    substitute a small function.
    """
    assert args.get('run_dir') is not None, 'launch_training() needs args.run_dir'
    world_size = args['num_gpus']
    if world_size == 1:
        return _run_rank(0, 1, args, launcher.rank_device(device_type, 0), loop)
    _start_resource_tracker_without_sigusr1()
    spawn = torch.multiprocessing.get_context('spawn')
    stop_value = spawn.Value('i', 0)
    with tempfile.TemporaryDirectory(prefix='stylegan-train-') as temp_dir:
        context = launcher.start(_spawned_rank, (args, temp_dir, loop, stop_value), world_size, device_type, temp_dir)
        try:
            with _forward_stop_signals(stop_value, context.processes):
                while not context.join():
                    pass
        except torch.multiprocessing.ProcessRaisedException:
            message = _first_error(temp_dir)
            if message is None:
                raise
            raise RunFailed(message) from None
        except torch.multiprocessing.ProcessExitedException as e:
            # Killed (out of memory, kill -9) or exited without a Python error: no message of its own.
            how = f'was killed by {e.signal_name}' if e.signal_name else f'exited with code {e.exit_code}'
            raise RunFailed(f'Training stopped: rank {e.error_index} (PID {e.error_pid}) {how}; the other ranks '
                            f'were stopped', traceback=False) from None
        stopped = os.path.join(temp_dir, 'stopped')
        if os.path.isfile(stopped):
            with open(stopped) as f:
                return f.read()
        return None


def launch_torchrun(args: dnnlib.EasyDict, outdir: Optional[str], run_desc: str, device_type: str,
                    dist: Mapping[str, Any], loop: str = DEFAULT_TRAINING_LOOP) -> Optional[str]:
    """This process's share of a torchrun or srun launch (`dist` from distributed_env()): rank 0 prepares (and
    locks) the run directory and shares its path. Returns the stop message on rank 0 when a signal stopped the
    run."""
    rank, world_size = dist['rank'], dist['world_size']
    device = launcher.rank_device(device_type, dist['local_rank'])
    is_new_run = args.get('run_dir') is None
    if world_size == 1:
        with prepare_run_dir(args, outdir, run_desc):
            try:
                return _run_rank(0, 1, args, device, loop)
            except RunFailed as e:
                raise finish_failed_run(e, args.run_dir, is_new_run) from None
    launcher.init_process_group(rank, world_size, device, launcher.launch_init_method(dist, os.environ))
    lock = None
    try:
        message = [None, None]  # [run_dir, error]: every rank learns whether rank 0 succeeded.
        if rank == 0:
            try:
                lock = prepare_run_dir(args, outdir, run_desc)
                message[0] = args.run_dir
            except (UserError, OSError) as e:
                message[1] = e.message if isinstance(e, UserError) else str(e)
        torch.distributed.broadcast_object_list(message, src=0)
        if message[1] is not None:
            raise UserError(message[1] if rank == 0 else f'rank 0 could not prepare the run directory: {message[1]}')
        args.run_dir = message[0]
        try:
            return _run_rank(rank, world_size, args, device, loop)
        except RunFailed as e:
            if rank != 0:
                raise
            raise finish_failed_run(e, args.run_dir, is_new_run) from None
    finally:
        if lock is not None:
            lock.release()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------
# Command line.


def _bool_option(*names: str, help: str):
    """A boolean option that accepts --name, --name=1, --name=true, --name=0, ... (the official spelling is =1)."""
    return click.option(*names, type=bool, metavar='BOOL', is_flag=False, flag_value=True,
                        default=DEFAULTS[names[0].lstrip('-').replace('-', '_')], show_default=True, help=help)


EXAMPLES = '''Examples:

\b
  # Preview a run without a GPU (a login node can prepare the job):
  python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256 --arch=squeeze --dry-run
\b
  # The squeeze generator on FFHQ 256x256, 8 GPUs:
  python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256 --mirror=1 --gpus=8 --arch=squeeze
\b
  # Out of GPU memory? Same batch, fewer images per pass:
  python train.py --outdir=runs --data=ffhq256.zip --cfg=paper256 --gpus=8 --batch-gpu=4
\b
  # Fine-tune an official snapshot into a squeeze generator (weights that fit are copied):
  python train.py --outdir=runs --data=afhqcat.zip --cfg=paper512 --resume=ffhq512 --arch=squeeze
\b
  # Continue a run where it stopped (same directory, options, counters, optimizer state):
  python train.py --resume=runs/00003-ffhq256-mirror-paper256-squeeze-r8
\b
  # A small run on the CPU:
  python train.py --outdir=runs --data=mnist32.zip --cfg=cifar --gpus=0 --cbase=4096 --cmax=64 --kimg=4 \\
      --metrics=none
'''


@click.command(epilog=EXAMPLES)
@click.pass_context
# General options.
@click.option('--outdir', type=click.Path(file_okay=False), help='Where to make the run directory (new runs)')
@click.option('--gpus', type=click.IntRange(min=0), default=DEFAULTS['gpus'], show_default=True,
              help='Number of processes (GPUs); 0 = train on the CPU')
@click.option('--device', type=click.Choice(launcher.DEVICES), default=DEFAULTS['device'], show_default=True,
              help='Where the processes run; cpu runs --gpus processes on the CPU (gloo)')
@click.option('--snap', type=click.IntRange(min=1), default=DEFAULTS['snap'], show_default=True,
              help='Ticks between image and network snapshots')
@click.option('--state-kimg', type=FiniteFloatRange(min=0, min_open=True), help='Also write the training state '
              'every N kimg (at the next tick), so that a preemption loses at most that much  [default: with '
              'the network snapshots only]')
@_bool_option('--stop-snapshot', help='On SIGTERM/SIGINT/SIGUSR1, write a network snapshot besides the training '
              'state')
@click.option('--metrics', callback=_metrics_callback, default=DEFAULTS['metrics'], show_default=True,
              help='Comma-separated list of metrics, or "none"')
@click.option('--seed', type=click.IntRange(min=0, max=2 ** 32 - 1), default=DEFAULTS['seed'], show_default=True,
              help='Random seed')
@click.option('-n', '--dry-run', is_flag=True, help='Show the options tree and the run directory; create nothing '
              '(needs no GPU)')
@click.option('--desc', help='Extra text for the run directory name')
@click.option('--detector-dir', type=click.Path(file_okay=False), help='Folder with the metrics\' feature networks '
              '(inception-2015-12-05.pt, vgg16.pt) for offline machines  [default: $STYLEGAN_DETECTOR_DIR or the '
              'download cache]')
# Dataset.
@click.option('--data', help='Dataset folder or .zip (as dataset_tool.py writes them)')
@_bool_option('--cond', help='Condition G and D on the dataset labels (dataset.json)')
@click.option('--subset', type=click.IntRange(min=1), help='Use only this many images, drawn at random with --seed')
@_bool_option('--mirror', help='Also train on left-right mirrored copies')
# Base configuration.
@click.option('--cfg', type=click.Choice(CFG_NAMES), default=DEFAULTS['cfg'], show_default=True,
              help='Preset (batch, learning rate, gamma, capacity, ...)')
@click.option('--gamma', type=FiniteFloatRange(min=0), help='R1 weight gamma (replaces the preset value)')
@click.option('--kimg', type=FiniteFloatRange(min=0, min_open=True),
              help='Training length in kimg (replaces the preset value; fractions allowed for short tests)')
@click.option('--batch', type=click.IntRange(min=1), help='Total batch over all processes (replaces the preset value)')
@click.option('--batch-gpu', type=click.IntRange(min=1), help='Images per process and round: a smaller value '
              'accumulates gradients over more rounds (the out-of-memory fix; same result up to rounding)')
@click.option('--glr', type=FiniteFloatRange(min=0, min_open=True), help='G learning rate (replaces the preset value)')
@click.option('--dlr', type=FiniteFloatRange(min=0, min_open=True), help='D learning rate (replaces the preset value)')
@click.option('--mbstd-group', type=click.IntRange(min=1), help='Minibatch-std group size of D (replaces the '
              'preset value)')
@click.option('--cbase', type=click.IntRange(min=1), help='Capacity multiplier channel_base (replaces the preset value)')
@click.option('--cmax', type=click.IntRange(min=1), help='Max. feature maps per layer (replaces the preset value 512)')
@click.option('--map-depth', '--map', 'map_depth', type=click.IntRange(min=1),
              help='Mapping network depth (replaces the preset value; --map is an alias)')
@click.option('--tick', type=FiniteFloatRange(min=0, min_open=True), help='kimg per tick (progress line, snapshot '
              'unit)  [default: 4]')
# (--arch and the options of the synthesis blocks come here: make_main() adds them from the registry.)
# Augmentation.
@click.option('--aug', type=click.Choice(AUG_MODES), default=DEFAULTS['aug'], show_default=True,
              help='ada: adaptive p; fixed: constant --p; noaug: none')
@click.option('--p', type=FiniteFloatRange(min=0, max=1), help='The constant probability of --aug=fixed')
@click.option('--target', type=FiniteFloatRange(min=0, max=1), default=DEFAULTS['target'], show_default=True,
              help='Overfitting heuristic r_t that --aug=ada steers towards')
@click.option('--augpipe', type=click.Choice(AUGPIPE_NAMES), default=DEFAULTS['augpipe'], show_default=True,
              help='Which transforms the augmentation applies (preset name)')
# Transfer learning and resuming.
@click.option('--resume', help=f'Start from a snapshot ({", ".join(RESUME_PRESETS)}, .pkl path or URL), or '
              f'continue a run (its directory or {STATE_FILE_NAME})')
@click.option('--freezed', type=click.IntRange(min=0), help='Keep the D layers below this index fixed (transfer learning)')
# Performance.
@click.option('--precision', type=click.Choice(PRECISIONS), default=DEFAULTS['precision'], show_default=True,
              help='Precision of the 4 highest-resolution blocks of G and D on a GPU: fp16 (official), bf16 (no '
              'overflow; H100/H200), or fp32 (= --fp32); everything else is float32')
@_bool_option('--fp32', help='Float32 everywhere: no fp16 layers, no activation clamping (= --precision=fp32)')
@_bool_option('--nhwc', help='Channels-last memory format for the fp16 layers')
@_bool_option('--nobench', help='Do not let cuDNN time its algorithms (cudnn.benchmark off)')
@_bool_option('--allow-tf32', help='Let matmuls and convolutions run in TF32 on recent GPUs')
@click.option('--workers', type=click.IntRange(min=0), default=DEFAULTS['workers'], show_default=True,
              help='Data-loading worker processes per training process')
def _command(ctx: click.Context, outdir: Optional[str], dry_run: bool, **options) -> None:
    """Train a StyleGAN2-ADA generator (stock blocks or the image squeeze connection).

    The run goes to <outdir>/<NNNNN>-<description>/ (training_options.json, log.txt, images, snapshots,
    statistics). See the docstring of train.py for the run description and the resume rules.
    """
    source = click.core.ParameterSource
    given = {name: value for name, value in options.items() if ctx.get_parameter_source(name) != source.DEFAULT}
    dist = distributed_env(os.environ)
    # Under torchrun or srun every process builds the plan; only rank 0 reads the resume snapshot and the
    # feature networks (if it fails, the launcher stops the others).
    run_desc, args, launch = build_training_plan(distributed=dist, check_devices=not dry_run,
                                                 check_files=dist is None or dist['rank'] == 0, **given)
    is_resumed_state = args.get('resume_state') is not None
    if is_resumed_state and outdir is not None:
        _warn('--outdir ignored: a resumed training state continues in its own directory')
    is_main = dist is None or dist['rank'] == 0

    if dry_run:
        if is_main:
            if not is_resumed_state and outdir is not None:
                check_outdir(outdir)
            run_dir = args.run_dir if is_resumed_state else next_run_dir(outdir or '<outdir>', run_desc)
            click.echo(describe(args, run_dir, launch.device_type))
            click.echo('\nDry run; exiting.')
        return

    if dist is not None:
        stopped = launch_torchrun(args, outdir, run_desc, launch.device_type, dist)
    else:
        with prepare_run_dir(args, outdir, run_desc):
            run_dir = args.run_dir
            summary = describe(args, run_dir, launch.device_type)
            click.echo(summary)
            click.echo('\nLaunching processes...')
            with open(os.path.join(run_dir, LOG_FILE_NAME), 'a') as f:  # The processes append after it.
                f.write(summary + '\n\nLaunching processes...\n')
            try:
                stopped = launch_training(args, launch.device_type)
            except RunFailed as e:
                raise finish_failed_run(e, run_dir, is_new_run=not is_resumed_state) from None
    if stopped is not None:
        # The training processes printed the stop line; a scheduler's requeue logic can key on the status.
        ctx.exit(EXIT_STOPPED)


def _block_click_options() -> List[click.Option]:
    """--arch with the names in SYNTHESIS_BLOCKS, and one option per user option of those blocks
    (networks.BlockOption)."""
    params = [click.Option(['--arch'], type=click.Choice(list(SYNTHESIS_BLOCKS)), default=DEFAULTS['arch'],
                           show_default=True, help='Generator synthesis block')]
    for name, (option, owners) in synthesis_block_options().items():
        if option.type is bool:
            kwargs = dict(type=bool, metavar='BOOL', is_flag=False, flag_value=True)
        elif option.choices:
            kwargs = dict(type=click.Choice(option.choices))
        elif option.type is int:
            kwargs = dict(type=click.IntRange(min=option.min))
        elif option.type is float:
            kwargs = dict(type=FiniteFloatRange(min=option.min))
        else:
            kwargs = dict(type=option.type)
        archs = ' or '.join(f'--arch={owner}' for owner in owners)
        params.append(click.Option(['--' + name.replace('_', '-')], default=option.default, show_default=True,
                                   help=f'{option.help} ({archs})', **kwargs))
    return params


def make_main() -> click.Command:
    """The command line of train.py, with --arch and the flags of the synthesis blocks registered now (after
    --tick). A block added to SYNTHESIS_BLOCKS brings its flags; `main` is built once, at import."""
    command = copy.copy(_command)
    at = [param.name for param in _command.params].index('tick') + 1
    command.params = _command.params[:at] + _block_click_options() + _command.params[at:]
    return command


main = make_main()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
