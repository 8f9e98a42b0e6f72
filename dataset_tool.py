"""Convert a collection of images into a training dataset (a folder or a .zip archive of PNG files).

Examples:

    # FFHQ at 256x256 from the 1024x1024 PNGs. FID depends on the resize filter: the published ffhq256 FIDs
    # were measured on a box-filtered dataset, so use box to compare with them (lanczos, the default, otherwise).
    python dataset_tool.py --source=~/downloads/ffhq/images1024x1024 --dest=~/datasets/ffhq256.zip \\
        --width=256 --height=256 --resize-filter=box

    # A folder of photos, center-cropped and resized to 256x256, into an archive:
    python dataset_tool.py --source=~/photos --dest=~/datasets/photos256.zip --transform=center-crop \\
        --width=256 --height=256

    # CIFAR-10 (with its class labels) and MNIST (28x28 padded to 32x32, with labels):
    python dataset_tool.py --source=~/downloads/cifar-10-python.tar.gz --dest=~/datasets/cifar10.zip
    python dataset_tool.py --source=~/downloads/train-images-idx3-ubyte.gz --dest=~/datasets/mnist.zip

    # LSUN (needs `pip install lmdb`), wide crops on a square canvas:
    python dataset_tool.py --source=~/downloads/lsun/car_lmdb --dest=~/datasets/lsuncar512x384.zip \\
        --transform=center-crop-wide --width=512 --height=384 --max-images=50000

Sources:
- a folder or a .zip archive of images (.png .jpg .jpeg .bmp .webp, any depth, in sorted order of their
  relative paths), with labels from its own `dataset.json` if it has one; the `__MACOSX/` folder and `._*`
  AppleDouble files that macOS adds are skipped (with one note);
- an LSUN lmdb folder (one with a `data.mdb`, or named `*_lmdb`);
- `cifar-10-python.tar.gz` (the five training batches, with class labels);
- an MNIST-format `*-images-idx3-ubyte.gz` (MNIST, Fashion-MNIST), with labels from the
  `*-labels-idx1-ubyte.gz` beside it when there is one; images are padded with zeros to the next power of two
  (28x28 becomes 32x32 with the content centred).

Output: `00000/img00000000.png`, `00000/img00000001.png`, ... (1000 images per folder) and `dataset.json`
holding `{"labels": [["00000/img00000000.png", label], ...]}` or `{"labels": null}`, the layout that
training.dataset.ImageFolderDataset reads.

Images:
- Modes are converted as training.dataset.image_to_array describes: RGBA and palette images become RGB (alpha
  dropped), 16-bit gray keeps its top 8 bits. Gray images stay single-channel unless the source also has color
  images; then every image is written as RGB.
- Without --transform, images are resized to --width x --height when given (a missing one keeps the source
  size). `center-crop` takes the largest centred square and resizes it to width x height. `center-crop-wide`
  takes the largest centred crop of aspect width:height, resizes it to width x height and pads it with black
  above and below to a width x width square; an image too small for that crop is skipped, as in the official tool.
- Every output image must have the same size and channel count, and the size must be square and a power of two.

Errors stop the conversion with a message naming the problem (and the file, for a bad image); nothing is left
at --dest. The output is written under a temporary name beside --dest and renamed when complete, so a crash
cannot leave a half-written dataset where a finished one is expected. A --dest that exists and is not an
empty folder is refused, and so is a name of another archive type (.tar, .tar.gz, .7z, ...): the outputs are a
.zip archive or a folder.
"""

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import textwrap
import zipfile
from typing import Callable, Iterator, List, Optional, Tuple

import click
import numpy as np
import PIL.Image

import dnnlib
from training.dataset import (
    LABELS_FILE,
    decode_image,
    image_to_array,
    is_image_file,
    is_macos_metadata,
    parse_labels_json,
    read_zip_member,
)
from training.networks import is_power_of_two

