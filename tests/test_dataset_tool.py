"""dataset_tool.py: every source kind, transforms, the output layout, labels, and refusing bad inputs cleanly."""

import gzip
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from test_dataset import chw, make_folder, random_image, save, write_labels, zip_folder

import dataset_tool
from training.dataset import ImageFolderDataset


def run(*args):
    return CliRunner().invoke(dataset_tool.main, [str(arg) for arg in args])


def zip_names(path):
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())


def read_zip_json(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read('dataset.json'))


def write_mnist(folder, images, labels=None, prefix='train'):
    """MNIST idx files: images (magic 2051, count, rows, cols), labels (magic 2049, count), big-endian."""
    os.makedirs(folder, exist_ok=True)
    images = np.asarray(images, dtype=np.uint8)
    path = os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz')
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>IIII', 2051, *images.shape) + images.tobytes())
    if labels is not None:
        with gzip.open(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
            f.write(struct.pack('>II', 2049, len(labels)) + np.uint8(labels).tobytes())
    return path


def write_cifar(path, per_batch=2):
    """A miniature cifar-10-python.tar.gz: five pickled batches of `per_batch` images (CHW rows of 3072 bytes)."""
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, size=[5 * per_batch, 3072], dtype=np.uint8)
    labels = [int(x) for x in rng.randint(0, 10, size=5 * per_batch)]
    with tarfile.open(path, 'w:gz') as tar:
        for batch in range(5):
            rows = slice(batch * per_batch, (batch + 1) * per_batch)
            blob = pickle.dumps({b'data': data[rows], b'labels': labels[rows], b'batch_label': b'x'})
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{batch + 1}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path), data.reshape(-1, 3, 32, 32), labels


def assert_nothing_left(parent, expected):
    """Only the `expected` entries remain in `parent`: no destination, no temporary file or folder."""
    assert sorted(os.listdir(parent)) == sorted(expected)


# ----------------------------------------------------------------------------
# Round trips.


def test_folder_to_zip_round_trip_with_labels(tmp_path):
    root, images = make_folder(tmp_path / 'src', count=3, labels=[2, 0, 1])
    result = run('--source', root, '--dest', tmp_path / 'out.zip')
    assert result.exit_code == 0, result.output
    assert 'Wrote 3 images' in result.output
    assert zip_names(tmp_path / 'out.zip') == ['00000/img00000000.png', '00000/img00000001.png',
                                               '00000/img00000002.png', 'dataset.json']
    assert read_zip_json(tmp_path / 'out.zip') == {'labels': [['00000/img00000000.png', 2],
                                                              ['00000/img00000001.png', 0],
                                                              ['00000/img00000002.png', 1]]}
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    assert dataset.name == 'out' and len(dataset) == 3 and dataset.label_dim == 3
    for idx, expected in enumerate(images):
        image, label = dataset[idx]
        assert np.array_equal(image, chw(expected))
        assert np.argmax(label) == [2, 0, 1][idx]
    assert_nothing_left(tmp_path, ['src', 'out.zip'])


def test_folder_to_folder_keeps_gray_and_vector_labels(tmp_path):
    root, images = make_folder(tmp_path / 'src', count=2, channels=1, labels=[[0.5, 1], [2, -1]])
    (tmp_path / 'out').mkdir()  # An empty folder is fine.
    dataset_tool.convert_dataset(root, str(tmp_path / 'out'))
    assert sorted(os.listdir(tmp_path / 'out')) == ['00000', 'dataset.json']
    with PIL.Image.open(tmp_path / 'out' / '00000' / 'img00000001.png') as image:
        assert image.mode == 'L' and np.array_equal(np.asarray(image), images[1])
    dataset = ImageFolderDataset(str(tmp_path / 'out'), use_labels=True)
    assert dataset.image_shape == [1, 8, 8] and np.array_equal(dataset[1][1], np.float32([2, -1]))
    assert_nothing_left(tmp_path, ['src', 'out'])


