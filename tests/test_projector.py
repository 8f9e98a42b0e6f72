"""projector.py: schedules, the noise penalty, the search itself, target loading and the command line.

The real VGG16 is a 500 MB download, so every test uses a small TorchScript stand-in with the same call
signature, saved as `vgg16.pt` in the folder named by $STYLEGAN_DETECTOR_DIR.
"""

import math
import os
import pickle
import subprocess
import sys
import types
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_legacy import REPO_ROOT, make_generator  # Tiny generators with every tensor moved off its initial value.

import generate
import projector
from metrics import metric_utils

pytestmark = pytest.mark.usefixtures('one_thread')

FAST = dict(w_avg_samples=256)  # The default 10000 latents are accurate but needlessly slow for a 16x16 network.


class StandInVGG16(torch.nn.Module):
    """Unit-length random projection of an 8x8 average-pooled image: a smooth, cheap perceptual-ish feature."""

    def __init__(self, seed: int = 0, num_features: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer('proj', torch.randn([3 * 8 * 8, num_features], generator=gen))

    def forward(self, img: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(img.to(torch.float32) / 127.5 - 1, [8, 8]).flatten(1) @ self.proj
        if return_lpips:
            x = x * x.square().sum(dim=1, keepdim=True).rsqrt()
        return x


@pytest.fixture(scope='module')
def detector_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('detectors')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*torch.jit.script.* is deprecated', category=DeprecationWarning)
        scripted = torch.jit.script(StandInVGG16())
    scripted.save(str(path / 'vgg16.pt'))
    return str(path)


@pytest.fixture(autouse=True)
def _use_stand_in_vgg16(detector_dir, monkeypatch):
    monkeypatch.setenv(projector.DETECTOR_DIR_ENV, detector_dir)


@pytest.fixture(scope='module')
def vgg16(detector_dir):
    return projector._load_vgg16('cpu', detector_dir)


@pytest.fixture(scope='module')
def G():
    return make_generator()


@pytest.fixture(scope='module')
def network_pkl(G, tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'snapshot.pkl'
    path.write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=G)))
    return str(path)


