"""The metrics of a training run, seen from the command line: the --metrics list, its names checked against
the registry of package `metrics`, their feature networks found before the run directory exists, and what they
will cost on a CPU.

The builder (runner/options.py) and train.py call these; `check_metrics_ready` is the hook that tests replace
(so that option trees can be built without the feature networks).
"""

import re
from typing import List, Optional, Sequence, Union

import dnnlib
from metrics import metric_main
from runner.errors import UserError

DEFAULT_METRICS = 'fid50k_full'     # The official default; --metrics=fid2k is the CPU's choice (cpu_metric_note).


def parse_metrics(value: Union[None, str, Sequence[str]]) -> List[str]:
    """'fid50k_full,kid50k_full' -> ['fid50k_full', 'kid50k_full']; 'none' -> []. A list passes through.
    Raises ValueError for 'none' among names."""
    if value is None:
        value = DEFAULT_METRICS
    names = value.split(',') if isinstance(value, str) else list(value)
    names = [name.strip() for name in names if name.strip()]
    if names == ['none']:
        return []
    if 'none' in names:
        raise ValueError('"none" cannot be combined with metric names')
    return names

def validate_metrics(metrics: List[str]) -> None:
    """Every name in `metrics` is one the registry of package `metrics` knows; otherwise a UserError naming them."""
    valid = metric_main.list_valid_metrics()
    for name in metrics:
        if name not in valid:
            raise UserError(f'--metrics: unknown metric {name!r}; valid choices: {", ".join(valid)} (or none)')


def check_metrics_ready(metrics: Sequence[str], detector_dir: Optional[str]) -> None:
    """Find (or fetch) the feature network of every metric now, so that an offline machine without the file
    fails before the run directory exists instead of after the first tick. Tests replace this hook."""
    if not metrics:
        return
    try:
        metric_main.check_metrics_ready(list(metrics), detector_dir=detector_dir)
    except OSError as e:  # DetectorNotFoundError, DownloadError
        raise UserError(f'--metrics: {e}') from None


# Images per second that a feature network (Inception, VGG16) gets through on the CPU: measured at about 9 on
# 2 cores (README, "Metrics"); more cores go faster, generating the images is not counted. An estimate only.
CPU_FEATURE_IMAGES_PER_SECOND = 9.0
_METRIC_COUNT = re.compile(r'[a-z]+?(\d+)k')  # 'fid50k_full' -> 50; the names of metric_main's docstring.


def metric_images(metric: str, dataset_size: int, xflip: bool) -> Optional[tuple]:
    """(generated, real) images that `metric` sends through its feature network, by the naming rule of the
    metric registry: `<what><num generated>k[<nhood>][_full]`, `_full` comparing with the whole dataset and
    the others with as many real images as generated (x-flips count when the dataset has them). The PPL
    metrics (no number in their names) run 50k pairs of images. None for a name that follows no rule."""
    if metric.startswith('ppl'):
        return 2 * 50000, 0
    match = _METRIC_COUNT.match(metric)
    if match is None:
        return None
    generated = int(match.group(1)) * 1000
    if metric.startswith('is'):
        return generated, 0
    available = dataset_size * (1 if metric.endswith('_full') or not xflip else 2)
    return generated, (available if metric.endswith('_full') else min(generated, available))


def cpu_metric_note(metrics: Sequence[str], dataset_size: int, xflip: bool) -> Optional[str]:
    """One line for the start of a CPU run with metrics: how long they will take at the first snapshot (real
    images included; their statistics are cached afterwards) and at each later one, and the cheaper choices.
    The official default (fid50k_full) costs hours per snapshot on a CPU, which a user would otherwise only
    find out by watching the run stand still after its first tick."""
    counts = {metric: metric_images(metric, dataset_size, xflip) for metric in metrics}
    known = {metric: count for metric, count in counts.items() if count is not None}
    if not known:
        return None
    generated = sum(gen for gen, _real in known.values())
    real = sum(real for _gen, real in known.values())
    first = dnnlib.util.format_time((generated + real) / CPU_FEATURE_IMAGES_PER_SECOND)
    later = dnnlib.util.format_time(generated / CPU_FEATURE_IMAGES_PER_SECOND)
    unknown = [metric for metric in metrics if metric not in known]
    line = (f'note: on the CPU, --metrics={",".join(metrics)} takes about {first} at the first snapshot and {later} '
            f'at each later one ({generated:,} generated and {real:,} real images, the real ones once, through the '
            f'feature network at about {CPU_FEATURE_IMAGES_PER_SECOND:g} images/s as measured on 2 CPU cores'
            + (f'; {", ".join(unknown)} not counted' if unknown else '') + ')')
    if set(metrics) != {'fid2k'}:
        fid2k = dnnlib.util.format_time(sum(metric_images('fid2k', dataset_size, xflip)) /
                                        CPU_FEATURE_IMAGES_PER_SECOND)
        line += f'; --metrics=fid2k takes about {fid2k} and --metrics=none skips them'
    return line
