"""Compute quality metrics of a trained generator.

Examples:

    # FID of a snapshot against its training set (read from the run's training_options.json or the snapshot);
    # the result is also appended to <run_dir>/metric-fid50k_full.jsonl:
    python calc_metrics.py --network=runs/00000-ffhq256-paper256/network-snapshot-001000.pkl

    # Several metrics of a pretrained network against a given dataset, with 4 GPUs:
    python calc_metrics.py --metrics=fid50k_full,pr50k3_full,ppl2_wend --network=ffhq.pkl --data=ffhq256.zip --mirror=1 --gpus=4

    # Offline machine without a GPU: one CPU process; the detectors lie in a local folder:
    python calc_metrics.py --network=net.pkl --data=data.zip --gpus=0 --detector-dir=/data/detectors

The network may be an official or our own `.pkl` snapshot, a TensorFlow pickle, a weights-only `.pt` file or a
URL of any (training/snapshot_io.py); official networks are adopted into this code base's classes unless `--adopt=0`.
`--gpus` and `--device` mean what they mean for train.py: `--gpus=0` is one CPU process, `--gpus=N` runs N
processes, one per CUDA device, or N processes on the CPU with `--device=cpu`; train.py's resolver and spawn
(torch_utils/distributed.py) start them, so their process group also gives up after 15 minutes of waiting
instead of hanging. Valid metrics: fid50k_full, kid50k_full, pr50k3_full, ppl2_wend, is50k and the legacy
fid50k, kid50k, pr50k3, ppl_zfull, ppl_wfull, ppl_zend, ppl_wend.
"""

import json
import os
import tempfile
from typing import Any, List, Optional

import click
import torch

import dnnlib
from metrics import metric_main, metric_utils
from runner import host_memory
from torch_utils import compiler, distributed
from training import adoption, snapshot_io

OPTIONS_FILE_NAME = 'training_options.json'  # Marks a run directory; holds training_set_kwargs.

# ----------------------------------------------------------------------------
# Pure helpers.


def parse_metric_list(text: Any) -> List[str]:
    """'fid50k_full,kid50k_full' -> ['fid50k_full', 'kid50k_full']; unknown names raise click.BadParameter."""
    names = [name.strip() for name in (text.split(',') if isinstance(text, str) else text) if name.strip()]
    if not names:
        raise click.BadParameter(f'no metric given; valid metrics: {", ".join(metric_main.list_valid_metrics())}')
    for name in names:
        if not metric_main.is_valid_metric(name):
            raise click.BadParameter(f'unknown metric {name!r}; valid metrics: '
                                     f'{", ".join(metric_main.list_valid_metrics())}')
    return names


def find_run_dir(network: str) -> Optional[str]:
    """The directory of a local snapshot if it is a run directory (holds training_options.json), else None."""
    if dnnlib.util.is_url(network, allow_file_urls=True):
        if not network.startswith('file://'):
            return None
        network = dnnlib.util.file_url_to_path(network)
    folder = os.path.dirname(os.path.abspath(network))
    return folder if os.path.isfile(os.path.join(folder, OPTIONS_FILE_NAME)) else None


def load_snapshot(network: str, adopt: bool = True, verbose: bool = True, verify: bool = True) -> dict:
    """The snapshot dict; its G_ema adopted into our classes (training.adoption.adopt_network) unless `adopt` is
    False. Every problem becomes a one-line click error."""
    try:
        with dnnlib.util.open_url(network) as f:
            snapshot = snapshot_io.load_network_pkl(f)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(f'--network: cannot load "{network}": {e}') from None
    if adopt:
        snapshot['G_ema'], note = adoption.adopt_network(snapshot.get('G_ema'), name='G_ema', verify=verify)
        if note is not None and verbose:
            print(note)
    return snapshot


