"""The metric registry: names -> functions of MetricOptions, plus running and reporting them.

A metric function takes a MetricOptions and returns a dict of named float results. Reports are JSON lines
`{results, metric, total_time, total_time_str, num_gpus, snapshot_pkl, timestamp}` appended to
`<run_dir>/metric-<name>.jsonl`.

Metric names follow the official release: `<what><num generated>[k<nhood>][_full]`. '_full' compares with the
whole dataset without x-flips; the older variants without '_full' use 50k real images (x-flips as the dataset
was configured) and, for PPL, the cropped face region.
"""

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import dnnlib

from . import (
    frechet_inception_distance,
    inception_score,
    kernel_inception_distance,
    metric_utils,
    perceptual_path_length,
    precision_recall,
)

_metric_dict: Dict[str, Callable] = dict()  # Name -> metric function.
_metric_detectors: Dict[str, tuple] = dict()  # Name -> URLs of the feature networks the metric runs.
_metric_features_only: Dict[str, bool] = dict()  # Name -> the metric uses only the detectors' features.


def register_metric(fn: Optional[Callable] = None, *, detectors: Sequence[str] = (),
                    features_only: bool = False) -> Callable:
    """Decorator: make `fn(opts) -> dict` available under its function name.

    `detectors` are the URLs of the feature networks the metric runs (each metric module's DETECTOR_URL), so
    that check_metrics_ready() can find their files before a run starts. `features_only` says that the metric
    calls them with return_features=True only, so that a substitute (metric_utils.SUBSTITUTES) will do when a
    detector's own file is missing. Use as `@register_metric`, `register_metric(fn)` (as in the official code)
    or `@register_metric(detectors=[...], features_only=True)`.
    """
    if fn is None:
        return lambda fn: register_metric(fn, detectors=detectors, features_only=features_only)
    assert callable(fn)
    assert not isinstance(detectors, str), 'detectors is a list of URLs'
    _metric_dict[fn.__name__] = fn
    _metric_detectors[fn.__name__] = tuple(detectors)
    _metric_features_only[fn.__name__] = bool(features_only)
    return fn


def unregister_metric(name: str) -> None:
    """Remove a metric (tests that register their own)."""
    _metric_dict.pop(name, None)
    _metric_detectors.pop(name, None)
    _metric_features_only.pop(name, None)


def is_valid_metric(metric: str) -> bool:
    return metric in _metric_dict


def list_valid_metrics() -> List[str]:
    return list(_metric_dict.keys())


def _check_names(metrics: Sequence[str]) -> None:
    unknown = [metric for metric in metrics if not is_valid_metric(metric)]
    if unknown:
        raise ValueError(f'Unknown metric(s) {", ".join(map(repr, unknown))}; valid metrics: '
                         f'{", ".join(list_valid_metrics())}')


def metric_detectors(metric: str) -> List[str]:
    """URLs of the feature networks that `metric` runs."""
    _check_names([metric])
    return list(_metric_detectors[metric])


def metric_features_only(metric: str) -> bool:
    """True when `metric` needs only detector features (a substitute detector will do)."""
    _check_names([metric])
    return _metric_features_only[metric]


def check_metrics_ready(
    metrics:        List[str],              # Metric names, e.g. the list of train.py's --metrics.
    detector_dir:   Optional[str] = None,   # Folder with local copies of the detectors; None = $STYLEGAN_DETECTOR_DIR.
) -> None:
    """Make sure that the feature network file of every metric in `metrics` is on this machine: in
    detector_dir, in the download cache, or downloaded now (an unreachable host fails in seconds).

    Meant for the start of a run, before its directory exists, so that an offline machine without the files
    stops at once instead of after the first tick. Raises ValueError for an unknown metric name, and one
    metric_utils.DetectorNotFoundError for all missing files, naming the metrics that need each, the exact
    paths where it can be placed and the --detector-dir / $STYLEGAN_DETECTOR_DIR options.
    """
    _check_names(metrics)
    needed_by = dict()  # (detector URL, features only) -> metric names, in the order first needed.
    for metric in metrics:
        for url in _metric_detectors[metric]:
            names = needed_by.setdefault((url, _metric_features_only[metric]), [])
            if metric not in names:
                names.append(metric)
    problems, where = [], []
    for (url, features_only), names in needed_by.items():
        try:
            metric_utils.detector_source(url, detector_dir, features_only=features_only, verbose=True)
        except metric_utils.DetectorNotFoundError as e:
            problems.append(metric_utils.missing_detector_message(url, e.reason or str(e), e.where, needed_by=names,
                                                                  options_hint=False, hint=e.hint))
            where += [path for path in e.where if path not in where]
    if problems:
        message = '\n'.join(problems + [metric_utils.DETECTOR_OPTIONS_HINT])
        raise metric_utils.DetectorNotFoundError(message, where=where)


