"""Training data: a folder or a .zip archive of images, with optional labels.

`dataset_tool.py` writes such datasets (PNG files plus a `dataset.json`), but any folder of images works:

    ffhq256/                          or   ffhq256.zip, holding the same tree
        00000/img00000000.png
        00000/img00000001.png
        ...
        dataset.json                  {"labels": [["00000/img00000000.png", 3], ...]}  or  {"labels": null}

A label is either a class index (an int; the dataset returns it as a one-hot float32 vector) or a list of
numbers (returned as a float32 vector). Labels are checked when the dataset is opened: class indices are
non-negative and make a one-hot vector of a sane size (see MAX_CLASSES), vectors have one length and finite
float32 values; the first bad entry is named. All images of a dataset must share one size and channel count;
the size must be square and a power of two. macOS bookkeeping files (`__MACOSX/`, `._*`) are not images and
are left out.

The dataset yields `(image, label)` with the image as a CHW uint8 numpy array. A dataset pickles without
its open zip handle, so it can be handed to DataLoader workers: each process opens the archive itself.
"""

import io
import json
import math
import os
import sys
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import PIL.Image
import torch

import dnnlib
from training.networks import is_power_of_two

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')  # Compared case-insensitively.
LABELS_FILE = 'dataset.json'                                      # At the root of the folder or archive.

# ----------------------------------------------------------------------------
# Helpers shared with dataset_tool.py.


def is_image_file(fname: str) -> bool:
    """Whether a file name has one of the image extensions the dataset reads."""
    return os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS


def is_macos_metadata(fname: str) -> bool:
    """Whether an archive member or file is macOS bookkeeping rather than data: the `__MACOSX/` folder that
    Finder's "Compress" adds to a zip, and the `._<name>` AppleDouble files that copies to non-Mac disks leave
    beside each file. They carry the image extension of the file they describe but hold no image."""
    parts = fname.replace('\\', '/').split('/')
    return '__MACOSX' in parts[:-1] or parts[-1].startswith('._')


def image_to_array(image: PIL.Image.Image, force_rgb: bool = False) -> np.ndarray:
    """A Pillow image as an HWC uint8 array with 1 (gray) or 3 (RGB) channels.

    The conversion is fixed, so that the dataset and dataset_tool.py agree on every file:
    - 'L' and 'RGB' are kept as they are.
    - '1' (bilevel) and 'LA' become 'L'; alpha is dropped, not composited.
    - 16-bit gray ('I;16', 'I;16B', ..., and 'I' as Pillow opens 16-bit PNGs) keeps the top 8 bits,
      i.e. value // 256. 'F' (float gray) is rounded and clipped to [0, 255].
    - Every other mode ('RGBA', 'P' palette, 'CMYK', 'YCbCr', 'LAB', 'HSV', ...) becomes 'RGB' through
      Pillow's own conversion; alpha is dropped, not composited.
    With `force_rgb`, gray results are repeated into three channels.
    """
    mode = image.mode
    if mode in ('L', 'RGB'):
        array = np.asarray(image)
    elif mode in ('1', 'LA', 'La'):
        array = np.asarray(image.convert('L'))
    elif mode == 'I' or mode.startswith('I;16'):
        array = (np.clip(np.asarray(image).astype(np.int64), 0, 65535) // 256).astype(np.uint8)
    elif mode == 'F':
        array = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
    elif mode == 'P':
        # Through RGBA, so that Pillow does not warn about palettes with a transparent entry.
        array = np.asarray(image.convert('RGBA').convert('RGB'))
    else:
        array = np.asarray(image.convert('RGB'))
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if force_rgb and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array, dtype=np.uint8)


