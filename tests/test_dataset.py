"""training/dataset.py: folder and zip datasets, subsets, mirroring, labels, pickling and every input error."""

import json
import os
import pickle
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import Dataset, ImageFolderDataset, data_loader_kwargs, image_to_array, loader_kwargs_on


def random_image(seed, size=8, channels=3, height=None):
    shape = [height or size, size] + ([channels] if channels > 1 else [])
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array, mode).save(path)


def chw(array):
    return array[:, :, np.newaxis].transpose(2, 0, 1) if array.ndim == 2 else array.transpose(2, 0, 1)


def make_folder(root, count=5, size=8, channels=3, labels=None):
    """Images img0.png ... in `root` (sorted order: img0, img1, ...), labelled with `labels` if given."""
    images = [random_image(idx, size, channels) for idx in range(count)]
    for idx, image in enumerate(images):
        save(os.path.join(root, f'img{idx}.png'), image)
    if labels is not None:
        write_labels(root, {f'img{idx}.png': label for idx, label in enumerate(labels)})
    return str(root), images


def write_labels(root, labels):
    entries = None if labels is None else [[fname, label] for fname, label in labels.items()]
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': entries}, f)


def zip_folder(root, zip_path):
    with zipfile.ZipFile(zip_path, 'w') as z:
        for dirpath, _dirs, files in os.walk(root):
            for fname in files:
                path = os.path.join(dirpath, fname)
                z.write(path, os.path.relpath(path, root).replace(os.sep, '/'))
    return str(zip_path)


# ----------------------------------------------------------------------------
# Reading.


def test_folder_tree_is_read_in_sorted_relative_path_order(tmp_path):
    root = tmp_path / 'faces'
    files = {'b/x.png': random_image(0), 'a.png': random_image(1), 'a/z.PNG': random_image(2),
             'c/d/e.bmp': random_image(3)}
    for fname, image in files.items():
        save(str(root / fname), image)
    (root / 'notes.txt').write_text('not an image')
    dataset = ImageFolderDataset(str(root))
    assert dataset._image_fnames == ['a.png', 'a/z.PNG', 'b/x.png', 'c/d/e.bmp']
    assert dataset.name == 'faces' and len(dataset) == 4
    assert dataset.image_shape == [3, 8, 8] and dataset.num_channels == 3 and dataset.resolution == 8
    for idx, fname in enumerate(dataset._image_fnames):
        image, label = dataset[idx]
        assert image.dtype == np.uint8 and np.array_equal(image, chw(files[fname]))
        assert label.dtype == np.float32 and label.shape == (0,)


def test_zip_reads_the_same_as_the_folder_and_is_named_without_extension(tmp_path):
    root, images = make_folder(tmp_path / 'src', labels=[0, 1, 2, 1, 0])
    archive = zip_folder(root, tmp_path / 'cats.zip')
    dataset = ImageFolderDataset(archive, use_labels=True)
    assert dataset.name == 'cats' and len(dataset) == 5
    for idx, expected in enumerate(images):
        image, label = dataset[idx]
        assert np.array_equal(image, chw(expected))
        assert np.array_equal(label, np.eye(3, dtype=np.float32)[[0, 1, 2, 1, 0][idx]])
    dataset.close()


def test_jpeg_and_webp_are_read(tmp_path):
    save(str(tmp_path / 'd' / 'a.jpg'), random_image(0))
    save(str(tmp_path / 'd' / 'b.webp'), random_image(1))
    dataset = ImageFolderDataset(str(tmp_path / 'd'))
    assert len(dataset) == 2 and dataset[1][0].shape == (3, 8, 8)


def test_grayscale_gives_one_channel(tmp_path):
    root, images = make_folder(tmp_path / 'gray', count=2, channels=1)
    dataset = ImageFolderDataset(root)
    assert dataset.image_shape == [1, 8, 8]
    assert np.array_equal(dataset[1][0], chw(images[1]))