def test_zip_source_with_nested_paths(tmp_path):
    save(str(tmp_path / 'src' / 'b' / 'x.png'), random_image(0))
    save(str(tmp_path / 'src' / 'a' / 'y.jpeg'), random_image(1))
    write_labels(tmp_path / 'src', {'b/x.png': 5, 'a/y.jpeg': 7})
    source = zip_folder(tmp_path / 'src', tmp_path / 'src.zip')
    assert dataset_tool.convert_dataset(source, str(tmp_path / 'out.zip')) == 2
    labels = read_zip_json(tmp_path / 'out.zip')['labels']
    assert [label for _fname, label in labels] == [7, 5]  # Sorted source paths: a/y.jpeg, then b/x.png.


def test_unlabelled_source_writes_null_labels(tmp_path):
    root, _images = make_folder(tmp_path / 'src', count=2)
    dataset_tool.convert_dataset(root, str(tmp_path / 'out.zip'))
    assert read_zip_json(tmp_path / 'out.zip') == {'labels': None}


def test_max_images(tmp_path):
    root, images = make_folder(tmp_path / 'src', count=5, labels=[0, 1, 2, 3, 4])
    assert run('--source', root, '--dest', tmp_path / 'out.zip', '--max-images', 2).exit_code == 0
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    assert len(dataset) == 2 and np.array_equal(dataset[1][0], chw(images[1])) and dataset.label_dim == 2


def test_mnist_is_padded_to_32_and_labelled(tmp_path):
    images = np.random.RandomState(0).randint(1, 256, size=[3, 28, 28]).astype(np.uint8)
    source = write_mnist(tmp_path / 'mnist', images, labels=[7, 0, 9])
    dataset_tool.convert_dataset(source, str(tmp_path / 'mnist.zip'))
    dataset = ImageFolderDataset(str(tmp_path / 'mnist.zip'), use_labels=True)
    assert dataset.image_shape == [1, 32, 32] and dataset.label_dim == 10
    for idx in range(3):
        image, label = dataset[idx]
        assert np.array_equal(image[0, 2:30, 2:30], images[idx])
        assert image.sum() == images[idx].astype(np.int64).sum()  # The 2-pixel border is zero.
        assert np.argmax(label) == [7, 0, 9][idx]


def test_mnist_without_labels_file_and_the_folder_layout(tmp_path):
    # 1001 images: the last one goes to the second folder of 1000.
    images = np.zeros([1001, 28, 28], dtype=np.uint8)
    images[:, 0, 0] = np.arange(1001) % 256
    source = write_mnist(tmp_path / 'fashion', images, labels=None, prefix='t10k')
    messages = []
    assert dataset_tool.convert_dataset(source, str(tmp_path / 'out.zip'), log=messages.append) == 1001
    names = zip_names(tmp_path / 'out.zip')
    assert names[999] == '00000/img00000999.png' and names[1000] == '00001/img00001000.png'
    assert read_zip_json(tmp_path / 'out.zip') == {'labels': None}
    assert any('No labels file' in message for message in messages)
    assert any(message.startswith('1000 / 1001') for message in messages)
    with zipfile.ZipFile(tmp_path / 'out.zip') as z, PIL.Image.open(z.open('00001/img00001000.png')) as image:
        assert np.asarray(image)[2, 2] == 1000 % 256


def test_cifar10(tmp_path):
    source, data, labels = write_cifar(tmp_path / 'cifar-10-python.tar.gz')
    result = run('--source', source, '--dest', tmp_path / 'cifar10.zip')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'cifar10.zip'), use_labels=True)
    assert len(dataset) == 10 and dataset.image_shape == [3, 32, 32]
    for idx in [0, 3, 9]:
        image, _label = dataset[idx]
        assert np.array_equal(image, data[idx]) and dataset.get_details(idx).raw_label == labels[idx]


def test_lmdb_needs_the_lmdb_package(tmp_path, monkeypatch):
    (tmp_path / 'church_lmdb').mkdir()
    (tmp_path / 'church_lmdb' / 'data.mdb').write_bytes(b'')
    monkeypatch.setitem(sys.modules, 'lmdb', None)  # Makes `import lmdb` fail even where it is installed.
    result = run('--source', tmp_path / 'church_lmdb', '--dest', tmp_path / 'out.zip')
    assert result.exit_code != 0 and 'pip install lmdb' in result.output
    assert_nothing_left(tmp_path, ['church_lmdb'])


