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
`<run_dir>/training_options.json` and printed by `--dry-run`. Every option is declared once, as a
`training.flags.Option` (runner.options.OPTIONS for these, the synthesis blocks' and the regularizers' own
declarations for theirs): its flag, default, range check, run-name piece and, where its value lands as it is,
its place in the tree come from there (`make_main`, `runner.command_line`). An option the user did not give is
passed as None (or left out) and takes its declared default, so the builder also knows what was given
explicitly; `main` passes only the options whose click parameter source is not the default. Presets are the
table `PRESETS`; `auto` is computed from the dataset resolution and the number of processes (`auto_preset`).
The builder composes section builders (dataset, preset, networks, schedule, augmentation, transfer,
regularizers) for what depends on several options or on the data. `--arch` and the flags of the synthesis
blocks come from `training.networks.SYNTHESIS_BLOCKS`, `--reg` and the flags of the regularizers from
`training.regularizers.REGULARIZERS`: a block or a regularizer registered there brings its own flags, defaults,
run-description pieces and "applies only to --arch=X / --reg=X" check. This script is the command line and the
composition: the builder is runner/options.py, the process launcher runner/launch.py, the run directory
runner/run_dir.py, the metrics' checks runner/metric_plan.py (package `runner`).

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
    <regularizers>          --reg, in its order, each regularizer's piece:
      -ggdr<res>[w<w:g>]      ggdr: the feature resolution, the weight if not 10 (-ggdr64, -ggdr16w5)
      -glead<res_g>[-gfwimage][-mse]  glead: G's tail resolution, the fake branch if not gfeat, mse
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

import copy
import os
from typing import List, Optional

import click

import dnnlib
import runner.launch
import runner.options
from runner import host_memory
from runner.command_line import click_options, given_options
from runner.errors import FiniteFloatRange, RunFailed, UserError, warn
from runner.launch import DEFAULT_TRAINING_LOOP, launch_torchrun, launch_training
from runner.metric_plan import check_metrics_ready, cpu_metric_note
from runner.options import (
    AUGPIPE_NAMES,
    CFG_NAMES,
    PRECISIONS,
    PRESETS,
    RESUME_PRESETS,
    STATE_OVERRIDES,
    command_line_options,
    distributed_env,
    inspect_dataset,
    resolve_launch,
)
from runner.run_dir import (
    LOG_FILE_NAME,
    OPTIONS_FILE_NAME,
    check_outdir,
    describe,
    finish_failed_run,
    next_run_dir,
    prepare_run_dir,
    write_options,
)
from torch_utils import distributed as launcher  # Not `distributed`: that names the launch-environment argument.

# What scripts, tests and users call as train.<name>; the code lives in package runner.
__all__ = [
    'AUGPIPE_NAMES', 'CFG_NAMES', 'DEFAULT_TRAINING_LOOP', 'EXIT_STOPPED', 'LOG_FILE_NAME', 'OPTIONS_FILE_NAME',
    'PRECISIONS', 'PRESETS', 'RESUME_PRESETS', 'STATE_OVERRIDES', 'CommaSeparatedList', 'FiniteFloatRange',
    'RunFailed', 'UserError', 'build_training_plan', 'check_metrics_ready', 'check_outdir', 'describe',
    'distributed_env', 'finish_failed_run', 'inspect_dataset', 'launch_torchrun', 'launch_training', 'main',
    'make_main', 'next_run_dir', 'prepare_run_dir', 'resolve_launch', 'setup_training_loop_kwargs',
    'setup_training_options', 'subprocess_fn', 'write_options',
]

# Exit status of a run stopped by SIGTERM/SIGINT/SIGUSR1 after saving its state: EX_TEMPFAIL of sysexits.h,
# "try again later", distinct from errors (1) and usage errors (2).
EXIT_STOPPED = 75

# ----------------------------------------------------------------------------
# The metrics, composed with the option builder and the launcher. Package `training` may not import package
# `metrics`, so this script hands the registry and the evaluator in.


def build_training_plan(**opts) -> tuple:
    """runner.options.build_training_plan: (run_desc, args, EasyDict(num_gpus, device_type))."""
    return runner.options.build_training_plan(**opts)


def setup_training_options(**opts) -> tuple:
    """Command-line values -> (run_desc, args) where `training_loop(run_dir=..., **args)` trains.

    Keywords are the option names of train.py (runner.options.command_line_options(); the click option names
    with '_' for '-'); one left out or None takes its declared default. Raises UserError for inconsistent
    options, TypeError for an unknown keyword.
    """
    run_desc, args, _launch = build_training_plan(**opts)
    return run_desc, args