def test_image_modes_convert_to_gray_or_rgb():
    rgba = random_image(0, channels=4)
    assert np.array_equal(image_to_array(PIL.Image.fromarray(rgba, 'RGBA')), rgba[:, :, :3])
    la = random_image(1, channels=2)
    assert np.array_equal(image_to_array(PIL.Image.fromarray(la, 'LA')), la[:, :, :1])
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    image16 = PIL.Image.fromarray(gray16)
    assert image16.mode == 'I;16'
    array = image_to_array(image16)
    assert array.shape == (8, 8, 1) and np.array_equal(array[:, :, 0], (gray16 // 256).astype(np.uint8))
    palette = PIL.Image.fromarray(random_image(2), 'RGB').quantize(colors=4)
    assert np.array_equal(image_to_array(palette), np.asarray(palette.convert('RGB')))
    cmyk = PIL.Image.fromarray(random_image(3), 'RGB').convert('CMYK')
    assert image_to_array(cmyk).shape == (8, 8, 3)
    gray = PIL.Image.fromarray(random_image(4, channels=1), 'L')
    assert np.array_equal(image_to_array(gray, force_rgb=True), np.repeat(np.asarray(gray)[:, :, None], 3, axis=2))


def test_rgba_file_drops_alpha(tmp_path):
    rgba = random_image(5, channels=4)
    save(str(tmp_path / 'd' / 'a.png'), rgba, 'RGBA')
    dataset = ImageFolderDataset(str(tmp_path / 'd'))
    assert np.array_equal(dataset[0][0], chw(rgba[:, :, :3]))


# ----------------------------------------------------------------------------
# Subsets and mirroring.


def test_max_size_takes_a_seeded_random_subset_in_sorted_order(tmp_path):
    root, images = make_folder(tmp_path / 'd', count=10, size=4)
    for seed in [0, 1]:
        dataset = ImageFolderDataset(root, max_size=4, random_seed=seed)
        order = np.arange(10)
        np.random.RandomState(seed).shuffle(order)
        expected = sorted(order[:4])
        assert len(dataset) == 4 and list(dataset._raw_idx) == expected
        for idx, raw_idx in enumerate(expected):
            assert np.array_equal(dataset[idx][0], chw(images[raw_idx]))
    assert list(ImageFolderDataset(root, max_size=4, random_seed=0)._raw_idx) != \
        list(ImageFolderDataset(root, max_size=4, random_seed=1)._raw_idx)
    assert len(ImageFolderDataset(root, max_size=10)) == 10
    assert len(ImageFolderDataset(root, max_size=99)) == 10


def test_xflip_appends_a_mirrored_copy(tmp_path):
    root, images = make_folder(tmp_path / 'd', count=3, labels=[2, 0, 1])
    dataset = ImageFolderDataset(root, xflip=True, use_labels=True)
    assert len(dataset) == 6
    for idx in range(3):
        image, label = dataset[idx]
        flipped, flipped_label = dataset[idx + 3]
        assert np.array_equal(image, chw(images[idx]))
        assert np.array_equal(flipped, chw(images[idx][:, ::-1]))
        assert np.array_equal(label, flipped_label)
        assert dataset.get_details(idx) == dict(raw_idx=idx, xflip=False, raw_label=np.int64([2, 0, 1][idx]))
        details = dataset.get_details(idx + 3)
        assert details.raw_idx == idx and details.xflip is True and int(details.raw_label) == [2, 0, 1][idx]


def test_xflip_with_max_size_mirrors_the_subset(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=6, size=4)
    dataset = ImageFolderDataset(root, max_size=2, xflip=True)
    assert len(dataset) == 4
    assert list(dataset._raw_idx[:2]) == list(dataset._raw_idx[2:]) and list(dataset._xflip) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------
# Labels.


def test_class_labels_are_one_hot(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=4, labels=[3, 0, 1, 3])
    dataset = ImageFolderDataset(root, use_labels=True)
    assert dataset.label_shape == [4] and dataset.label_dim == 4
    assert dataset.has_labels and dataset.has_onehot_labels
    assert np.array_equal(dataset.get_label(0), np.float32([0, 0, 0, 1]))
    assert dataset.get_label(0).dtype == np.float32
    assert np.array_equal(dataset[2][1], np.float32([0, 1, 0, 0]))


def test_vector_labels_are_float_vectors(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=2, labels=[[0.5, -1, 2], [1, 0, 0.25]])
    dataset = ImageFolderDataset(root, use_labels=True)
    assert dataset.label_shape == [3] and not dataset.has_onehot_labels and dataset.has_labels
    assert np.array_equal(dataset[1][1], np.float32([1, 0, 0.25])) and dataset[1][1].dtype == np.float32
    assert np.array_equal(dataset.get_details(0).raw_label, np.float32([0.5, -1, 2]))


def test_without_use_labels_labels_are_empty(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=2, labels=[0, 1])
    dataset = ImageFolderDataset(root, use_labels=False)
    assert dataset.label_shape == [0] and dataset.label_dim == 0 and not dataset.has_labels
    assert dataset[0][1].shape == (0,) and dataset[0][1].dtype == np.float32


@pytest.mark.parametrize('labels_json', [None, 'null'])
def test_no_labels_file_or_null_labels_mean_unlabelled(tmp_path, labels_json):
    root, _images = make_folder(tmp_path / 'd', count=2)
    if labels_json is not None:
        (tmp_path / 'd' / 'dataset.json').write_text('{"labels": null}')
    dataset = ImageFolderDataset(root, use_labels=True)
    assert not dataset.has_labels and dataset.label_dim == 0


# ----------------------------------------------------------------------------
# Loaders and pickling.


def test_dataloader_batches(tmp_path):
    root, images = make_folder(tmp_path / 'd', count=4, labels=[0, 1, 0, 1])
    dataset = ImageFolderDataset(zip_folder(root, tmp_path / 'd.zip'), use_labels=True)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0))
    assert len(batches) == 2
    images_batch, labels_batch = batches[1]
    assert images_batch.dtype == torch.uint8 and list(images_batch.shape) == [2, 3, 8, 8]
    assert torch.equal(images_batch[0], torch.from_numpy(chw(images[2])))
    assert torch.equal(labels_batch, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_pickled_zip_dataset_reopens_the_archive(tmp_path):
    root, images = make_folder(tmp_path / 'd', count=3)
    dataset = ImageFolderDataset(zip_folder(root, tmp_path / 'd.zip'), xflip=True)
    dataset[0]  # Opens the archive.
    assert dataset._zipfile is not None
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._zipfile is None and dataset._zipfile is not None
    assert len(copy) == 6 and np.array_equal(copy[4][0], chw(images[1][:, ::-1]))
    assert next(iter(torch.utils.data.DataLoader(copy, batch_size=6)))[0].shape == (6, 3, 8, 8)


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_dataloader_workers_read_a_zip(tmp_path, context):
    # fork: workers inherit the parent's open handle; spawn: workers get the dataset by pickle.
    root, images = make_folder(tmp_path / 'd', count=4, size=4)
    dataset = ImageFolderDataset(zip_folder(root, tmp_path / 'd.zip'))
    dataset[0]  # The parent holds an open handle when the workers start.
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, multiprocessing_context=context)
    for (image, _label), expected in zip(loader, images, strict=True):
        assert torch.equal(image[0], torch.from_numpy(chw(expected)))