def image_of(G, seed, c=None):
    """A [C, H, W] float image in [0, 255] that G itself draws for `seed` (const noise)."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float()
    c = torch.zeros([1, G.c_dim]) if c is None else c
    with torch.no_grad():
        img = G(z, c, noise_mode='const')
    return torch.from_numpy(generate.to_uint8(img)[0].transpose(2, 0, 1).copy()).float()


def write_png(path, array):
    PIL.Image.fromarray(array).save(path)
    return str(path)


def read_png(path):
    with PIL.Image.open(path) as image:
        return image.mode, np.asarray(image).copy()


# ----------------------------------------------------------------------------
# Schedules and the noise penalty.


def test_learning_rate_schedule():
    lr = projector.learning_rate_at
    assert lr(0.0) == 0.0                                     # The linear warm-up starts at zero ...
    assert math.isclose(lr(0.025), 0.05)                      # ... is halfway at half the ramp-up length ...
    assert math.isclose(lr(0.05), 0.1) and math.isclose(lr(0.5), 0.1)  # ... then the peak holds ...
    assert math.isclose(lr(0.875), 0.05)                      # ... until a half cosine takes it down.
    assert lr(0.999) < 1e-5
    assert math.isclose(lr(0.5, initial_learning_rate=0.3), 0.3)


def test_w_noise_scale_ramps_down_quadratically():
    scale = projector.w_noise_scale_at
    assert math.isclose(scale(0.0, w_std=2.0), 2.0 * 0.05)
    assert math.isclose(scale(0.375, w_std=2.0), 2.0 * 0.05 * 0.25)
    assert scale(0.75, w_std=2.0) == 0.0 and scale(0.9, w_std=2.0) == 0.0


def test_noise_regularization_closed_forms():
    # A constant map correlates perfectly with its shifts: 1 + 1 per octave, and a 32x32 map has 32, 16, 8.
    assert math.isclose(float(projector.noise_regularization([torch.ones([32, 32])])), 6.0)
    assert math.isclose(float(projector.noise_regularization([torch.ones([4, 4]), torch.ones([8, 8])])), 4.0)
    # A checkerboard is anti-correlated with both shifts; the square removes the sign. Pooling flattens it to 0.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    assert math.isclose(float(projector.noise_regularization([checker])), 2.0)
    # White noise is hardly penalized.
    white = torch.randn([64, 64], generator=torch.Generator().manual_seed(0))
    assert float(projector.noise_regularization([white])) < 1e-2
    assert float(projector.noise_regularization([])) == 0.0


def test_lpips_features_average_large_images_down_to_256_and_repeat_gray():
    seen = []

    def recorder(images, resize_images=True, return_lpips=False):
        seen.append((images.clone(), resize_images, return_lpips))
        return images.flatten(1)

    images = torch.arange(2 * 512 * 512, dtype=torch.float32).reshape(1, 2, 512, 512)[:, :1]
    projector._lpips_features(recorder, images)
    reduced, resize_images, return_lpips = seen[-1]
    assert reduced.shape == (1, 3, 256, 256) and resize_images is False and return_lpips is True
    torch.testing.assert_close(reduced[0, 2], F.avg_pool2d(images, 2)[0, 0])
    projector._lpips_features(recorder, torch.ones([1, 3, 64, 64]))
    assert seen[-1][0].shape == (1, 3, 64, 64)     # Smaller images pass unchanged.


# ----------------------------------------------------------------------------
# The search.


def test_estimate_w_stats(G):
    w_avg, w_std = projector.estimate_w_stats(G, 64)
    z = torch.from_numpy(np.random.RandomState(123).randn(64, G.z_dim)).float()
    with torch.no_grad():
        w = G.mapping(z, torch.zeros([64, 0]))[:, 0, :]
    assert w_avg.shape == (1, 1, G.w_dim)
    torch.testing.assert_close(w_avg[0, 0], w.mean(dim=0))
    assert math.isclose(w_std, float((w - w.mean(dim=0)).square().sum(dim=1).mean().sqrt()), rel_tol=1e-5)


def test_projection_reduces_the_distance(G, vgg16):
    torch.manual_seed(0)
    target = image_of(G, 5)
    states = list(projector.iter_projection(G, target, num_steps=30, vgg16=vgg16, **FAST))
    assert [s.step for s in states] == list(range(30))
    dists = [s.dist for s in states]
    assert all(math.isfinite(d) for d in dists)
    assert dists[-1] < 0.5 * dists[0], dists

    # The distance of the final w, measured on its own, agrees: the search moved towards the target.
    with torch.no_grad():
        def distance(w):
            synth = (G.synthesis(w.repeat([1, G.num_ws, 1]), noise_mode='const') + 1) * (255 / 2)
            return float((vgg16(synth, resize_images=False, return_lpips=True)
                          - vgg16(target[None], resize_images=False, return_lpips=True)).square().sum())
        w_avg, _ = projector.estimate_w_stats(G, FAST['w_avg_samples'])
        assert distance(states[-1].w) < distance(w_avg)


def test_project_returns_one_w_per_step_repeated_over_layers(G, vgg16):
    torch.manual_seed(1)
    w_out = projector.project(G, image_of(G, 7), num_steps=4, vgg16=vgg16, **FAST)
    assert w_out.shape == (4, G.num_ws, G.w_dim) and w_out.dtype == torch.float32
    assert torch.equal(w_out, w_out[:, :1, :].expand_as(w_out))
    assert not torch.equal(w_out[0], w_out[-1])


def test_project_is_reproducible_with_the_global_seed(G, vgg16):
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(projector.project(G, image_of(G, 7), num_steps=3, vgg16=vgg16, **FAST))
    assert torch.equal(runs[0], runs[1])


def test_projection_leaves_the_network_alone(G, vgg16):
    before = {name: tensor.clone() for name, tensor in G.state_dict().items()}
    noise_names = [name for name in before if name.endswith('noise_const')]
    assert noise_names, 'the tiny generator should have constant noise maps'
    torch.manual_seed(0)
    projector.project(G, image_of(G, 9), num_steps=3, vgg16=vgg16, **FAST)
    after = G.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any(p.requires_grad for p in G.parameters())
    assert not any(b.requires_grad for b in G.buffers())


def test_project_loads_vgg16_from_the_detector_dir(G):
    torch.manual_seed(0)
    w_out = projector.project(G, image_of(G, 2), num_steps=2, **FAST)
    assert w_out.shape == (2, G.num_ws, G.w_dim)


def test_vgg16_comes_from_the_metrics_loader(detector_dir, vgg16):
    # One loader and one set of names for the detector: the projector's VGG16 is the metrics' cached module,
    # found under the metrics' file name, URL and environment variable.
    assert projector._load_vgg16('cpu', detector_dir) is metric_utils.get_feature_detector(
        metric_utils.VGG16_URL, device='cpu', detector_dir=detector_dir)
    assert projector.find_vgg16(detector_dir) == metric_utils.detector_path(metric_utils.VGG16_URL, detector_dir)
    assert projector.DETECTOR_DIR_ENV is metric_utils.DETECTOR_DIR_ENV and projector.VGG16_URL is metric_utils.VGG16_URL


def test_project_grayscale_network():
    G1 = make_generator(img_channels=1)
    torch.manual_seed(0)
    w_out = projector.project(G1, image_of(G1, 4), num_steps=2, **FAST)
    assert w_out.shape == (2, G1.num_ws, G1.w_dim)


def test_project_conditional_network_needs_a_class(vgg16):
    Gc = make_generator(c_dim=4)
    target = image_of(Gc, 1, c=torch.eye(4)[2:3])
    with pytest.raises(ValueError, match='conditional'):
        projector.project(Gc, target, num_steps=2, vgg16=vgg16, **FAST)
    with pytest.raises(ValueError, match='out of range'):
        projector.project(Gc, target, num_steps=2, class_idx=4, vgg16=vgg16, **FAST)
    torch.manual_seed(0)
    w_out = projector.project(Gc, target, num_steps=2, class_idx=2, vgg16=vgg16, **FAST)
    assert w_out.shape == (2, Gc.num_ws, Gc.w_dim)
    # The starting point is the average w of class 2, not of class 0.
    w2, _ = projector.estimate_w_stats(Gc, 64, label=torch.eye(4)[2:3])
    w0, _ = projector.estimate_w_stats(Gc, 64, label=torch.eye(4)[0:1])
    assert not torch.allclose(w2, w0)


def test_project_rejects_a_target_of_the_wrong_shape(G, vgg16):
    with pytest.raises(ValueError, match=r'\[3, 16, 16\]'):
        projector.project(G, torch.zeros([3, 32, 32]), num_steps=2, vgg16=vgg16)
    with pytest.raises(ValueError, match='num_steps'):
        projector.project(G, torch.zeros([3, 16, 16]), num_steps=0, vgg16=vgg16)


# ----------------------------------------------------------------------------
# Target loading.


def test_load_target_crops_the_center_square(tmp_path):
    array = np.zeros([20, 40, 3], dtype=np.uint8)
    array[:, 10:30] = [200, 100, 50]    # The centered 20x20 square; the rest is black.
    target = projector.load_target(write_png(tmp_path / 'wide.png', array), 16, 3)
    assert target.shape == (16, 16, 3) and target.dtype == np.uint8
    assert np.abs(target.astype(int) - [200, 100, 50]).max() <= 1

    gray = projector.load_target(write_png(tmp_path / 'tall.png', np.full([30, 20, 3], 90, np.uint8)), 8, 1)
    assert gray.shape == (8, 8, 1) and np.abs(gray.astype(int) - 90).max() <= 1
    with pytest.raises(ValueError, match='channels'):
        projector.load_target(str(tmp_path / 'wide.png'), 16, 4)


# ----------------------------------------------------------------------------
# Command line.


def run(command, args):
    return CliRunner().invoke(command, args)


def test_cli_end_to_end_and_generate_renders_the_result(G, network_pkl, tmp_path):
    rng = np.random.RandomState(0)
    target_png = write_png(tmp_path / 'target_in.png', rng.randint(0, 256, [24, 20, 3]).astype(np.uint8))
    outdir = tmp_path / 'out'
    result = run(projector.main, ['--network', network_pkl, '--target', target_png, '--num-steps', '5',
                                  '--save-video', 'false', '--outdir', str(outdir), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'step    5/5' in result.output
    assert sorted(p.name for p in outdir.iterdir()) == ['proj.png', 'projected_w.npz', 'target.png']

    with np.load(outdir / 'projected_w.npz') as data:
        assert data.files == ['w']
        w = data['w']
    assert w.shape == (1, G.num_ws, G.w_dim) and w.dtype == np.float32
    assert read_png(outdir / 'target.png')[0] == 'RGB' and read_png(outdir / 'target.png')[1].shape == (16, 16, 3)

    rendered = tmp_path / 'rendered'
    result = run(generate.main, ['--network', network_pkl, '--projected-w', str(outdir / 'projected_w.npz'),
                                 '--outdir', str(rendered), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    mode, image = read_png(rendered / 'proj00.png')
    assert mode == 'RGB' and np.array_equal(image, read_png(outdir / 'proj.png')[1])


def test_cli_skips_the_video_without_imageio(network_pkl, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'imageio', None)     # `import imageio` now raises ImportError.
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    result = run(projector.main, ['--network', network_pkl, '--target', target_png, '--num-steps', '2',
                                  '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    assert 'imageio' in result.output and 'proj.mp4' in result.output
    assert not (tmp_path / 'out' / 'proj.mp4').exists()
    assert (tmp_path / 'out' / 'projected_w.npz').exists()


class FakeVideoWriter:
    """Stands in for imageio's writer: keeps the frames instead of encoding them."""

    def __init__(self, path, **kwargs):
        self.path, self.kwargs, self.frames, self.closed = path, kwargs, [], False
        WRITERS.append(self)

    def append_data(self, frame):
        self.frames.append(frame)

    def close(self):
        self.closed = True