def dataset_kwargs_for(network: str, snapshot: dict, data: Optional[str], mirror: Optional[bool],
                       G: Any) -> dnnlib.EasyDict:
    """The dataset to compare against: `--data` if given, else the training set recorded in the run's
    training_options.json, else the one stored in the snapshot. Resolution and labels follow G."""
    if data is not None:
        kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data)
    else:
        kwargs = None
        run_dir = find_run_dir(network)
        if run_dir is not None:
            with open(os.path.join(run_dir, OPTIONS_FILE_NAME)) as f:
                kwargs = json.load(f).get('training_set_kwargs')
        if kwargs is None:
            kwargs = snapshot.get('training_set_kwargs')
        if kwargs is None:
            raise click.ClickException('--data is required: the snapshot records no training set and it does not '
                                       f'sit in a run directory with {OPTIONS_FILE_NAME}')
        kwargs = dnnlib.EasyDict(kwargs)
    kwargs.resolution = G.img_resolution
    kwargs.use_labels = G.c_dim != 0
    if mirror is not None:
        kwargs.xflip = bool(mirror)
    try:
        dataset = dnnlib.util.construct_class_by_name(**kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(f'Cannot open the dataset {kwargs.get("path")!r}: {e}') from None
    if dataset.num_channels != G.img_channels:
        raise click.ClickException(f'The dataset has {dataset.num_channels} channel(s), the generator '
                                   f'{G.img_channels}')
    if G.c_dim != 0 and dataset.label_dim != G.c_dim:
        raise click.ClickException(f'The dataset has {dataset.label_dim}-D labels, the generator expects {G.c_dim}')
    return kwargs


def max_cpu_processes() -> int:
    """Most CPU processes `--gpus=N --device=cpu` may start: more than one per core only compete for the cores,
    and a typo (--gpus=1000) would start that many copies of the networks. At least 8, for small machines that
    test a multi-process setup."""
    return max(8, os.cpu_count() or 1)


def resolve_processes(gpus: int, device: str = 'auto') -> dnnlib.EasyDict:
    """What `--gpus` and `--device` ask for, with train.py's meaning and train.py's resolver
    (torch_utils.distributed.resolve_device): EasyDict(num_gpus, device_type).

    `--gpus=0` is one CPU process; `--gpus=N` runs N processes, one per CUDA device, unless `--device=cpu`
    runs them on the CPU (gloo). A CUDA request on a machine without CUDA is an error that names the way out;
    it never falls back to the CPU silently.
    """
    try:
        return distributed.resolve_device(gpus, device, work='compute')
    except distributed.LaunchError as e:
        raise click.ClickException(str(e)) from None

# ----------------------------------------------------------------------------
# One process.


def _run_rank(rank: int, device: torch.device, args: dnnlib.EasyDict, temp_dir: Optional[str]) -> List[dict]:
    """One process; a spawned one (torch_utils.distributed.spawn) is already in the process group. `args` has
    the official keys (metrics, num_gpus, network_pkl, verbose, G, dataset_kwargs, run_dir) and may add ours
    (detector_dir, adopt)."""
    host_memory.keep_freed_memory()
    # TF32 would change the metrics' numbers on Ampere and later GPUs.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.get('G') is not None:
        G = args.G
    else:  # A spawned rank: adopt as the parent did, whose check of the outputs need not be repeated.
        G = load_snapshot(args.network_pkl, adopt=args.get('adopt', True), verbose=False, verify=False)['G_ema']
    results = []
    for metric in args.metrics:
        if args.verbose:
            distributed.print0(f'Calculating {metric}...', flush=True)
        result = metric_main.calc_metric(metric, G=G, dataset_kwargs=args.dataset_kwargs, num_gpus=args.num_gpus,
                                         rank=rank, device=device, detector_dir=args.get('detector_dir'),
                                         compile=args.get('compile', False),
                                         progress=metric_utils.ProgressMonitor(verbose=args.verbose and rank == 0))
        if rank == 0:
            metric_main.report_metric(result, run_dir=args.get('run_dir'), snapshot_pkl=args.network_pkl)
        results.append(result)
    if rank == 0 and temp_dir is not None:
        with open(os.path.join(temp_dir, 'results.json'), 'w') as f:
            json.dump(results, f)
    return results


def subprocess_fn(rank: int, args: dnnlib.EasyDict, temp_dir: str) -> List[dict]:
    """The official name and parameters (SPEC §7; third-party code calls it): compute args.metrics as process
    `rank` of args.num_gpus, which meet through a file in `temp_dir`, as the official calc_metrics.py spawns it
    (`torch.multiprocessing.spawn(fn=subprocess_fn, args=(args, temp_dir), nprocs=args.num_gpus)`). The
    processes run on CUDA device `rank`, as official, unless args.device_type says 'cpu' (what calc_metrics()
    puts there for --gpus=0 or --device=cpu). Returns the result dicts; rank 0 also reports them."""
    device = distributed.rank_device(args.get('device_type', 'cuda'), rank)
    if args.num_gpus == 1:
        return _run_rank(rank, device, args, temp_dir)
    init_file = os.path.abspath(os.path.join(temp_dir, distributed.INIT_FILE_NAME))
    distributed.init_process_group(rank, args.num_gpus, device, f'file://{init_file}')
    try:
        return _run_rank(rank, device, args, temp_dir)
    finally:
        torch.distributed.destroy_process_group()

# ----------------------------------------------------------------------------


def calc_metrics(
    network:        str,                        # Snapshot path or URL.
    metrics:        Any = 'fid50k_full',        # Metric names (list or comma-separated string).
    data:           Optional[str] = None,       # Dataset path; None = the run's / snapshot's training set.
    mirror:         Optional[bool] = None,      # Include x-flips of the dataset; None = as recorded.
    gpus:           int = 1,                    # Processes: 0 = one CPU process, N = N CUDA (or CPU) processes.
    verbose:        bool = True,                # Progress lines.
    detector_dir:   Optional[str] = None,       # Folder with local detector files; None = $STYLEGAN_DETECTOR_DIR.
    device:         str = 'auto',               # auto, cpu or cuda: where the --gpus processes run (as in train.py).
    adopt:          bool = True,                # Rebuild an official G_ema as this code base's class.
    compile:        bool = False,               # torch.compile G for the feature statistics.
) -> List[dnnlib.EasyDict]:
    """Compute the metrics and report each (stdout, and metric-<name>.jsonl in the run directory if the snapshot
    sits in one). Returns the result dicts.

    Option and data errors (metric names, the snapshot, the dataset) are reported before device errors.
    """
    metrics = parse_metric_list(metrics)
    try:
        distributed.check_request(gpus, device)
    except distributed.LaunchError as e:
        raise click.BadParameter(str(e)) from None
    if device == 'cpu' and gpus > max_cpu_processes():
        raise click.BadParameter(f'--gpus={gpus} with --device=cpu would start {gpus} processes, each with its own '
                                 f'copy of the networks; this machine has {os.cpu_count()} CPU cores: give at most '
                                 f'{max_cpu_processes()}', param_hint='--gpus')
    if compile:
        try:
            compiler.check_available(torch.device('cpu' if device == 'cpu' or gpus == 0 else 'cuda'))
        except compiler.CompileUnavailable as e:
            raise click.ClickException(f'--compile: {e}') from None
    snapshot = load_snapshot(network, adopt=adopt, verbose=verbose)
    G = snapshot.get('G_ema')
    if G is None:
        raise click.ClickException(f'--network: "{network}" holds no G_ema')
    dataset_kwargs = dataset_kwargs_for(network, snapshot, data, mirror, G)
    launch = resolve_processes(gpus, device)
    args = dnnlib.EasyDict(
        network_pkl     = network,
        metrics         = metrics,
        dataset_kwargs  = dataset_kwargs,
        num_gpus        = launch.num_gpus,
        verbose         = verbose,
        detector_dir    = detector_dir,
        device_type     = launch.device_type,
        run_dir         = find_run_dir(network),
        adopt           = adopt and adoption.adoptable_classes().get(type(G).__name__) is type(G),
        G               = G if launch.num_gpus == 1 else None,  # Spawned ranks load the snapshot themselves.
        compile         = compile,
    )
    if launch.num_gpus == 1:
        return _run_rank(0, distributed.rank_device(launch.device_type, 0), args, None)
    with tempfile.TemporaryDirectory(prefix='stylegan-metrics-') as temp_dir:
        distributed.spawn(_run_rank, (args, temp_dir), launch.num_gpus, launch.device_type, temp_dir)
        with open(os.path.join(temp_dir, 'results.json')) as f:
            return [dnnlib.EasyDict(result, results=dnnlib.EasyDict(result['results'])) for result in json.load(f)]


EXAMPLES = """\b
Examples:

\b
  # FID of a snapshot against its training set (from the run's training_options.json or the snapshot);
  # the result is also appended to <run_dir>/metric-fid50k_full.jsonl:
  python calc_metrics.py --network=runs/00000-ffhq256-paper256/network-snapshot-001000.pkl

\b
  # Several metrics of a pretrained network against a given dataset, with 4 GPUs:
  python calc_metrics.py --metrics=fid50k_full,pr50k3_full,ppl2_wend --network=ffhq.pkl \\
      --data=ffhq256.zip --mirror=1 --gpus=4

\b
  # A machine without a GPU and without network access: one CPU process, detectors in a local folder:
  python calc_metrics.py --network=net.pkl --data=data.zip --gpus=0 --detector-dir=/data/detectors
"""


@click.command(epilog=EXAMPLES)
@click.option('--network', 'network', required=True, metavar='PATH|URL', help='Network snapshot (.pkl or .pt)')
@click.option('--metrics', default='fid50k_full', show_default=True, metavar='LIST',
              help=f'Comma-separated list or "none" [one of: {", ".join(metric_main.list_valid_metrics())}]')
@click.option('--data', metavar='PATH', help='Dataset to evaluate against [default: the training set of the snapshot]')
@click.option('--mirror', type=bool, metavar='BOOL', help='Include x-flips of the dataset [default: as recorded]')
@click.option('--gpus', type=click.IntRange(min=0), default=1, show_default=True,
              help='Number of processes (GPUs); 0 = one CPU process')
@click.option('--verbose', type=bool, default=True, show_default=True, metavar='BOOL', help='Print progress')
@click.option('--detector-dir', metavar='DIR', default=None,
              help=f'Folder with inception-2015-12-05.pt and vgg16.pt [default: ${metric_utils.DETECTOR_DIR_ENV} or download]')
@click.option('--device', type=click.Choice(distributed.DEVICES), default='auto', show_default=True,
              help='Where the processes run; cpu runs --gpus processes on the CPU (gloo)')
@click.option('--adopt', type=bool, default=True, show_default=True, metavar='BOOL',
              help="Rebuild an official snapshot's G_ema as this code base's class (fp32 off the GPU, our kernels); "
                   "0 runs the class embedded in the pickle")
@click.option('--compile', 'compile_net', is_flag=True, default=False,
              help='torch.compile G for the feature statistics (inductor; agrees with eager to float rounding)')
def main(network, metrics, data, mirror, gpus, verbose, detector_dir, device, adopt, compile_net):
    """Calculate quality metrics for a trained network snapshot.

    The results are printed as JSON lines and, when the snapshot lies in a training run directory (one with
    training_options.json), appended to metric-<name>.jsonl there.
    """
    if metrics.strip() == 'none':
        return
    host_memory.keep_freed_memory()  # Here too: it checks $STYLEGAN_HOST_MALLOC before any work.
    try:
        calc_metrics(network=network, metrics=metrics, data=data, mirror=mirror, gpus=gpus, verbose=verbose,
                     detector_dir=detector_dir, device=device, adopt=adopt, compile=compile_net)
    except metric_utils.DetectorNotFoundError as e:
        raise click.ClickException(str(e)) from None


if __name__ == '__main__':
    main()