def test_each_process_opens_its_own_zip_handle(tmp_path, monkeypatch):
    root, _images = make_folder(tmp_path / 'd', count=1, size=4)
    dataset = ImageFolderDataset(zip_folder(root, tmp_path / 'd.zip'))
    parent_handle = dataset._get_zipfile()
    assert dataset._get_zipfile() is parent_handle
    monkeypatch.setattr(os, 'getpid', lambda: -1)  # As seen from a forked worker.
    child_handle = dataset._get_zipfile()
    assert child_handle is not parent_handle and parent_handle.fp is not None  # The parent's stays open.
    assert dataset[0][0].shape == (3, 4, 4)


def test_base_class_contract():
    class Ramp(Dataset):
        def _load_raw_image(self, raw_idx):
            return np.full([1, 4, 4], raw_idx, dtype=np.uint8)

        def _load_raw_labels(self):
            return np.float32([[i, -i] for i in range(5)])

    dataset = Ramp(name='ramp', raw_shape=[5, 1, 4, 4], use_labels=True, max_size=3, random_seed=7)
    order = np.arange(5)
    np.random.RandomState(7).shuffle(order)
    assert [int(dataset[i][0][0, 0, 0]) for i in range(3)] == sorted(order[:3])
    assert dataset.label_shape == [2] and dataset.name == 'ramp' and dataset.resolution == 4