IMAGES_PER_FOLDER = 1000    # Output images go to 00000/, 00001/, ... with this many files each.
PROGRESS_EVERY = 1000       # Log a progress line after this many images.
RESIZE_FILTERS = {'box': PIL.Image.Resampling.BOX, 'lanczos': PIL.Image.Resampling.LANCZOS}
TRANSFORMS = ('center-crop', 'center-crop-wide')
# Largest --width / --height: 8x the 1024 of the largest official networks. Beyond it one RGB image alone takes
# more than 200 MB, and a typo such as --width=2**30 would end in an allocator error instead of a message.
MAX_OUTPUT_SIZE = 8192

Item = dnnlib.EasyDict          # One source image: name (for messages), image (PIL), label (JSON value or None).
Source = Tuple[int, Iterator]   # (number of images that will be read, iterator of Items).

# ----------------------------------------------------------------------------
# Sources. Each `open_*` returns (count, iterator); images are decoded as the iterator reaches them.


def _image_items(fnames: List[str], read: Callable[[str], bytes], labels: Optional[dict], where: str) -> Iterator:
    for fname in fnames:
        label = None if labels is None else labels[fname]
        yield Item(name=fname, image=decode_image(read(fname), fname, where), label=label)


def _select_labels(labels: Optional[dict], fnames: List[str], where: str) -> Optional[dict]:
    if labels is None:
        return None
    missing = [fname for fname in fnames if fname not in labels]
    if missing:
        raise ValueError(f'{where} has no label for "{missing[0]}" ({len(missing)} image(s) without one)')
    return labels


def _without_macos_metadata(fnames: List[str], where: str, log: Optional[Callable[[str], None]]) -> List[str]:
    """The image names that are not macOS bookkeeping (training.dataset.is_macos_metadata), with one note
    when some were left out: a zip made by Finder is a normal source, not a broken one."""
    kept = [fname for fname in fnames if not is_macos_metadata(fname)]
    if len(kept) != len(fnames) and log is not None:
        log(f'note: skipped {len(fnames) - len(kept)} macOS metadata file(s) in {where} (__MACOSX/ and ._* '
            f'AppleDouble files, which hold no image)')
    return kept


def open_image_folder(source_dir: str, max_images: Optional[int] = None,
                      log: Optional[Callable[[str], None]] = None) -> Source:
    """Images of a folder tree in sorted order of their relative paths, labelled by its dataset.json."""
    fnames = sorted(
        os.path.relpath(os.path.join(root, fname), start=source_dir).replace(os.sep, '/')
        for root, _dirs, files in os.walk(source_dir) for fname in files if is_image_file(fname))
    fnames = _without_macos_metadata(fnames, f'"{source_dir}"', log)[:max_images]
    labels = None
    labels_path = os.path.join(source_dir, LABELS_FILE)
    if os.path.isfile(labels_path):
        with open(labels_path, 'rb') as f:
            where = f'"{labels_path}"'
            labels = _select_labels(parse_labels_json(f.read(), where), fnames, where)

    def read(fname):
        with open(os.path.join(source_dir, fname), 'rb') as f:
            return f.read()

    return len(fnames), _image_items(fnames, read, labels, f'"{source_dir}"')


def open_image_zip(source: str, max_images: Optional[int] = None,
                   log: Optional[Callable[[str], None]] = None) -> Source:
    """Images of a .zip archive in sorted order of their paths, labelled by its dataset.json."""
    try:
        with zipfile.ZipFile(source) as z:
            names = [info.filename for info in z.infolist() if not info.is_dir()]
            fnames = sorted(name for name in names if is_image_file(name))
            fnames = _without_macos_metadata(fnames, f'"{source}"', log)[:max_images]
            where = f'"{LABELS_FILE}" in "{source}"'
            labels = parse_labels_json(read_zip_member(z, LABELS_FILE, f'"{source}"'), where) \
                if LABELS_FILE in names else None
            labels = _select_labels(labels, fnames, where)
    except zipfile.BadZipFile as e:
        raise ValueError(f'Cannot read archive "{source}": {e}') from None

    def items():
        with zipfile.ZipFile(source) as z:
            yield from _image_items(fnames, lambda fname: read_zip_member(z, fname, f'"{source}"'), labels,
                                    f'"{source}"')

    return len(fnames), items()