def setup_training_loop_kwargs(
    # The keywords of the official builder, with its meanings (SPEC §7; third-party code calls it); None = default.
    gpus        = None,     # Number of processes (GPUs); ours also takes 0 = one CPU process.
    snap        = None,     # Snapshot interval in ticks.
    metrics     = None,     # List of metric names, [] = none.
    seed        = None,     # Random seed.
    data        = None,     # Dataset folder or .zip (required).
    cond        = None,     # Condition on the dataset labels.
    subset      = None,     # Train on this many images.
    mirror      = None,     # Add x-flipped images.
    cfg         = None,     # Preset name or 'auto'.
    gamma       = None,     # R1 weight override.
    kimg        = None,     # Training length override.
    batch       = None,     # Total batch size override.
    aug         = None,     # 'ada', 'noaug' or 'fixed'.
    p           = None,     # Augmentation probability for aug='fixed'.
    target      = None,     # ADA target for aug='ada'.
    augpipe     = None,     # Augmentation preset.
    resume      = None,     # Snapshot to start from (preset name, .pkl, URL) or a run to continue.
    freezed     = None,     # Number of frozen D layers.
    fp32        = None,     # No mixed precision.
    nhwc        = None,     # Channels-last for the fp16 layers.
    allow_tf32  = None,     # Allow TF32 matmuls and convolutions.
    nobench     = None,     # No cuDNN benchmarking.
    workers     = None,     # DataLoader worker processes.
    **options,              # Our further options by their setup_training_options names (arch, tick, device, ...).
) -> tuple:
    """The official builder's name and keywords: (run_desc, args), built by setup_training_options. As with the
    official one, `args` has no run_dir: set it to a directory that exists, then call
    subprocess_fn(rank=0, args=args, temp_dir=...) (or spawn args.num_gpus of them). Raises UserError for
    inconsistent options, TypeError for an unknown keyword."""
    unknown = sorted(set(options) - set(_option_names()))
    if unknown:
        raise TypeError(f'setup_training_loop_kwargs() got unknown option(s) {", ".join(unknown)}')
    official = {name: value for name, value in locals().items() if name not in ('options', 'unknown')}
    return setup_training_options(**official, **options)


def _option_names() -> List[str]:
    """The keywords setup_training_options takes: every option of train.py (the builder's launch keywords
    are not the official builder's)."""
    return [option.name for option, _applies_to in command_line_options()]


def subprocess_fn(rank: int, args: dnnlib.EasyDict, temp_dir: str) -> Optional[str]:
    """The official name and parameters (SPEC §7; third-party code calls it): run process `rank` of the run that
    `args` describes (from setup_training_loop_kwargs, args.run_dir an existing directory). The
    args.num_gpus processes meet through a file in `temp_dir`, as the official train.py spawns them
    (`torch.multiprocessing.spawn(fn=subprocess_fn, args=(args, temp_dir), nprocs=args.num_gpus)`); one process
    is just called. Returns the stop message on rank 0 when a signal stopped the run, else None; an error raises
    RunFailed (one line; the traceback is in log.txt)."""
    return runner.launch.run_rank(rank, args, temp_dir)


# ----------------------------------------------------------------------------
# Command line.


class CommaSeparatedList(click.ParamType):
    """A click type for 'a,b,c' (a list of strings; '', 'none' and None give []). Kept under the official name,
    which third-party code imports; our own options parse their lists with their own callbacks."""

    name = 'list'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        if value is None or value == '' or value.lower() == 'none':
            return []
        return value.split(',')


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
@click.option('--outdir', type=click.Path(file_okay=False), help='Where to make the run directory (new runs)')
@click.option('-n', '--dry-run', is_flag=True, help='Show the options tree and the run directory; create nothing '
              '(needs no GPU)')
# (Every other option comes from runner.options.command_line_options(): make_main() adds them.)
def _command(ctx: click.Context, outdir: Optional[str], dry_run: bool, **options) -> None:
    """Train a StyleGAN2-ADA generator (stock blocks or the image squeeze connection).

    The run goes to <outdir>/<NNNNN>-<description>/ (training_options.json, log.txt, images, snapshots,
    statistics). See the docstring of train.py for the run description and the resume rules.
    """
    host_memory.keep_freed_memory()  # Here too: it checks $STYLEGAN_HOST_MALLOC before any work.
    given = given_options(ctx, options)
    dist = distributed_env(os.environ)
    # Under torchrun or srun every process builds the plan; only rank 0 reads the resume snapshot and the
    # feature networks (if it fails, the launcher stops the others).
    run_desc, args, launch = build_training_plan(distributed=dist, check_devices=not dry_run,
                                                 check_files=dist is None or dist['rank'] == 0, **given)
    is_resumed_state = args.get('resume_state') is not None
    if launch.device_type == 'cpu' and args.metrics and (dist is None or dist['rank'] == 0):
        data = args.training_set_kwargs
        note = cpu_metric_note(args.metrics, int(data.get('max_size') or 0), bool(data.get('xflip')))
        if note is not None:
            click.echo(note, err=True)
    if is_resumed_state and outdir is not None:
        warn('--outdir ignored: a resumed training state continues in its own directory')
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
        # The group is destroyed and the files are closed: end without the teardown that can abort a finished
        # rank (torch_utils.distributed.exit_without_teardown), with the status a scheduler keys on.
        launcher.exit_without_teardown(EXIT_STOPPED if stopped is not None else 0)
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


def make_main() -> click.Command:
    """The command line of train.py: --outdir and --dry-run, then every option of
    runner.options.command_line_options(), read from the registries now (a block added to SYNTHESIS_BLOCKS or a
    regularizer added to REGULARIZERS brings its flags); `main` is built once, at import."""
    command = copy.copy(_command)
    command.params = _command.params + click_options(command_line_options())
    return command


main = make_main()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