def _broadcast_results(opts: metric_utils.MetricOptions, results: dict) -> dict:
    """Rank 0 computes the final numbers; give every rank the same values."""
    if not opts.distributed:
        return results
    device = opts.device if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    out = dict()
    for key in sorted(results):
        value = torch.as_tensor(float(results[key]), dtype=torch.float64, device=device)
        torch.distributed.broadcast(value, src=0)
        out[key] = float(value.item())
    return out


def calc_metric(metric: str, **kwargs) -> dnnlib.EasyDict:
    """Compute `metric` with MetricOptions(**kwargs); every rank of a multi-process run must call this."""
    _check_names([metric])
    opts = metric_utils.MetricOptions(**kwargs)
    start_time = time.time()
    results = _metric_dict[metric](opts)
    total_time = time.time() - start_time
    results = _broadcast_results(opts, results)
    return dnnlib.EasyDict(
        results         = dnnlib.EasyDict(results),
        metric          = metric,
        total_time      = total_time,
        total_time_str  = dnnlib.util.format_time(total_time),
        num_gpus        = opts.num_gpus,
    )


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def report_metric(result_dict: dict, run_dir: Optional[str] = None, snapshot_pkl: Optional[str] = None) -> str:
    """Print the result as one JSON line and append it to `<run_dir>/metric-<name>.jsonl` if run_dir exists.
    `snapshot_pkl` is stored relative to run_dir when it lies inside it. Returns the line."""
    metric = result_dict['metric']
    assert is_valid_metric(metric), f'Unknown metric {metric!r}'
    if run_dir is not None and snapshot_pkl is not None and _is_inside(snapshot_pkl, run_dir):
        snapshot_pkl = os.path.relpath(snapshot_pkl, run_dir)
    line = json.dumps(dict(result_dict, snapshot_pkl=snapshot_pkl, timestamp=time.time()))
    print(line, flush=True)
    if run_dir is not None and os.path.isdir(run_dir):
        with open(os.path.join(run_dir, f'metric-{metric}.jsonl'), 'at') as f:
            f.write(line + '\n')
    return line


def run_training_metrics(
    metrics:        List[str],          # Metric names.
    G_ema:          Any,                # Generator to evaluate.
    dataset_kwargs: dict,               # The training set's kwargs.
    num_gpus:       int = 1,            # Processes taking part (each one calls this function).
    rank:           int = 0,            # Rank of this process.
    device:         Any = None,         # Device of this process.
    run_dir:        Optional[str] = None,   # Where metric-<name>.jsonl goes.
    snapshot_pkl:   Optional[str] = None,   # The snapshot the results belong to.
    verbose:        bool = False,       # Progress lines (rank 0 only).
    **metric_kwargs,                    # Further MetricOptions (cache, detector_dir, G_kwargs).
) -> List[dnnlib.EasyDict]:
    """What the training loop calls at each network snapshot: compute every metric on all ranks, report on
    rank 0. Returns the result dicts (the same on every rank)."""
    results = []
    for metric in metrics:
        result = calc_metric(metric, G=G_ema, dataset_kwargs=dataset_kwargs, num_gpus=num_gpus, rank=rank,
                             device=device, progress=metric_utils.ProgressMonitor(verbose=verbose and rank == 0),
                             **metric_kwargs)
        if rank == 0:
            report_metric(result, run_dir=run_dir, snapshot_pkl=snapshot_pkl)
        results.append(result)
    return results

# ----------------------------------------------------------------------------
# Primary metrics.


def _full_dataset(opts: metric_utils.MetricOptions) -> None:
    opts.dataset_kwargs.update(max_size=None, xflip=False)