def open_lmdb(lmdb_dir: str, max_images: Optional[int] = None) -> Source:
    """Images of an LSUN lmdb database, in key order, without labels. Needs the optional lmdb package."""
    try:
        import lmdb  # Optional package: only LSUN databases need it (requirements-extras.txt).
    except ImportError:
        raise ValueError(f'"{lmdb_dir}" is an lmdb database; reading it needs the lmdb package: '
                         f'pip install lmdb') from None
    try:
        env = lmdb.open(lmdb_dir, readonly=True, lock=False, readahead=False)
    except lmdb.Error as e:
        raise ValueError(f'Cannot open lmdb database "{lmdb_dir}": {e}') from None
    with env.begin(write=False) as txn:
        count = txn.stat()['entries']
    if max_images is not None:
        count = min(count, max_images)

    def items():
        try:
            with env.begin(write=False) as txn:
                for idx, (key, value) in enumerate(txn.cursor()):
                    if idx >= count:
                        break
                    name = f'key {key.decode(errors="replace")}'
                    yield Item(name=name, image=decode_image(value, name, f'"{lmdb_dir}"'), label=None)
        finally:
            env.close()

    return count, items()


def open_cifar10(tarball: str, max_images: Optional[int] = None) -> Source:
    """The 50,000 training images of `cifar-10-python.tar.gz` (RGB 32x32) with their class labels.

    The batches are Python pickles, as CIFAR-10 distributes them: only convert archives you trust.
    """
    images, labels = [], []
    try:
        with tarfile.open(tarball, 'r:gz') as tar:
            members = {os.path.basename(member.name): member for member in tar.getmembers() if member.isfile()}
            for batch in range(1, 6):
                member = members.get(f'data_batch_{batch}')
                if member is None:
                    raise ValueError(f'"{tarball}" has no data_batch_{batch}; expected the CIFAR-10 python '
                                     f'archive (cifar-10-batches-py/data_batch_1 ... data_batch_5)')
                data = pickle.load(tar.extractfile(member), encoding='bytes')
                try:
                    images.append(np.asarray(data[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.append(np.asarray(data[b'labels'], dtype=np.int64).reshape(-1))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f'data_batch_{batch} in "{tarball}" is not a CIFAR-10 batch: {e}') from None
                if len(images[-1]) != len(labels[-1]):
                    raise ValueError(f'data_batch_{batch} in "{tarball}" has {len(images[-1])} images but '
                                     f'{len(labels[-1])} labels')
    except (tarfile.TarError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f'Cannot read CIFAR-10 archive "{tarball}": {e}') from None
    images = np.concatenate(images).transpose(0, 2, 3, 1)[:max_images]  # NCHW => NHWC
    labels = np.concatenate(labels)[:max_images]
    name = os.path.basename(tarball)
    items = (Item(name=f'{name} image {idx}', image=PIL.Image.fromarray(image, 'RGB'), label=int(label))
             for idx, (image, label) in enumerate(zip(images, labels, strict=True)))
    return len(images), items


def _read_idx(path: str, magic: int, header_fields: int) -> Tuple[List[int], bytes]:
    """Header counts and payload of a gzipped idx file (big-endian int32 magic and counts, then uint8 data)."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f'Cannot read "{path}": {e}') from None
    header_size = 4 * (1 + header_fields)
    if len(data) < header_size or struct.unpack('>I', data[:4])[0] != magic:
        raise ValueError(f'"{path}" is not an idx file with magic number {magic}')
    counts = list(struct.unpack(f'>{header_fields}I', data[4:header_size]))
    payload = data[header_size:]
    if len(payload) != int(np.prod(counts)):
        raise ValueError(f'"{path}" holds {len(payload)} bytes of data; its header {counts} asks for '
                         f'{int(np.prod(counts))}')
    return counts, payload


def open_mnist(images_gz: str, max_images: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> Source:
    """Gray images of an MNIST-format `*-images-idx3-ubyte.gz`, padded with zeros to a power-of-two square.

    Labels come from the `*-labels-idx1-ubyte.gz` beside it; without one the images are unlabelled.
    """
    (count, rows, cols), payload = _read_idx(images_gz, magic=2051, header_fields=3)
    images = np.frombuffer(payload, dtype=np.uint8).reshape(count, rows, cols)[:max_images]
    size = 1 << max(int(np.ceil(np.log2(max(rows, cols, 1)))), 0)
    top, left = (size - rows) // 2, (size - cols) // 2
    images = np.pad(images, [(0, 0), (top, size - rows - top), (left, size - cols - left)])

    labels = [None] * len(images)
    labels_gz = os.path.join(os.path.dirname(images_gz),
                             os.path.basename(images_gz).replace('images-idx3', 'labels-idx1'))
    if labels_gz != images_gz and os.path.isfile(labels_gz):
        (label_count,), label_payload = _read_idx(labels_gz, magic=2049, header_fields=1)
        if label_count != count:
            raise ValueError(f'"{labels_gz}" has {label_count} labels for the {count} images of "{images_gz}"')
        labels = [int(x) for x in np.frombuffer(label_payload, dtype=np.uint8)[:max_images]]
    elif log is not None:
        log(f'No labels file "{labels_gz}": writing the images without labels')
    name = os.path.basename(images_gz)
    items = (Item(name=f'{name} image {idx}', image=PIL.Image.fromarray(image, 'L'), label=label)
             for idx, (image, label) in enumerate(zip(images, labels, strict=True)))
    return len(images), items


def open_dataset(source: str, max_images: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> Source:
    """Pick the reader for `source` (see the module docstring) and open it."""
    source = os.path.expanduser(source)
    basename = os.path.basename(os.path.normpath(source))
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, 'data.mdb')) or basename.endswith('_lmdb'):
            return open_lmdb(source, max_images)
        return open_image_folder(source, max_images, log=log)
    if os.path.isfile(source):
        if basename.lower() == 'cifar-10-python.tar.gz':
            return open_cifar10(source, max_images)
        if basename.lower().endswith('-idx3-ubyte.gz'):
            return open_mnist(source, max_images, log=log)
        if basename.lower().endswith('.zip'):
            return open_image_zip(source, max_images, log=log)
        raise ValueError(f'Unknown kind of source "{source}"; expected a folder or .zip of images, an lmdb '
                         f'folder, cifar-10-python.tar.gz or an MNIST-format *-images-idx3-ubyte.gz')
    raise FileNotFoundError(f'Source not found: "{source}" does not exist')


# ----------------------------------------------------------------------------
# Transforms: HWC uint8 array in, HWC uint8 array out (or None to skip the image).


def check_output_size(transform: Optional[str], width: Optional[int], height: Optional[int]) -> None:
    """Reject option combinations that cannot give square power-of-two images (ValueError)."""
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f'Unknown transform "{transform}"; choose one of: {", ".join(TRANSFORMS)}')
    for flag, value in (('--width', width), ('--height', height)):
        if value is not None and not 1 <= value <= MAX_OUTPUT_SIZE:
            raise ValueError(f'{flag} must be between 1 and {MAX_OUTPUT_SIZE}, got {value}')
    if transform is not None and (width is None or height is None):
        raise ValueError(f'--transform={transform} needs both --width and --height')
    if transform == 'center-crop-wide':
        if height > width:
            raise ValueError(f'--transform=center-crop-wide pads the crop to a {width}x{width} square, so '
                             f'--height ({height}) must not exceed --width ({width})')
        if not is_power_of_two(width):
            raise ValueError(f'--width must be a power of two (the output is {width}x{width}), got {width}')
        return
    if width is not None and height is not None and width != height:
        raise ValueError(f'Output images must be square: --width={width} and --height={height} differ '
                         f'(center-crop-wide pads a wide crop to a square)')
    for flag, value in (('--width', width), ('--height', height)):
        if value is not None and not is_power_of_two(value):
            raise ValueError(f'{flag} must be a power of two (training needs it), got {value}')


def _to_pil(array: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def _resize(array: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    if array.shape[1] == width and array.shape[0] == height:
        return array
    return image_to_array(_to_pil(array).resize((width, height), resample=resample))


def make_transform(
    transform:      Optional[str],          # None, 'center-crop' or 'center-crop-wide'.
    width:          Optional[int],          # Output width; None keeps the source width (no transform only).
    height:         Optional[int],          # Output height; None keeps the source height (no transform only).
    resize_filter:  str = 'lanczos',        # 'box' or 'lanczos'.
) -> Callable[[np.ndarray], Optional[np.ndarray]]:
    """The image transform of the command-line options: HWC uint8 => HWC uint8, or None to skip the image."""
    check_output_size(transform, width, height)
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f'Unknown resize filter "{resize_filter}"; choose one of: {", ".join(RESIZE_FILTERS)}')
    resample = RESIZE_FILTERS[resize_filter]

    def scale(array):
        return _resize(array, width or array.shape[1], height or array.shape[0], resample)

    def center_crop(array):
        h, w = array.shape[:2]
        crop = min(h, w)
        top, left = (h - crop) // 2, (w - crop) // 2
        return _resize(array[top:top + crop, left:left + crop], width, height, resample)

    def center_crop_wide(array):
        h, w = array.shape[:2]
        # The largest centred crop of aspect width:height.
        if w * height > h * width:
            ch, cw = h, int(round(h * width / height))
        else:
            ch, cw = int(round(w * height / width)), w
        if cw < width or ch < height:
            return None  # Too small: the official tool skips rather than upscales.
        top, left = (h - ch) // 2, (w - cw) // 2
        array = _resize(array[top:top + ch, left:left + cw], width, height, resample)
        canvas = np.zeros([width, width, array.shape[2]], dtype=np.uint8)
        top = (width - height) // 2
        canvas[top:top + height] = array
        return canvas

    return {None: scale, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]


# ----------------------------------------------------------------------------
# Destination: a folder or a .zip archive, written under a temporary name and renamed when complete.


def _is_zip_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() == '.zip'


# Names that promise an archive this tool cannot write: such a --dest would silently become a folder of that name,
# which neither a user nor the archive tools expect.
OTHER_ARCHIVE_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz', '.tar.zst', '.gz', '.bz2',
                          '.xz', '.zst', '.7z', '.rar')


def check_dest(dest: str) -> None:
    """Refuse a destination that already holds something, or that names an archive other than .zip
    (ValueError)."""
    suffix = next((suffix for suffix in OTHER_ARCHIVE_SUFFIXES if dest.lower().endswith(suffix)), None)
    if suffix is not None:
        raise ValueError(f'--dest "{dest}" names a {suffix} archive, which dataset_tool.py cannot write; the '
                         f'supported outputs are a .zip archive and a folder')
    if _is_zip_path(dest):
        if os.path.exists(dest):
            raise ValueError(f'--dest "{dest}" already exists; refusing to overwrite it')
    elif os.path.isdir(dest):
        if os.listdir(dest):
            raise ValueError(f'--dest "{dest}" is a folder that is not empty; refusing to write into it')
    elif os.path.exists(dest):
        raise ValueError(f'--dest "{dest}" exists and is not a folder; give a new folder or a .zip path')


def _default_permissions(is_dir: bool) -> int:
    # tempfile creates private files and folders; the finished dataset gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


class DestWriter:
    """Collects the output files under a temporary name beside `dest`; `commit` renames, `abort` deletes."""

    def __init__(self, dest: str):
        check_dest(dest)
        self.dest = dest
        parent = os.path.dirname(os.path.abspath(dest))
        os.makedirs(parent, exist_ok=True)
        prefix = f'.{os.path.basename(os.path.normpath(dest))}.'
        self.is_zip = _is_zip_path(dest)
        if self.is_zip:
            fd, self.temp = tempfile.mkstemp(prefix=prefix, suffix='.tmp', dir=parent)
            os.close(fd)
            self.zip = zipfile.ZipFile(self.temp, 'w', compression=zipfile.ZIP_STORED)
        else:
            self.temp = tempfile.mkdtemp(prefix=prefix, suffix='.tmp', dir=parent)

    def add_file(self, fname: str, data: bytes) -> None:
        if self.is_zip:
            self.zip.writestr(fname, data)
            return
        path = os.path.join(self.temp, *fname.split('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)

    def commit(self) -> None:
        if self.is_zip:
            self.zip.close()
            os.chmod(self.temp, _default_permissions(is_dir=False))
            check_dest(self.dest)  # Something may have appeared there meanwhile.
            os.replace(self.temp, self.dest)
            return
        os.chmod(self.temp, _default_permissions(is_dir=True))
        check_dest(self.dest)
        if os.path.isdir(self.dest):
            os.rmdir(self.dest)  # Empty, as check_dest made sure.
        os.rename(self.temp, self.dest)

    def abort(self) -> None:
        if self.is_zip:
            self.zip.close()
            if os.path.exists(self.temp):
                os.remove(self.temp)
        else:
            shutil.rmtree(self.temp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Conversion.


class _ColorAfterGray(Exception):
    """A color image turned up after gray ones were written: start over, writing everything as RGB."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format='PNG', compress_level=0)  # Fast; the official tool does the same.
    return buffer.getvalue()


def _describe(shape: Tuple[int, ...]) -> str:
    return f'{shape[1]}x{shape[0]} with {shape[2]} channel(s)'


def _write_images(writer: DestWriter, source: str, max_images: Optional[int], transform_fn: Callable,
                  force_rgb: bool, log: Callable[[str], None]) -> int:
    count, items = open_dataset(source, max_images, log=log)
    log(f'Converting {count} images from "{source}"')
    first_name, first_shape = None, None
    labels, skipped = [], 0
    for item in items:
        array = image_to_array(item.image, force_rgb=force_rgb)
        if first_shape is not None and first_shape[2] == 1 and array.shape[2] == 3:
            raise _ColorAfterGray(item.name)
        if first_shape is not None and first_shape[2] == 3 and array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)  # Gray among color images: written as RGB.
        out = transform_fn(array)
        if out is None:
            skipped += 1
            continue
        if first_shape is None:
            first_name, first_shape = item.name, out.shape
            h, w = out.shape[:2]
            if h != w or not is_power_of_two(h):
                raise ValueError(f'"{item.name}" gives a {w}x{h} image; training needs square images whose size '
                                 f'is a power of two: use --width and --height, and --transform to crop')
        elif out.shape != first_shape:
            raise ValueError(f'"{item.name}" gives an image {_describe(out.shape)}, but "{first_name}" gave '
                             f'{_describe(first_shape)}; all images must match: use --width and --height '
                             f'(and --transform) to resize them')
        idx = len(labels)
        fname = f'{idx // IMAGES_PER_FOLDER:05d}/img{idx:08d}.png'
        writer.add_file(fname, _encode_png(out))
        labels.append([fname, item.label])
        if len(labels) % PROGRESS_EVERY == 0:
            log(f'{len(labels) + skipped} / {count} images')
    if not labels:
        reason = f' ({skipped} skipped as smaller than the crop)' if skipped else ''
        raise ValueError(f'No images to write from "{source}"{reason}')
    if skipped:
        log(f'Skipped {skipped} image(s) smaller than the crop')
    has_labels = any(label is not None for _fname, label in labels)
    writer.add_file(LABELS_FILE, json.dumps({'labels': labels if has_labels else None}).encode())
    return len(labels)


def convert_dataset(
    source:         str,                    # Folder, .zip, lmdb folder, cifar-10-python.tar.gz or *-idx3-ubyte.gz.
    dest:           str,                    # Output folder (new or empty) or .zip path (new).
    max_images:     Optional[int] = None,   # Read at most this many source images.
    transform:      Optional[str] = None,   # None, 'center-crop' or 'center-crop-wide'.
    width:          Optional[int] = None,   # Output width in pixels.
    height:         Optional[int] = None,   # Output height in pixels.
    resize_filter:  str = 'lanczos',        # 'box' or 'lanczos'.
    log:            Optional[Callable[[str], None]] = None,  # Progress messages; None = quiet.
) -> int:
    """Convert `source` into a dataset at `dest`; returns the number of images written.

    Raises ValueError (or FileNotFoundError) with a message for every problem with the inputs; `dest` is then
    left as it was.
    """
    log = log or (lambda _message: None)
    if max_images is not None and max_images < 1:
        raise ValueError(f'--max-images must be positive, got {max_images}')
    source, dest = os.path.expanduser(source), os.path.expanduser(dest)
    transform_fn = make_transform(transform, width, height, resize_filter)
    check_dest(dest)
    force_rgb = False
    while True:
        writer = DestWriter(dest)
        try:
            written = _write_images(writer, source, max_images, transform_fn, force_rgb, log)
        except _ColorAfterGray as e:
            writer.abort()
            log(f'"{e.name}" is in color but earlier images are gray: starting over, writing every image as RGB')
            force_rgb = True
            continue
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        log(f'Wrote {written} images to "{dest}"')
        return written


# ----------------------------------------------------------------------------


def _log_to_stderr(message: str) -> None:
    click.echo(message, err=True)


def examples_epilog(doc: str) -> str:
    """The 'Examples:' section of `doc` (up to the next section) as a click epilog: every paragraph starts with
    click's '\\b' marker, so that --help prints the command lines as written instead of rewrapping them."""
    section = textwrap.dedent(doc.split('\nExamples:\n', 1)[1].split('\nSources:\n', 1)[0])
    paragraphs = [paragraph for paragraph in section.strip('\n').split('\n\n') if paragraph.strip()]
    return '\n\n'.join(['\b\nExamples:'] + ['\b\n' + textwrap.indent(paragraph, '  ') for paragraph in paragraphs])


@click.command(epilog=examples_epilog(__doc__))
@click.option('--source', help='Folder, .zip, lmdb folder, cifar-10-python.tar.gz or *-images-idx3-ubyte.gz',
              required=True, metavar='PATH')
@click.option('--dest', help='Output folder (new or empty) or .zip archive (new)', required=True, metavar='PATH')
@click.option('--max-images', type=click.IntRange(min=1), help='Convert at most this many images')
@click.option('--transform', type=click.Choice(TRANSFORMS), help='Crop before resizing')
@click.option('--width', type=click.IntRange(min=1), help='Output width')
@click.option('--height', type=click.IntRange(min=1), help='Output height')
@click.option('--resize-filter', type=click.Choice(list(RESIZE_FILTERS)), default='lanczos', show_default=True,
              help='Filter for resizing')
def main(
    source:         str,
    dest:           str,
    max_images:     Optional[int],
    transform:      Optional[str],
    width:          Optional[int],
    height:         Optional[int],
    resize_filter:  str,
) -> None:
    """Convert an image collection into a training dataset (a folder or .zip of PNGs plus dataset.json).

    See the top of dataset_tool.py for the sources, the layout written and how images are converted.
    """
    try:
        convert_dataset(source, dest, max_images=max_images, transform=transform, width=width, height=height,
                        resize_filter=resize_filter, log=_log_to_stderr)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