# ----------------------------------------------------------------------------
# Transforms and conversions.


def test_center_crop(tmp_path):
    wide = random_image(0, size=12, height=8)
    save(str(tmp_path / 'src' / 'a.png'), wide)
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'same.zip'), transform='center-crop',
                                 width=8, height=8)
    assert np.array_equal(ImageFolderDataset(str(tmp_path / 'same.zip'))[0][0], chw(wide[:, 2:10]))
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'small.zip'), transform='center-crop',
                                 width=4, height=4)
    assert ImageFolderDataset(str(tmp_path / 'small.zip')).image_shape == [3, 4, 4]


def test_center_crop_wide_pads_to_a_square(tmp_path):
    save(str(tmp_path / 'src' / 'a.png'), np.full([16, 16, 3], 200, dtype=np.uint8))
    save(str(tmp_path / 'src' / 'b.png'), np.full([6, 6, 3], 100, dtype=np.uint8))  # Too small: skipped.
    messages = []
    count = dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'out.zip'),
                                         transform='center-crop-wide', width=8, height=4, resize_filter='box',
                                         log=messages.append)
    assert count == 1 and any('Skipped 1 image' in message for message in messages)
    image = ImageFolderDataset(str(tmp_path / 'out.zip'))[0][0]
    assert image.shape == (3, 8, 8)
    assert (image[:, :2] == 0).all() and (image[:, 6:] == 0).all() and (image[:, 2:6] == 200).all()


def test_resize_without_transform(tmp_path):
    blocks = np.kron(random_image(0, size=4), np.ones([2, 2, 1], dtype=np.uint8))  # 8x8 of 2x2 blocks.
    save(str(tmp_path / 'src' / 'a.png'), blocks)
    result = run('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', '--width', 4, '--height', 4,
                 '--resize-filter', 'box')
    assert result.exit_code == 0, result.output
    assert np.array_equal(ImageFolderDataset(str(tmp_path / 'out.zip'))[0][0], chw(blocks[::2, ::2]))


def test_box_filter_averages_blocks_and_differs_from_lanczos(tmp_path):
    # The FFHQ-256 recipe (1024 -> 256 with --resize-filter=box): each output pixel is the mean of its 4x4 block.
    image = random_image(3, size=16)
    save(str(tmp_path / 'src' / 'a.png'), image)
    outputs = {}
    for resize_filter in ['box', 'lanczos']:
        dest = tmp_path / f'{resize_filter}.zip'
        result = run('--source', tmp_path / 'src', '--dest', dest, '--width', 4, '--height', 4,
                     f'--resize-filter={resize_filter}')
        assert result.exit_code == 0, result.output
        outputs[resize_filter] = ImageFolderDataset(str(dest))[0][0].astype(np.float64)
    block_means = image.reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(outputs['box'], chw(block_means), atol=1)  # PIL averages uint8 in fixed point.
    assert np.abs(outputs['lanczos'] - chw(block_means)).max() > 2
    assert run('--source', tmp_path / 'src', '--dest', tmp_path / 'x.zip', '--resize-filter=bicubic').exit_code != 0


def test_mixed_sizes_are_resized_when_a_size_is_given(tmp_path):
    save(str(tmp_path / 'src' / 'a.png'), random_image(0, size=8))
    save(str(tmp_path / 'src' / 'b.png'), random_image(1, size=16))
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'out.zip'), width=8, height=8)
    assert len(ImageFolderDataset(str(tmp_path / 'out.zip'))) == 2


@pytest.mark.parametrize('gray_first', [True, False])
def test_gray_and_color_mixed_become_rgb(tmp_path, gray_first):
    gray, color = random_image(0, channels=1), random_image(1)
    save(str(tmp_path / 'src' / ('a.png' if gray_first else 'b.png')), gray)
    save(str(tmp_path / 'src' / ('b.png' if gray_first else 'a.png')), color)
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'out.zip'))
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'))
    assert dataset.image_shape == [3, 8, 8]
    gray_image = dataset[0 if gray_first else 1][0]
    assert all(np.array_equal(gray_image[c], gray) for c in range(3))
    assert np.array_equal(dataset[1 if gray_first else 0][0], chw(color))
    assert_nothing_left(tmp_path, ['src', 'out.zip'])