# ----------------------------------------------------------------------------
# Errors.


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        ImageFolderDataset(str(tmp_path / 'nothing'))


def test_not_a_folder_or_zip(tmp_path):
    (tmp_path / 'data.tar').write_bytes(b'x')
    with pytest.raises(ValueError, match='neither a folder nor a .zip'):
        ImageFolderDataset(str(tmp_path / 'data.tar'))


def test_broken_zip(tmp_path):
    (tmp_path / 'data.zip').write_bytes(b'not a zip file at all')
    with pytest.raises(ValueError, match='Cannot read dataset archive'):
        ImageFolderDataset(str(tmp_path / 'data.zip'))


def test_no_images(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'readme.txt').write_text('hello')
    with pytest.raises(ValueError, match='No images found'):
        ImageFolderDataset(str(tmp_path / 'd'))


@pytest.mark.parametrize('second, found', [(random_image(1, size=16), '16x16 with 3 channel'),
                                           (random_image(1, channels=1), '8x8 with 1 channel')])
def test_mismatched_image_is_named_when_loaded(tmp_path, second, found):
    save(str(tmp_path / 'd' / 'a.png'), random_image(0))
    save(str(tmp_path / 'd' / 'b.png'), second)
    dataset = ImageFolderDataset(str(tmp_path / 'd'))
    dataset[0]
    with pytest.raises(ValueError, match=f'"b.png" .* is {found}.*but "a.png" is 8x8 with 3'):
        dataset[1]


@pytest.mark.parametrize('width, height, message', [(8, 4, 'are 8x4'), (12, 12, 'are 12x12')])
def test_non_square_or_non_power_of_two(tmp_path, width, height, message):
    save(str(tmp_path / 'd' / 'a.png'), random_image(0, size=width, height=height))
    with pytest.raises(ValueError, match=f'{message} .*square images whose size is a power of two'):
        ImageFolderDataset(str(tmp_path / 'd'))


def test_resolution_argument_must_match(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=1)
    assert ImageFolderDataset(root, resolution=8).resolution == 8
    with pytest.raises(ValueError, match='are 8x8, but resolution=16'):
        ImageFolderDataset(root, resolution=16)


@pytest.mark.parametrize('first', [True, False])
def test_corrupt_image_is_named(tmp_path, first):
    root, _images = make_folder(tmp_path / 'd', count=2)
    (tmp_path / 'd' / ('img0.png' if first else 'img1.png')).write_bytes(b'garbage' * 20)
    with pytest.raises(ValueError, match=f'Cannot read image "img{0 if first else 1}.png".*not an image'):
        ImageFolderDataset(root)[1]


def test_truncated_image_is_named(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=2, size=32)
    path = tmp_path / 'd' / 'img1.png'
    path.write_bytes(path.read_bytes()[:200])
    dataset = ImageFolderDataset(root)
    with pytest.raises(ValueError, match='Cannot read image "img1.png".*truncated'):
        dataset[1]