@register_metric(detectors=[frechet_inception_distance.DETECTOR_URL], features_only=True)
def fid50k_full(opts):
    _full_dataset(opts)
    fid = frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=50000)
    return dict(fid50k_full=fid)


@register_metric(detectors=[kernel_inception_distance.DETECTOR_URL], features_only=True)
def kid50k_full(opts):
    _full_dataset(opts)
    kid = kernel_inception_distance.compute_kid(opts, max_real=1000000, num_gen=50000, num_subsets=100,
                                                max_subset_size=1000)
    return dict(kid50k_full=kid)


@register_metric(detectors=[precision_recall.DETECTOR_URL], features_only=True)
def pr50k3_full(opts):
    _full_dataset(opts)
    precision, recall = precision_recall.compute_pr(opts, max_real=200000, num_gen=50000, nhood_size=3,
                                                    row_batch_size=10000, col_batch_size=10000)
    return dict(pr50k3_full_precision=precision, pr50k3_full_recall=recall)


@register_metric(detectors=[perceptual_path_length.DETECTOR_URL])
def ppl2_wend(opts):
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=50000, epsilon=1e-4, space='w', sampling='end',
                                             crop=False, batch_size=2)
    return dict(ppl2_wend=ppl)


@register_metric(detectors=[inception_score.DETECTOR_URL])
def is50k(opts):
    _full_dataset(opts)
    mean, std = inception_score.compute_is(opts, num_gen=50000, num_splits=10)
    return dict(is50k_mean=mean, is50k_std=std)

# ----------------------------------------------------------------------------
# Quick check (ours, not an official metric).


@register_metric(detectors=[frechet_inception_distance.DETECTOR_URL], features_only=True)
def fid2k(opts):
    """FID of 2,000 generated against the first 2,000 dataset images: minutes on a CPU, for smoke tests such as
    the quickstart. FID is biased upward at small sample counts, so this is not comparable with fid50k."""
    opts.dataset_kwargs.update(max_size=None)
    fid = frechet_inception_distance.compute_fid(opts, max_real=2000, num_gen=2000)
    return dict(fid2k=fid)

# ----------------------------------------------------------------------------
# Legacy metrics (StyleGAN / StyleGAN2 papers).


@register_metric(detectors=[frechet_inception_distance.DETECTOR_URL], features_only=True)
def fid50k(opts):
    opts.dataset_kwargs.update(max_size=None)
    fid = frechet_inception_distance.compute_fid(opts, max_real=50000, num_gen=50000)
    return dict(fid50k=fid)


@register_metric(detectors=[kernel_inception_distance.DETECTOR_URL], features_only=True)
def kid50k(opts):
    opts.dataset_kwargs.update(max_size=None)
    kid = kernel_inception_distance.compute_kid(opts, max_real=50000, num_gen=50000, num_subsets=100,
                                                max_subset_size=1000)
    return dict(kid50k=kid)


@register_metric(detectors=[precision_recall.DETECTOR_URL], features_only=True)
def pr50k3(opts):
    opts.dataset_kwargs.update(max_size=None)
    precision, recall = precision_recall.compute_pr(opts, max_real=50000, num_gen=50000, nhood_size=3,
                                                    row_batch_size=10000, col_batch_size=10000)
    return dict(pr50k3_precision=precision, pr50k3_recall=recall)


@register_metric(detectors=[perceptual_path_length.DETECTOR_URL])
def ppl_zfull(opts):
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=50000, epsilon=1e-4, space='z', sampling='full',
                                             crop=True, batch_size=2)
    return dict(ppl_zfull=ppl)


@register_metric(detectors=[perceptual_path_length.DETECTOR_URL])
def ppl_wfull(opts):
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=50000, epsilon=1e-4, space='w', sampling='full',
                                             crop=True, batch_size=2)
    return dict(ppl_wfull=ppl)


@register_metric(detectors=[perceptual_path_length.DETECTOR_URL])
def ppl_zend(opts):
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=50000, epsilon=1e-4, space='z', sampling='end',
                                             crop=True, batch_size=2)
    return dict(ppl_zend=ppl)


@register_metric(detectors=[perceptual_path_length.DETECTOR_URL])
def ppl_wend(opts):
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=50000, epsilon=1e-4, space='w', sampling='end',
                                             crop=True, batch_size=2)
    return dict(ppl_wend=ppl)