WRITERS = []


def test_cli_writes_the_video_with_imageio(network_pkl, tmp_path, monkeypatch):
    WRITERS.clear()
    fake_imageio = types.SimpleNamespace(get_writer=FakeVideoWriter)
    monkeypatch.setitem(sys.modules, 'imageio', fake_imageio)
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    result = run(projector.main, ['--network', network_pkl, '--target', target_png, '--num-steps', '3',
                                  '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    [writer] = WRITERS
    assert writer.path == str(tmp_path / 'out' / 'proj.mp4') and writer.closed
    assert len(writer.frames) == 3
    assert all(frame.shape == (16, 32, 3) and frame.dtype == np.uint8 for frame in writer.frames)
    assert np.array_equal(writer.frames[-1][:, 16:], read_png(tmp_path / 'out' / 'proj.png')[1])


def test_cli_grayscale_network(tmp_path):
    pkl = tmp_path / 'gray.pkl'
    pkl.write_bytes(pickle.dumps(dict(G_ema=make_generator(img_channels=1))))
    target_png = write_png(tmp_path / 't.png', np.random.RandomState(1).randint(0, 256, [20, 20, 3]).astype(np.uint8))
    result = run(projector.main, ['--network', str(pkl), '--target', target_png, '--num-steps', '2',
                                  '--save-video', '0', '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    for name in ['target.png', 'proj.png']:
        mode, image = read_png(tmp_path / 'out' / name)
        assert mode == 'L' and image.shape == (16, 16)


def test_cli_missing_target(network_pkl, tmp_path):
    result = run(projector.main, ['--network', network_pkl, '--target', str(tmp_path / 'nope.png'),
                                  '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 2
    assert '--target' in result.output and 'does not exist' in result.output
    assert not (tmp_path / 'out').exists()


def test_cli_unreadable_target(network_pkl, tmp_path):
    bad = tmp_path / 'notes.png'
    bad.write_text('not an image')
    result = run(projector.main, ['--network', network_pkl, '--target', str(bad), '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 2
    assert '--target' in result.output and 'notes.png' in result.output


def test_cli_conditional_network_needs_a_class(tmp_path):
    pkl = tmp_path / 'cond.pkl'
    pkl.write_bytes(pickle.dumps(dict(G_ema=make_generator(c_dim=4))))
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    args = ['--network', str(pkl), '--target', target_png, '--num-steps', '2', '--save-video', 'false']
    result = run(projector.main, args + ['--outdir', str(tmp_path / 'a')])
    assert result.exit_code == 2 and '--class' in result.output
    result = run(projector.main, args + ['--class', '7', '--outdir', str(tmp_path / 'b')])
    assert result.exit_code == 2 and '0 to 3' in result.output
    result = run(projector.main, args + ['--class', '1', '--outdir', str(tmp_path / 'c')])
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'c' / 'projected_w.npz').exists()


def test_cli_missing_network(tmp_path):
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    result = run(projector.main, ['--network', str(tmp_path / 'missing.pkl'), '--target', target_png,
                                  '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 1 and 'Cannot load network' in result.output


def test_cli_checks_the_detector_before_any_work(network_pkl, tmp_path):
    # A real run of the script on an "offline" machine (every download goes to a closed proxy port) without
    # vgg16.pt in --detector-dir: one line naming where the file goes, before the network is even loaded.
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    empty = tmp_path / 'no-detectors'
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key != projector.DETECTOR_DIR_ENV}
    env.update(PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1', HTTPS_PROXY='http://127.0.0.1:9',
               HTTP_PROXY='http://127.0.0.1:9', NO_PROXY='', DNNLIB_CACHE_DIR=str(tmp_path / 'cache'))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'projector.py'), '--network', network_pkl,
                             '--target', target_png, '--outdir', str(tmp_path / 'out'), '--device', 'cpu',
                             '--detector-dir', str(empty)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr and 'Loading network' not in result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('Error: Feature detector "vgg16.pt" is not available: ')
    assert line.endswith(f'put it at {empty / "vgg16.pt"}')
    assert not (tmp_path / 'out').exists()


def test_cli_detector_dir_option_is_used(G, network_pkl, detector_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(projector.DETECTOR_DIR_ENV)
    target_png = write_png(tmp_path / 't.png', np.full([16, 16, 3], 128, np.uint8))
    result = run(projector.main, ['--network', network_pkl, '--target', target_png, '--num-steps', '2',
                                  '--save-video', '0', '--detector-dir', detector_dir, '--outdir', str(tmp_path / 'o')])
    assert result.exit_code == 0, result.output
    assert projector.find_vgg16(detector_dir) == os.path.join(detector_dir, 'vgg16.pt')


def test_help_ends_with_examples():
    for command in (projector.main, generate.main):
        text = CliRunner().invoke(command, ['--help']).output
        examples = text[text.index('Examples:'):]
        assert text.rstrip().endswith(examples.rstrip())
        assert '\n    python ' in examples  # click kept the example lines as written.