@pytest.mark.parametrize('content, message', [
    ('{"labels": [["img0.png", 0]', 'dataset.json" in .* is not valid JSON'),
    ('{"classes": []}', 'no "labels" entry'),
    ('{"labels": {"img0.png": 0}}', '"labels" is a dict'),
    ('{"labels": [["img0.png", 0, 1]]}', 'malformed label entry'),
    ('{"labels": [["img0.png", 0]]}', 'no label for "img1.png"'),
    ('{"labels": [["img0.png", 0], ["img1.png", [1, 0]]]}', 'mixes label types: "img0.png" has a class index '
                                                            'and "img1.png" a vector'),
    ('{"labels": [["img0.png", 0], ["img1.png", -2]]}', 'label of "img1.png" is negative'),
    ('{"labels": [["img0.png", 0], ["img1.png", "cat"]]}', 'label of "img1.png" is "cat"'),
    ('{"labels": [["img0.png", 1.5], ["img1.png", 2]]}', 'label of "img0.png" is 1.5'),
    ('{"labels": [["img0.png", [1]], ["img1.png", [1, 2]]]}', 'label vectors differ in length'),
])
def test_bad_labels_file(tmp_path, content, message):
    root, _images = make_folder(tmp_path / 'd', count=2)
    (tmp_path / 'd' / 'dataset.json').write_text(content)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(root, use_labels=True)
    assert ImageFolderDataset(root, use_labels=False).label_dim == 0  # Labels not asked for: not read.


def test_damaged_zip_member_is_named(tmp_path):
    root, _images = make_folder(tmp_path / 'd', count=2)
    archive = tmp_path / 'd.zip'
    zip_folder(root, archive)  # Stored, not compressed: the PNG bytes appear verbatim.
    data = bytearray(archive.read_bytes())
    png = (tmp_path / 'd' / 'img1.png').read_bytes()
    start = data.find(png)
    data[start + len(png) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    dataset = ImageFolderDataset(str(archive))
    with pytest.raises(ValueError, match='Cannot read "img1.png" from .*CRC'):
        dataset[1]


# ----------------------------------------------------------------------------
# DataLoader options.


def test_data_loader_kwargs_are_recorded_independent_of_the_device():
    assert data_loader_kwargs(0) == dict(pin_memory=True, num_workers=0)  # No prefetch_factor without workers.
    assert data_loader_kwargs(3) == dict(pin_memory=True, num_workers=3, prefetch_factor=2)
    # A resumed run's stored options keep their other keys; prefetch_factor follows the new worker count.
    stored = dict(pin_memory=False, num_workers=3, prefetch_factor=2, persistent_workers=True)
    assert data_loader_kwargs(0, stored) == dict(pin_memory=False, num_workers=0, persistent_workers=True)
    assert stored['num_workers'] == 3  # The stored options are not modified.
    assert data_loader_kwargs(1, dict(pin_memory=True, num_workers=0)).prefetch_factor == 2  # An EasyDict.


def test_loader_kwargs_on_a_device():
    recorded = data_loader_kwargs(3)
    # Workers are forked on Linux (what lets them outlive a scheduler's stop signals; training/preemption.py).
    forked = dict(multiprocessing_context='fork') if sys.platform.startswith('linux') else {}
    assert loader_kwargs_on(recorded, 'cuda:1') == dict(pin_memory=True, num_workers=3, prefetch_factor=2, **forked)
    assert loader_kwargs_on(recorded, torch.device('cpu')) == dict(pin_memory=False, num_workers=3, prefetch_factor=2,
                                                                   **forked)
    # Options written by hand may hold a prefetch_factor without workers, which DataLoader rejects.
    assert loader_kwargs_on(dict(num_workers=0, prefetch_factor=2), 'cpu') == dict(pin_memory=False, num_workers=0)
    assert recorded == data_loader_kwargs(3)  # Not modified.


def test_the_metrics_and_train_py_take_their_loader_options_from_here():
    from metrics import metric_utils
    from runner import options  # The option builder of train.py.
    from runner.errors import UserError
    assert metric_utils.default_data_loader_kwargs('cpu') == loader_kwargs_on(data_loader_kwargs(0), 'cpu')
    forked = dict(multiprocessing_context='fork') if sys.platform.startswith('linux') else {}
    assert metric_utils.default_data_loader_kwargs('cuda') == dict(pin_memory=True, num_workers=3, prefetch_factor=2,
                                                                   **forked)
    assert options._data_loader_kwargs(2) == data_loader_kwargs(2)
    with pytest.raises(UserError, match='--workers must be at least 0'):
        options._data_loader_kwargs(-1)
    # A DataLoader accepts what it is given on this machine's CPU, with and without workers.
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2,
                                             **loader_kwargs_on(data_loader_kwargs(workers), 'cpu'))
        assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