def test_rgba_and_palette_become_rgb(tmp_path):
    rgba = random_image(0, channels=4)
    save(str(tmp_path / 'src' / 'a.png'), rgba, 'RGBA')
    palette = PIL.Image.fromarray(random_image(1), 'RGB').quantize(colors=8)
    palette.save(tmp_path / 'src' / 'b.png')
    dataset_tool.convert_dataset(str(tmp_path / 'src'), str(tmp_path / 'out.zip'))
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'))
    assert np.array_equal(dataset[0][0], chw(rgba[:, :, :3]))
    assert np.array_equal(dataset[1][0], chw(np.asarray(palette.convert('RGB'))))


# ----------------------------------------------------------------------------
# Refusals: a clear message, exit code 1, no traceback, nothing at --dest.


def assert_refused(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert isinstance(result.exception, SystemExit)  # A click error, not an exception escaping main.
    assert 'Traceback' not in result.output


def test_refuses_a_non_empty_destination(tmp_path):
    root, _images = make_folder(tmp_path / 'src', count=1)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'keep.txt').write_text('mine')
    assert_refused(run('--source', root, '--dest', tmp_path / 'full'), 'is a folder that is not empty')
    (tmp_path / 'old.zip').write_bytes(b'mine')
    assert_refused(run('--source', root, '--dest', tmp_path / 'old.zip'), 'already exists')
    (tmp_path / 'file').write_bytes(b'mine')
    assert_refused(run('--source', root, '--dest', tmp_path / 'file'), 'is not a folder')
    assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine' and (tmp_path / 'old.zip').read_bytes() == b'mine'
    assert_nothing_left(tmp_path, ['src', 'full', 'old.zip', 'file'])


@pytest.mark.parametrize('dest', ['out.zip', 'out'])
def test_corrupt_image_leaves_no_destination(tmp_path, dest):
    root, _images = make_folder(tmp_path / 'src', count=3)
    (tmp_path / 'src' / 'img2.png').write_bytes(b'\x89PNG broken')
    result = run('--source', root, '--dest', tmp_path / dest)
    assert_refused(result, 'Cannot read image "img2.png"')
    assert_nothing_left(tmp_path, ['src'])


def test_mixed_sizes_without_a_size_are_refused(tmp_path):
    save(str(tmp_path / 'src' / 'a.png'), random_image(0, size=8))
    save(str(tmp_path / 'src' / 'b.png'), random_image(1, size=16))
    result = run('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip')
    assert_refused(result, '"b.png" gives an image 16x16 with 3 channel(s), but "a.png" gave 8x8')
    assert_nothing_left(tmp_path, ['src'])


@pytest.mark.parametrize('size, options, message', [
    ((12, 8), [], '"a.png" gives a 12x8 image; training needs square images'),
    ((12, 12), [], 'gives a 12x12 image'),
    ((8, 8), ['--width', 6, '--height', 6], '--width must be a power of two'),
    ((8, 8), ['--width', 8, '--height', 4], 'must be square'),
    ((8, 8), ['--transform', 'center-crop', '--width', 8], 'needs both --width and --height'),
    ((8, 8), ['--transform', 'center-crop-wide', '--width', 4, '--height', 8], 'must not exceed --width'),
    ((8, 8), ['--transform', 'center-crop-wide', '--width', 12, '--height', 6], 'power of two'),
])
def test_bad_output_sizes_are_refused(tmp_path, size, options, message):
    save(str(tmp_path / 'src' / 'a.png'), random_image(0, size=size[0], height=size[1]))
    assert_refused(run('--source', tmp_path / 'src', '--dest', tmp_path / 'out.zip', *options), message)
    assert_nothing_left(tmp_path, ['src'])