def decode_image(data: bytes, fname: str, where: str) -> PIL.Image.Image:
    """Decode image file contents completely; a broken file raises ValueError naming it."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f'Cannot read image "{fname}" in {where}: not an image Pillow recognises '
                         f'(corrupt file or unsupported format)') from None
    except (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError) as e:
        # Pillow reports truncated or damaged data through several exception types.
        raise ValueError(f'Cannot read image "{fname}" in {where}: {e}') from None
    return image


def read_zip_member(archive: zipfile.ZipFile, fname: str, where: str) -> bytes:
    """Contents of one archive member; a damaged member raises ValueError naming it."""
    try:
        return archive.read(fname)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f'Cannot read "{fname}" from {where}: {e}') from None


def parse_labels_json(data: bytes, where: str) -> Optional[Dict[str, Any]]:
    """Parse `dataset.json` contents into {relative path: label}, or None for `{"labels": null}`.

    Only the structure is checked here (a list of [path, label] pairs); label types are checked by the
    caller, who knows which images it needs.
    """
    try:
        content = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{where} is not valid JSON: {e}') from None
    expected = 'expected {"labels": [["path/to/image.png", label], ...]} or {"labels": null}'
    if not isinstance(content, dict) or 'labels' not in content:
        raise ValueError(f'{where} has no "labels" entry; {expected}')
    labels = content['labels']
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise ValueError(f'{where}: "labels" is a {type(labels).__name__}; {expected}')
    result = {}
    for entry in labels:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f'{where}: malformed label entry {json.dumps(entry)[:80]}; {expected}')
        result[entry[0].replace('\\', '/')] = entry[1]
    return result


# The largest one-hot label a dataset may imply. A class index becomes a one-hot vector of max index + 1 floats
# per image and the width of G's and D's label embedding, so an index that is an ID rather than a position
# (2**70, 10**12) would first fail deep inside numpy or the allocator. ImageNet-21k has 21,841 classes; 100,000
# leaves room for any real class list while keeping the embedding (100,000 x 512 floats, 200 MB) allocatable.
MAX_CLASSES = 100_000
# "Dense enough": past MIN_SPARSE_CLASSES classes, the one-hot width may be at most this many times the number of
# images. Most columns would then never be set (at least 9 of 10 classes empty), which means the labels are IDs,
# not indices; below it (CIFAR-100, ImageNet-1k's 1,000 indices) a small subset of a labelled set is still fine.
MAX_CLASSES_PER_IMAGE = 10
MIN_SPARSE_CLASSES = 1000


def _check_class_indices(labels: Sequence[int], fnames: Sequence[str], where: str) -> None:
    """Class indices must be non-negative and make a one-hot label of a sane size (MAX_CLASSES, and dense
    enough: MAX_CLASSES_PER_IMAGE); ValueError naming the first bad entry."""
    negative = [fname for fname, label in zip(fnames, labels, strict=True) if label < 0]
    if negative:
        raise ValueError(f'{where}: the label of "{negative[0]}" is negative; class labels start at 0')
    limit = min(MAX_CLASSES, max(MIN_SPARSE_CLASSES, MAX_CLASSES_PER_IMAGE * len(labels)))
    too_big = next((idx for idx, label in enumerate(labels) if label >= limit), None)
    if too_big is not None:
        raise ValueError(f'{where}: the label of "{fnames[too_big]}" is class {labels[too_big]}, which would make '
                         f'one-hot labels of {labels[too_big] + 1} values for {len(labels)} image(s); class labels '
                         f'are indices 0, 1, 2, ... below {limit} here (at most {MAX_CLASSES:,}, and at most '
                         f'{MAX_CLASSES_PER_IMAGE} per image beyond {MIN_SPARSE_CLASSES}): renumber the classes')


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_finite_float32(value: float) -> bool:
    try:
        return math.isfinite(value) and abs(float(value)) <= _FLOAT32_MAX
    except OverflowError:  # An integer too large for any float (JSON allows 10**400).
        return False


def _check_vectors(labels: Sequence[Any], fnames: Sequence[str], where: str) -> None:
    """Label vectors must be finite as float32 (JSON's NaN and Infinity, or values beyond float32's range,
    would make the conditioning input, and then the losses, non-finite); ValueError naming the first bad one."""
    bad = next((idx for idx, label in enumerate(labels) if not all(_is_finite_float32(x) for x in label)), None)
    if bad is not None:
        raise ValueError(f'{where}: the label of "{fnames[bad]}" is {json.dumps(labels[bad])[:60]}, which holds a '
                         f'value that is not a finite float32 number (NaN, Infinity or beyond +-3.4e38)')


def labels_to_array(labels: Sequence[Any], fnames: Sequence[str], where: str) -> np.ndarray:
    """Labels of the images `fnames`, in order: int64 [N] for class indices, float32 [N, D] for vectors.
    Every value is checked (finite, in range, consistent); a bad one raises ValueError naming the file `where`
    and the first bad entry."""
    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_vector(value):
        return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)

    if all(is_int(label) for label in labels):
        _check_class_indices(labels, fnames, where)
        return np.array(labels, dtype=np.int64).reshape(len(labels))
    if all(is_vector(label) for label in labels):
        lengths = sorted({len(label) for label in labels})
        if len(lengths) > 1:
            odd = next(fname for fname, label in zip(fnames, labels, strict=True) if len(label) != len(labels[0]))
            raise ValueError(f'{where}: label vectors differ in length ({", ".join(map(str, lengths))}); '
                             f'"{fnames[0]}" has {len(labels[0])} values and "{odd}" has a different number')
        _check_vectors(labels, fnames, where)
        return np.array(labels, dtype=np.float32).reshape(len(labels), lengths[0])
    kinds = [('class index' if is_int(label) else 'vector' if is_vector(label) else None) for label in labels]
    if None in kinds:
        bad = kinds.index(None)
        raise ValueError(f'{where}: the label of "{fnames[bad]}" is {json.dumps(labels[bad])[:60]}; a label must be a '
                         f'non-negative integer (class index) or a list of numbers')
    first_int = kinds.index('class index')
    first_vec = kinds.index('vector')
    raise ValueError(f'{where} mixes label types: "{fnames[first_int]}" has a class index and '
                     f'"{fnames[first_vec]}" a vector; use one kind for every image')


# ----------------------------------------------------------------------------


class Dataset(torch.utils.data.Dataset):
    """Base class: a fixed list of equally sized uint8 images with optional labels.

    Subclasses implement `_load_raw_image(raw_idx)` (CHW uint8 array) and `_load_raw_labels()` (int64 [N]
    class indices, float32 [N, D] vectors, or None). Item `idx` maps to raw image `_raw_idx[idx]`, mirrored
    along the width when `_xflip[idx]` is set.
    """

    def __init__(self,
        name:           str,                    # Name of the dataset (e.g. the file name without extension).
        raw_shape:      Sequence[int],          # Shape of the raw image data, [N, C, H, W].
        max_size:       Optional[int] = None,   # Use a random subset of at most this many images; None = all.
        use_labels:     bool = False,           # Return the labels; False returns zero-length labels.
        xflip:          bool = False,           # Append a mirrored copy of every image (doubles the length).
        random_seed:    int = 0,                # Seed of the random subset chosen by max_size.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._raw_labels = None
        self._label_shape = None

        # A random subset, kept in sorted order, as the official code does: the same (max_size, seed)
        # picks the same images in both code bases.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(labels, np.ndarray)
            assert labels.shape[0] == self._raw_shape[0]
            assert labels.dtype in (np.float32, np.int64)
            if labels.dtype == np.int64:
                assert labels.ndim == 1 and np.all(labels >= 0)
            self._raw_labels = labels
        return self._raw_labels

    def close(self) -> None:
        """Release open files; the dataset reopens them when needed."""

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __del__(self):
        try:
            self.close()
        except Exception:  # The interpreter may be shutting down; nothing useful to do.
            pass

    def __len__(self) -> int:
        return self._raw_idx.size

    def __getitem__(self, idx: int):
        image = self._load_raw_image(int(self._raw_idx[idx]))
        assert isinstance(image, np.ndarray)
        assert list(image.shape) == self.image_shape
        assert image.dtype == np.uint8
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """Label of item `idx` as float32: one-hot for class indices, zero-length without labels."""
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.copy()

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        """Where item `idx` comes from: raw index, whether it is mirrored, and its label as stored."""
        return dnnlib.EasyDict(
            raw_idx=int(self._raw_idx[idx]),
            xflip=bool(self._xflip[idx]),
            raw_label=self._get_raw_labels()[self._raw_idx[idx]].copy(),
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> List[int]:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        assert len(self.image_shape) == 3  # CHW
        assert self.image_shape[1] == self.image_shape[2]
        return self.image_shape[1]

    @property
    def label_shape(self) -> List[int]:
        if self._label_shape is None:
            labels = self._get_raw_labels()
            if labels.dtype == np.int64:
                self._label_shape = [int(np.max(labels)) + 1] if labels.size else [0]
            else:
                self._label_shape = list(labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64


# ----------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images from a folder tree or a .zip archive (see the module docstring), with labels from dataset.json.

    Files with the extensions in IMAGE_EXTENSIONS are used, in sorted order of their relative paths (with
    '/' separators). Images are converted as `image_to_array` describes, to 1 (gray) or 3 (RGB) channels.
    Only the first image is read at construction; every other image is checked when it is loaded, and one
    whose size or channel count differs from the first raises ValueError naming it.
    """

    def __init__(self,
        path:           str,                    # Folder or .zip archive.
        resolution:     Optional[int] = None,   # Expected resolution; None accepts what the data has.
        **super_kwargs,                         # max_size, use_labels, xflip, random_seed (see Dataset).
    ):
        self._path = path
        self._zipfile = None
        self._zipfile_pid = None
        if os.path.isdir(path):
            self._type = 'dir'
            self._all_fnames = sorted(
                os.path.relpath(os.path.join(root, fname), start=path).replace(os.sep, '/')
                for root, _dirs, files in os.walk(path) for fname in files)
        elif os.path.isfile(path) and os.path.splitext(path)[1].lower() == '.zip':
            self._type = 'zip'
            try:
                self._all_fnames = sorted(info.filename for info in self._get_zipfile().infolist()
                                          if not info.is_dir())
            except zipfile.BadZipFile as e:
                raise ValueError(f'Cannot read dataset archive "{path}": {e}') from None
        elif os.path.exists(path):
            raise ValueError(f'Dataset "{path}" is neither a folder nor a .zip archive')
        else:
            raise FileNotFoundError(f'Dataset not found: "{path}" does not exist')

        self._image_fnames = [fname for fname in self._all_fnames
                              if is_image_file(fname) and not is_macos_metadata(fname)]
        if not self._image_fnames:
            raise ValueError(f'No images found in "{path}" (looked for {", ".join(IMAGE_EXTENSIONS)} files)')

        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        first = self._read_image(0)
        raw_shape = [len(self._image_fnames)] + list(first.shape)
        _c, h, w = first.shape
        if h != w or not is_power_of_two(h):
            raise ValueError(f'Images in "{path}" are {w}x{h} (first image "{self._image_fnames[0]}"); training '
                             f'needs square images whose size is a power of two (dataset_tool.py can crop '
                             f'and resize them)')
        if resolution is not None and resolution != h:
            raise ValueError(f'Images in "{path}" are {w}x{h}, but resolution={resolution} was asked for')
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)
        if self._use_labels:
            self._get_raw_labels()  # Report a broken dataset.json now rather than in a worker.

    def _get_zipfile(self) -> zipfile.ZipFile:
        assert self._type == 'zip'
        # A forked DataLoader worker inherits the parent's handle, whose file position it would share:
        # every process opens its own.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_file(self, fname: str) -> bytes:
        if self._type == 'dir':
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        return read_zip_member(self._get_zipfile(), fname, f'"{self._path}"')

    def _has_file(self, fname: str) -> bool:
        return fname in self._all_fnames

    def _read_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        image = decode_image(self._read_file(fname), fname, f'"{self._path}"')
        return image_to_array(image).transpose(2, 0, 1)  # HWC => CHW

    def close(self) -> None:
        if self._zipfile is not None and self._zipfile_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None
        self._zipfile_pid = None

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        image = self._read_image(raw_idx)
        if list(image.shape) != self.image_shape:
            found, expected = image.shape, self.image_shape
            raise ValueError(f'Image "{self._image_fnames[raw_idx]}" in "{self._path}" is {found[2]}x{found[1]} '
                             f'with {found[0]} channel(s), but "{self._image_fnames[0]}" is {expected[2]}x'
                             f'{expected[1]} with {expected[0]}; all images of a dataset must match '
                             f'(dataset_tool.py can resize them)')
        return image

    def _load_raw_labels(self) -> Optional[np.ndarray]:
        if not self._has_file(LABELS_FILE):
            return None
        where = f'"{LABELS_FILE}" in "{self._path}"'
        labels = parse_labels_json(self._read_file(LABELS_FILE), where)
        if labels is None:
            return None
        missing = [fname for fname in self._image_fnames if fname not in labels]
        if missing:
            raise ValueError(f'{where} has no label for "{missing[0]}" ({len(missing)} image(s) without one)')
        return labels_to_array([labels[fname] for fname in self._image_fnames], self._image_fnames, where)