def test_bad_sources_are_refused(tmp_path):
    assert_refused(run('--source', tmp_path / 'missing', '--dest', tmp_path / 'out.zip'), 'does not exist')
    (tmp_path / 'data.tar').write_bytes(b'x')
    assert_refused(run('--source', tmp_path / 'data.tar', '--dest', tmp_path / 'out.zip'), 'Unknown kind of source')
    (tmp_path / 'empty').mkdir()
    assert_refused(run('--source', tmp_path / 'empty', '--dest', tmp_path / 'out.zip'), 'No images to write')
    (tmp_path / 'bad.zip').write_bytes(b'not a zip')
    assert_refused(run('--source', tmp_path / 'bad.zip', '--dest', tmp_path / 'out.zip'), 'Cannot read archive')
    (tmp_path / 'bad').mkdir()
    path = (tmp_path / 'bad' / 'train-images-idx3-ubyte.gz')
    path.write_bytes(gzip.compress(struct.pack('>IIII', 2049, 1, 28, 28)))
    assert_refused(run('--source', path, '--dest', tmp_path / 'out.zip'), 'magic number 2051')
    path.write_bytes(gzip.compress(struct.pack('>IIII', 2051, 2, 28, 28) + bytes(28 * 28)))
    assert_refused(run('--source', path, '--dest', tmp_path / 'out.zip'), 'asks for 1568')
    assert_nothing_left(tmp_path, ['data.tar', 'empty', 'bad.zip', 'bad'])


def test_source_labels_must_cover_every_image(tmp_path):
    root, _images = make_folder(tmp_path / 'src', count=3)
    write_labels(tmp_path / 'src', {'img0.png': 0, 'img2.png': 1})
    assert_refused(run('--source', root, '--dest', tmp_path / 'out.zip'), 'no label for "img1.png"')
    assert run('--source', root, '--dest', tmp_path / 'out.zip', '--max-images', 1).exit_code == 0


def test_cifar_archive_without_batches(tmp_path):
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        info = tarfile.TarInfo('cifar-10-batches-py/readme.html')
        tar.addfile(info, io.BytesIO(b''))
    result = run('--source', tmp_path / 'cifar-10-python.tar.gz', '--dest', tmp_path / 'out.zip')
    assert_refused(result, 'has no data_batch_1')


def test_lmdb_source_with_a_stand_in_module(tmp_path, monkeypatch):
    # lmdb is optional and not installed here: a stand-in with the calls the reader makes (open, begin as a
    # context manager, stat, cursor iteration over (key, value) bytes) checks our side of the interface.
    encoded = []
    for seed in range(3):
        buffer = io.BytesIO()
        PIL.Image.fromarray(random_image(seed, size=16)).save(buffer, format='PNG')
        encoded.append((f'{seed:04d}'.encode(), buffer.getvalue()))

    class Transaction:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def stat(self):
            return {'entries': len(encoded)}

        def cursor(self):
            return iter(encoded)

    class Environment:
        def begin(self, write=False):
            assert write is False
            return Transaction()

        def close(self):
            pass

    class FakeLmdb:
        Error = RuntimeError

        @staticmethod
        def open(path, **kwargs):
            assert kwargs['readonly'] is True
            return Environment()

    monkeypatch.setitem(sys.modules, 'lmdb', FakeLmdb)
    (tmp_path / 'bedroom_lmdb').mkdir()
    result = run('--source', tmp_path / 'bedroom_lmdb', '--dest', tmp_path / 'out.zip', '--max-images', 2,
                 '--transform', 'center-crop', '--width', 8, '--height', 8)
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'out.zip'))
    assert len(dataset) == 2 and dataset.image_shape == [3, 8, 8] and not dataset.has_labels


# ----------------------------------------------------------------------------
# --help


def test_help_ends_with_examples_that_parse():
    result = run('--help')
    assert result.exit_code == 0
    help_text = result.output
    options_end = help_text.index('Show this message and exit.')
    examples_start = help_text.index('Examples:')
    assert options_end < examples_start
    lines = [line.strip() for line in help_text[examples_start:].splitlines()]
    # Command lines joined across their backslash continuations, as a shell would read them.
    commands = ' '.join(lines).replace('\\ ', '').split('python dataset_tool.py ')[1:]
    commands = [command.split(' #')[0].split() for command in commands]
    assert len(commands) == 5
    assert help_text.rstrip().endswith('--max-images=50000')
    assert '--resize-filter=box' in commands[0] and '--width=256' in commands[0]
    for args in commands:
        with dataset_tool.main.make_context('dataset_tool.py', list(args)) as context:  # Options and choices valid.
            assert context.params['source'] and context.params['dest']