# ----------------------------------------------------------------------------
# DataLoader options: the one place that decides them, for the training options (train.py), the training
# loop and the metrics.


def data_loader_kwargs(workers: int, base: Optional[Dict[str, Any]] = None) -> dnnlib.EasyDict:
    """The DataLoader options of a run, as they are recorded in training_options.json and the training state:
    `base` (default: pinned memory) with `workers` background processes, each loading 2 batches ahead.

    The recorded options do not depend on the device (a run may resume elsewhere); `loader_kwargs_on()` adapts
    them where the loader is made.
    """
    assert workers >= 0, workers  # The launcher turns a negative --workers into a user error first.
    kwargs = dnnlib.EasyDict(base or dict(pin_memory=True))
    kwargs.num_workers = workers
    kwargs.pop('prefetch_factor', None)
    if workers > 0:
        kwargs.prefetch_factor = 2  # DataLoader rejects prefetch_factor when there are no worker processes.
    return kwargs


def loader_kwargs_on(kwargs: Dict[str, Any], device: Any) -> Dict[str, Any]:
    """What torch.utils.data.DataLoader gets on `device` for the options `kwargs`: pinned memory only when the
    batches go to a CUDA device (pinning speeds up host-to-GPU copies only, and warns without CUDA), and no
    prefetch_factor without workers (options written by hand or by older versions may hold one).

    Workers are forked on Linux, also in ranks that torch.multiprocessing spawned (whose default would spawn
    them as well): they start at once, their queues' semaphores are unlinked as soon as they exist (so a rank
    killed with SIGKILL leaves nothing for the resource tracker to report as leaked), and a fork made while a
    run trains starts with the stop signals blocked (training/preemption.py), which a scheduler sends to every
    process of the job: the training loop's and the metrics' workers alike outlive them."""
    kwargs = dict(kwargs)
    kwargs['pin_memory'] = bool(kwargs.get('pin_memory', False)) and torch.device(device).type == 'cuda'
    if kwargs.get('num_workers', 0) == 0:
        kwargs.pop('prefetch_factor', None)
    elif sys.platform.startswith('linux'):
        kwargs.setdefault('multiprocessing_context', 'fork')
    return kwargs
