"""The ADA augmentation pipeline: identities and closed forms of each transform, determinism, derivatives to
second order, pickling, and the preset table."""

import importlib.util
import math
import os
import pickle
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc, training_stats
from torch_utils.ops import grid_sample_gradfix, upfirdn2d
from training import augment, training_loop
from training.loss import STAT_SIGNS_REAL

pytestmark = pytest.mark.usefixtures('one_thread')


def _images(channels=3, n=4, size=16, dtype=torch.float32, seed=123):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn([n, channels, size, size], generator=generator, dtype=torch.float64).to(dtype)


def _pipe(p=1.0, **kwargs):
    pipe = augment.AugmentPipe(**kwargs)
    pipe.p.copy_(torch.as_tensor(p))
    return pipe


def _run(pipe, images, seed=0, debug_percentile=None):
    torch.manual_seed(seed)
    return pipe(images, debug_percentile=debug_percentile)

# ----------------------------------------------------------------------------
# Identity at p = 0 and each transform alone.


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_p0_is_exactly_the_identity(channels, dtype):
    images = _images(channels, dtype=dtype)
    every = {name: 1 for name in augment.ALL_TRANSFORMS}
    for pipe in [_pipe(0.0, **every), augment.augment_pipe_from_preset('bgcfnc')]:
        assert torch.equal(_run(pipe, images), images)
    # Transforms whose multiplier times p is 0 stay off even at p = 1.
    assert torch.equal(_run(_pipe(1.0), images), images)


@pytest.mark.parametrize('name', augment.ALL_TRANSFORMS)
@pytest.mark.parametrize('channels', [1, 3])
def test_each_transform_alone_changes_the_images(name, channels):
    images = _images(channels, n=8)
    pipe = _pipe(1.0, **{name: 1})
    changed = False
    for seed in range(3):
        out = _run(pipe, images, seed=seed)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert torch.isfinite(out).all()
        changed = changed or not torch.allclose(out, images, atol=1e-4)
    if channels == 1 and name in ('hue', 'saturation'):
        # Grey pixels lie on the luma axis, which hue rotation and saturation keep fixed.
        assert not changed
    else:
        assert changed


def test_transforms_at_p1_are_applied_to_every_sample():
    images = _images(3, n=8)
    out = _run(_pipe(1.0, brightness=1), images)
    shift = (out - images).mean(dim=[1, 2, 3])
    assert (shift.abs() > 0).all()


def test_geometric_stage_handles_non_square_images():
    images = torch.randn([3, 3, 12, 20])
    out = _run(_pipe(1.0, **augment.AUGPIPE_SPECS['bg']), images)
    assert out.shape == images.shape and torch.isfinite(out).all()

# ----------------------------------------------------------------------------
# Pixel blitting is exact.


def test_xflip_gives_the_mirror_image_or_the_original():
    images = _images(3, n=16)
    out = _run(_pipe(1.0, xflip=1), images)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_xflip_with_controlled_draws_is_an_involution():
    images = _images(3)
    pipe = _pipe(0.0, xflip=1)      # A debug percentile applies the transform regardless of p.
    once = pipe(images, debug_percentile=0.9)
    assert torch.equal(once, images.flip(3))
    assert torch.equal(pipe(once, debug_percentile=0.9), images)
    assert torch.equal(pipe(images, debug_percentile=0.1), images)


def test_rotate90_four_times_is_the_identity():
    images = _images(1)
    pipe = _pipe(1.0, rotate90=1)
    for percentile, quarter_turns in [(0.3, 1), (0.6, 2), (0.9, 3), (1.0, 3)]:
        # Angles grow from +x towards +y; with y pointing down the image turns clockwise, torch.rot90's k < 0.
        out = pipe(images, debug_percentile=percentile)
        assert torch.equal(out, torch.rot90(images, -quarter_turns, dims=(2, 3)))
    out = images
    for _ in range(4):
        out = pipe(out, debug_percentile=0.3)
    assert torch.equal(out, images)


def test_integer_translation_moves_whole_pixels():
    images = _images(3)
    pipe = _pipe(1.0, xint=1)
    out = pipe(images, debug_percentile=1.0)     # The largest shift: round(0.125 * 16) = 2 pixels.
    assert torch.equal(out[:, :, 2:, 2:], images[:, :, :-2, :-2])
    # Pixels shifted in from outside are mirrored: column 1 is column 1 of the input, column 0 is column 2.
    assert torch.equal(out[:, :, 2:, 0], images[:, :, :-2, 2])


def test_resampling_reproduces_integer_shifts_and_the_identity():
    # Upsampling with the wavelet and downsampling with its mirror is exact; whole-pixel shifts commute with it.
    images = _images(3, dtype=torch.float64)
    pipe = _pipe(1.0)
    eye = torch.eye(3).expand(4, 3, 3).clone()
    shift = eye.clone()
    shift[:, 0, 2] = 1                          # Read one pixel to the right.
    out = pipe._resample(images, shift)
    # Float32 taps: the reconstruction is exact up to their rounding.
    assert torch.allclose(out[..., :-4], images[..., 1:-3], atol=2e-6)
    near_identity = eye.clone()
    near_identity[:, 0, 2] = 1e-30              # Forces the resampling path.
    assert torch.allclose(pipe._resample(images, near_identity), images, atol=2e-6)

# ----------------------------------------------------------------------------
# Determinism and the debug percentile.


def test_output_is_deterministic_for_a_seed():
    images = _images(3)
    pipe = _pipe(0.7, **augment.AUGPIPE_SPECS['bgcfnc'])
    a = _run(pipe, images, seed=5)
    b = _run(pipe, images, seed=5)
    c = _run(pipe, images, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize('name', [n for n in augment.ALL_TRANSFORMS if n != 'noise'])
def test_debug_percentile_replaces_every_draw(name):
    images = _images(3, n=2)
    pipe = _pipe(0.0, **{name: 1})
    a = _run(pipe, images, seed=1, debug_percentile=0.8)
    b = _run(pipe, images, seed=2, debug_percentile=0.8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, images, atol=1e-4)


def test_debug_percentile_sets_the_noise_strength():
    images = torch.zeros([2, 3, 64, 64])
    percentile = 0.5                            # Median of |N(0, 1)|: 0.6745.
    out = _run(_pipe(0.0, noise=1, noise_std=1), images, debug_percentile=percentile)
    assert abs(out.std().item() - statistics.NormalDist().inv_cdf(0.75)) < 0.02


def test_brightness_percentile_shifts_the_mean():
    images = _images(3)
    percentile = statistics.NormalDist().cdf(1.0)       # One standard deviation: offset = brightness_std.
    out = _pipe(0.0, brightness=1, brightness_std=0.3)(images, debug_percentile=percentile)
    assert torch.allclose(out - images, torch.full_like(images, 0.3), atol=1e-5)


def test_contrast_percentile_scales_the_images():
    images = _images(3)
    percentile = statistics.NormalDist().cdf(-1.0)      # log2(contrast) = -contrast_std = -1.
    out = _pipe(0.0, contrast=1, contrast_std=1)(images, debug_percentile=percentile)
    assert torch.allclose(out, images / 2, atol=1e-5)


def test_debug_percentile_is_validated():
    with pytest.raises(ValueError, match='debug_percentile'):
        _pipe(xflip=1)(_images(), debug_percentile=1.5)

# ----------------------------------------------------------------------------
# Colour matrices.


def test_colour_matrices():
    v = torch.tensor([1.0, 1.0, 1.0, 0.0]) / np.sqrt(3)
    eye = torch.eye(4)
    pipe = _pipe(0.0, saturation=1, saturation_std=0)
    assert torch.allclose(pipe.draw_color(4, 'cpu', debug_percentile=0.9), eye, atol=1e-6)

    flip = _pipe(0.0, lumaflip=1).draw_color(2, 'cpu', debug_percentile=0.9)
    assert torch.allclose(flip, eye - 2 * torch.outer(v, v), atol=1e-6)
    assert torch.allclose(flip @ flip, eye.expand(2, 4, 4), atol=1e-6)

    hue = _pipe(0.0, hue=1).draw_color(2, 'cpu', debug_percentile=0.7)
    rgb = hue[:, :3, :3]
    assert torch.allclose(rgb @ rgb.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6)   # Orthogonal.
    assert torch.allclose(hue @ v, v.expand(2, 4), atol=1e-6)                                    # Keeps luma.
    assert torch.allclose(hue[:, 3], eye[3].expand(2, 4))


def test_colour_on_grey_images():
    images = _images(1)
    assert torch.equal(_pipe(0.0, lumaflip=1)(images, debug_percentile=0.9), -images)
    out = _pipe(0.0, hue=1, saturation=1)(images, debug_percentile=0.8)
    assert torch.allclose(out, images, atol=1e-5)
    with pytest.raises(ValueError, match='channels'):
        _pipe(hue=1)(torch.zeros([1, 2, 8, 8]))

# ----------------------------------------------------------------------------
# Filters.


def test_filter_buffers():
    pipe = _pipe()
    assert pipe.Hz_geom.shape == (12,) and abs(pipe.Hz_geom.sum().item() - 1) < 1e-6
    bank = pipe.Hz_fbank.double()
    assert bank.shape == (4, 43)
    assert torch.allclose(bank, bank.flip(1))                       # Zero phase.
    impulse = torch.zeros(43, dtype=torch.float64)
    impulse[21] = 1
    assert torch.allclose(bank.sum(dim=0), impulse, atol=1e-6)      # The bands add up to the identity.
    # Each band passes its own octave: [0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi].
    response = torch.fft.rfft(bank, n=1024).abs()
    peaks = response.argmax(dim=1).tolist()
    edges = [0, 64, 128, 256, 513]
    assert all(lo <= peak <= hi for peak, lo, hi in zip(peaks, edges[:-1], edges[1:], strict=True))


def test_filter_gains_keep_the_expected_power():
    pipe = _pipe(0.0, imgfilter=1, imgfilter_bands=(0, 1, 0, 0))
    gains = pipe.draw_filter_gains(3, 'cpu', debug_percentile=0.9)
    power = torch.tensor(augment.FILTER_BAND_POWER)
    assert torch.allclose((power * gains.square()).sum(dim=1), torch.ones(3), atol=1e-6)
    assert (gains[:, 1] > gains[:, 0]).all()


def test_unit_filter_gains_leave_the_images_unchanged():
    images = _images(3)
    out = _pipe(0.0, imgfilter=1)._apply_filter(images, torch.ones([4, 4]))
    assert torch.equal(out, images)


def test_cutout_zeroes_a_square():
    images = torch.ones([2, 1, 16, 16])
    out = _pipe(0.0, cutout=1, cutout_size=0.5)(images, debug_percentile=0.5)
    assert (out[:, :, 4:12, 4:12] == 0).all()
    assert out.sum().item() == 2 * (256 - 64)

# ----------------------------------------------------------------------------
# Derivatives (R1 differentiates through the augmentation of reals, with create_graph=True).


@pytest.mark.parametrize('gradfix', [False, True])
def test_second_derivatives_through_the_geometric_path(monkeypatch, gradfix):
    monkeypatch.setattr(grid_sample_gradfix, 'enabled', gradfix)
    pipe = _pipe(1.0, **augment.AUGPIPE_SPECS['geom'], xflip=1)
    images = _images(1, n=2, size=6, dtype=torch.float64).requires_grad_(True)

    def fn(x):
        torch.manual_seed(4)    # The same draws on every call.
        return pipe(x)

    assert torch.autograd.gradcheck(fn, [images])
    assert torch.autograd.gradgradcheck(fn, [images], fast_mode=True)


def test_second_derivatives_through_the_whole_pipeline():
    pipe = _pipe(0.8, **augment.AUGPIPE_SPECS['bgcfnc'])
    images = _images(3, n=2, size=8, dtype=torch.float64).requires_grad_(True)

    def fn(x):
        torch.manual_seed(7)
        return pipe(x)

    assert torch.autograd.gradcheck(fn, [images], fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, [images], fast_mode=True)

# ----------------------------------------------------------------------------
# Feature maps (GGDR): the geometric transforms of the images, at each feature's own size.

# Only small geometric transforms, so that the centre of the output reads the centre of the input.
SMALL_GEOMETRY = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, scale_std=0.05,
                      rotate_max=0.05, aniso_std=0.05, xfrac_std=0.03)


def _smooth_images(n, channels, size, seed=0):
    """Sums of four plane waves of at most ~1.4 cycles per image: smooth enough that box downsampling and
    resampling nearly commute."""
    generator = torch.Generator().manual_seed(seed)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing='ij')
    out = torch.zeros([n, channels, size, size], dtype=torch.float64)
    for _ in range(4):
        fx, fy = (torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
        phase = torch.rand([n, channels, 1, 1], generator=generator, dtype=torch.float64) * (2 * math.pi)
        out += torch.cos(2 * math.pi * (fx * x + fy * y) + phase)
    return out.float()


def _run_with_features(pipe, images, features, seed=0, debug_percentile=None):
    torch.manual_seed(seed)
    return pipe(images, features=features, debug_percentile=debug_percentile)


def test_features_at_p0_are_exactly_unchanged():
    images, features = _images(3), _images(16, size=8, seed=5)
    every = {name: 1 for name in augment.ALL_TRANSFORMS}
    for pipe in [_pipe(0.0, **every), _pipe(1.0), _pipe(1.0, **augment.AUGPIPE_SPECS['color'])]:
        out, out_features = _run_with_features(pipe, images, features)
        assert torch.equal(out_features, features)
    assert not torch.allclose(out, images, atol=1e-3)     # The last pipe changes the colours only.


@pytest.mark.parametrize('preset', ['blit', 'geom', 'bgcfnc'])
@pytest.mark.parametrize('p', [0.0, 0.6, 1.0])
def test_features_change_neither_the_images_nor_the_random_state(preset, p):
    images = _images(3)
    pipe = _pipe(p, **augment.AUGPIPE_SPECS[preset])
    plain = _run(pipe, images, seed=2)
    after_plain = torch.get_rng_state()
    assert torch.equal(_run_with_features(pipe, images, None, seed=2), plain)
    out, _ = _run_with_features(pipe, images, [_images(8, size=8), _images(4, size=4)], seed=2)
    assert torch.equal(out, plain)
    assert torch.equal(torch.get_rng_state(), after_plain)    # No draw of its own.


@pytest.mark.parametrize('preset', ['blit', 'geom', 'bg'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_a_feature_that_is_the_image_follows_the_image_path(preset, seed):
    images = _images(3, size=16)
    pipe = _pipe(1.0, **augment.AUGPIPE_SPECS[preset])
    out, out_features = _run_with_features(pipe, images, images, seed=seed)
    assert not torch.equal(out, images)
    assert torch.equal(out_features, out)
    # Colour, filtering, noise and cutout draw after the geometric stage: the same seed gives the same
    # geometry, which the features follow, while the images also get the other stages.
    full = _pipe(1.0, **augment.AUGPIPE_SPECS['bgcfnc'])
    out_full, features_full = _run_with_features(full, images, images, seed=seed)
    if preset == 'bg':
        assert torch.equal(features_full, out)
        assert not torch.allclose(out_full, out, atol=1e-3)


@pytest.mark.parametrize('factor', [2, 4])
def test_flips_and_quarter_turns_are_exact_at_any_feature_size(factor):
    images, features = _images(3, size=16), _images(5, size=16 // factor)
    out, out_features = _pipe(0.0, xflip=1)(images, features=features, debug_percentile=0.9)
    assert torch.equal(out, images.flip(3)) and torch.equal(out_features, features.flip(3))
    for percentile, quarter_turns in [(0.3, 1), (0.6, 2), (0.9, 3)]:
        _, out_features = _pipe(0.0, rotate90=1)(images, features=features, debug_percentile=percentile)
        assert torch.equal(out_features, torch.rot90(features, -quarter_turns, dims=(2, 3)))


def test_integer_translations_scale_to_the_feature_size():
    # The largest shift, round(0.125 * 16) = 2 image pixels, is 1 pixel at half size: a whole-pixel move.
    images, features = _images(3, size=16), _images(5, size=8)
    _, out_features = _pipe(0.0, xint=1)(images, features=features, debug_percentile=1.0)
    assert torch.equal(out_features[:, :, 1:, 1:], features[:, :, :-1, :-1])
    assert torch.equal(out_features[:, :, 1:, 0], features[:, :, :-1, 1])       # Mirrored in.

    # At quarter size it is half a pixel, which the resampling interpolates; it moves a linear ramp by
    # exactly 0.5 * slope away from the borders (where the mirror padding bends the ramp).
    images = torch.zeros([2, 3, 128, 128])
    r = torch.arange(32, dtype=torch.float32)
    ramp = (0.3 * r.reshape(1, 1, 1, 32) + 0.7 * r.reshape(1, 1, 32, 1)).expand(2, 2, 32, 32)
    pipe = _pipe(0.0, xint=1, xint_max=1 / 64)                                 # 2 image pixels.
    out, out_features = pipe(images, features=ramp, debug_percentile=1.0)
    inner = (..., slice(6, -6), slice(6, -6))
    assert torch.allclose(out_features[inner], ramp[inner] - 0.5 * (0.3 + 0.7), atol=1e-5, rtol=0)


@pytest.mark.parametrize('factor, atol', [(2, 0.03), (4, 0.1)])
def test_features_at_lower_resolution_match_the_downsampled_augmented_images(factor, atol):
    # Augmenting a box-downsampled image nearly equals box-downsampling the augmented image (measured: at most
    # 0.013 at half and 0.05 at quarter size on values up to 4, in the centre, which the borders' mirror
    # padding does not reach). Rounding the scaled integer shifts instead gives at least 0.28, leaving
    # the translations unscaled at least 0.68.
    images = _smooth_images(8, 3, 64)
    pipe = _pipe(1.0, **SMALL_GEOMETRY)
    features = F.avg_pool2d(images, factor)
    for seed in range(3):
        out, out_features = _run_with_features(pipe, images, features, seed=seed)
        expected = F.avg_pool2d(out, factor)
        size = features.shape[3]
        centre = (..., slice(size // 4, size - size // 4), slice(size // 4, size - size // 4))
        assert (out_features[centre] - expected[centre]).abs().max() < atol


def test_several_features_of_different_sizes():
    images = _images(3, size=16)
    features = [_images(3, size=16, seed=1), _images(32, size=8, seed=2), _images(2, size=4, seed=3)]
    pipe = _pipe(1.0, **augment.AUGPIPE_SPECS['bgcfnc'])
    out, out_features = _run_with_features(pipe, images, features, seed=4)
    assert isinstance(out_features, list) and len(out_features) == 3
    for feature, out_feature in zip(features, out_features, strict=True):
        assert out_feature.shape == feature.shape and not torch.equal(out_feature, feature)
        out_alone, alone = _run_with_features(pipe, images, feature, seed=4)
        assert isinstance(alone, torch.Tensor) and torch.equal(alone, out_feature)
        assert torch.equal(out_alone, out)
    _, from_tuple = _run_with_features(pipe, images, tuple(features), seed=4)
    assert all(torch.equal(a, b) for a, b in zip(from_tuple, out_features, strict=True))


def test_features_are_validated():
    pipe = _pipe(1.0, xflip=1)
    with pytest.raises(ValueError, match='N = 4'):
        pipe(_images(3), features=torch.zeros([2, 8, 8, 8]))
    with pytest.raises(ValueError, match='aspect ratio'):
        pipe(_images(3), features=torch.zeros([4, 8, 8, 4]))


def test_gradients_flow_to_the_features():
    pipe = _pipe(1.0, **augment.AUGPIPE_SPECS['bg'])
    images = _images(3, n=2, size=16)
    features = _images(4, n=2, size=8, dtype=torch.float64).requires_grad_(True)

    def fn(f):
        torch.manual_seed(3)    # The same draws on every call.
        return pipe(images.double(), features=f)[1]

    assert not torch.equal(fn(features), features)
    assert torch.autograd.gradcheck(fn, [features], fast_mode=True)
    fn(features).square().sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0

# ----------------------------------------------------------------------------
# Persistence, resume and presets.


def test_pickles_and_copies_buffers():
    pipe = augment.augment_pipe_from_preset('bgc', xint_max=0.25)
    pipe.p.copy_(torch.as_tensor(0.3))
    clone = pickle.loads(pickle.dumps(pipe))
    assert type(clone).__name__ == 'AugmentPipe' and clone.init_kwargs == pipe.init_kwargs
    assert clone.xint_max == 0.25 and float(clone.p) == pytest.approx(0.3)
    images = _images(3)
    assert torch.equal(_run(clone, images, seed=3), _run(pipe, images, seed=3))

    fresh = augment.AugmentPipe()
    misc.copy_params_and_buffers(pipe, fresh, require_all=True)
    assert float(fresh.p) == pytest.approx(0.3)
    assert {name: tuple(b.shape) for name, b in fresh.named_buffers()} == {
        'p': (), 'Hz_geom': (12,), 'Hz_fbank': (4, 43)}


def test_presets_and_repr():
    assert list(augment.AUGPIPE_SPECS) == ['blit', 'geom', 'color', 'filter', 'noise', 'cutout',
                                           'bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc']
    assert augment.AUGPIPE_SPECS['bgc'] == dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1,
                                                xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1,
                                                saturation=1)
    assert len(augment.AUGPIPE_SPECS['bgcfnc']) == 15
    with pytest.raises(ValueError, match='bgcfnc'):
        augment.augment_pipe_from_preset('bgcx')
    pipe = augment.augment_pipe_from_preset('blit')
    pipe.p.copy_(torch.as_tensor(0.25))
    assert pipe.extra_repr() == 'p=0.25, xflip=1, rotate90=1, xint=1'


def test_bench_script_runs():
    # bench/ is a folder of scripts, not a package: load the file as a module of its own name.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench', 'augment.py')
    spec = importlib.util.spec_from_file_location('bench_augment', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_benchmark(['blit', 'bgc'], [16], batch=2, iters=1, warmup=0, mode='both')
    assert [(row['preset'], row['res']) for row in rows] == [('blit', 16), ('bgc', 16)]
    assert all(row['fwd_ips'] > 0 and row['r1_ips'] > 0 for row in rows)
    assert 'bgc' in bench.format_table(rows)

# ----------------------------------------------------------------------------
# ADA's controller.


@pytest.fixture
def fresh_stats():
    training_stats.reset()
    yield
    training_stats.reset()


def _report_signs(signs):
    training_stats.report(STAT_SIGNS_REAL, torch.as_tensor(signs, dtype=torch.float32))


def test_ada_controller_moves_p_by_the_closed_form(fresh_stats):
    # Every `interval` steps: p <- max(0, p + sign(mean - target) * batch * interval / (kimg * 1000)), with the
    # mean over exactly the signs reported since the previous adjustment (a tick's flush in between included).
    target, interval, kimg, batch = 0.25, 3, 0.5, 8
    unit = batch * interval / (kimg * 1000)
    ada = augment.AdaController(_pipe(p=0.0), target=target, interval=interval, kimg=kimg, batch_size=batch)
    rng = np.random.default_rng(0)
    # One window of interval * batch = 24 signs per adjustment: how many are +1, -1 and 0 (zero logits).
    windows = [(10, 14, 0),     # Mean -1/6, below the target: down, but p is 0 and stays there.
               (20, 4, 0),      # 2/3: up.
               (24, 0, 0),      # 1: up.
               (12, 12, 0),     # 0: down.
               (9, 3, 12),      # 1/4, the target itself: sign 0, p stays.
               (18, 6, 0)]      # 1/2: up.
    expected, batch_idx = 0.0, 0
    for plus, minus, zero in windows:
        signs = rng.permutation(np.array([1.0] * plus + [-1.0] * minus + [0.0] * zero))
        for step_signs in signs.reshape(interval, batch):
            _report_signs(step_signs)
            batch_idx += 1
            if batch_idx % 2 == 0:
                ada.flush()  # A tick in the middle of a window: the signs stay pending.
            ada.step(batch_idx)
            if batch_idx % interval != 0:
                assert ada.augment_pipe.p.item() == pytest.approx(expected, abs=1e-7)  # Not an adjustment step.
        expected = max(0.0, expected + float(np.sign(signs.mean() - target)) * unit)
        assert ada.augment_pipe.p.item() == pytest.approx(expected, abs=1e-6), (plus, minus, zero)
        assert ada.pending.tolist() == [0, 0, 0]
    assert expected == pytest.approx(2 * unit)  # The windows moved p: held at the clamp, up, down, held, up.


def test_ada_controller_state_dict_carries_the_pending_signs(fresh_stats, tmp_path):
    # The training state stores state_dict() and a resumed run loads it into a fresh controller in a fresh
    # process: the adjustment after the resume must see the signs of before it.
    ada = augment.AdaController(_pipe(p=0.5), target=0.25, interval=2, kimg=1, batch_size=10)
    _report_signs([1.0, 1.0, 1.0])
    ada.step(1)  # Not an adjustment step.
    ada.flush()
    state = ada.state_dict()
    assert state == dict(pending=[3.0, 3.0, 3.0]) and all(type(v) is float for v in state['pending'])
    torch.save(state, tmp_path / 'ada.pt')
    state = torch.load(tmp_path / 'ada.pt', weights_only=True)  # As the training state is read.

    def resumed(load):
        training_stats.reset()  # The resumed process starts with no statistics.
        controller = augment.AdaController(_pipe(p=0.5), target=0.25, interval=2, kimg=1, batch_size=10)
        if load:
            controller.load_state_dict(state)
        _report_signs([-1.0])
        controller.step(2)
        return controller.augment_pipe.p.item()
    # Mean of the four signs (3 - 1) / 4 = 0.5 is above the target: p goes up by 10 * 2 / 1000. Without the
    # pending signs the mean would be -1 and p would go down: the check is not vacuous.
    assert resumed(load=True) == pytest.approx(0.5 + 0.02)
    assert resumed(load=False) == pytest.approx(0.5 - 0.02)


def test_ada_controller_is_built_by_class_name(fresh_stats):
    pipe = _pipe(p=0.0)
    ada = dnnlib.util.construct_class_by_name(class_name=training_loop.ADA_CONTROLLER_CLASS, augment_pipe=pipe,
                                              target=0.6, interval=4, kimg=500, batch_size=64)
    assert type(ada) is augment.AdaController and ada.augment_pipe is pipe
    assert (ada.target, ada.interval, ada.kimg, ada.batch_size) == (0.6, 4, 500, 64)
    assert training_loop.AdaController is augment.AdaController  # The old import path still works.

# ----------------------------------------------------------------------------
# The official public helpers (SPEC §7): matrices and the wavelet table.


def test_matrix_builds_constants_and_batches():
    const = augment.matrix([1, 2, 3], [4, 5, 6], device='cpu')
    assert const.shape == (2, 3) and const.dtype == torch.float32
    assert torch.equal(const, torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    batch = augment.matrix([x, 0], [7, x * 3])
    assert batch.shape == (2, 2, 2) and batch.dtype == torch.float64  # Numbers follow the tensors' dtype.
    assert torch.equal(batch[1], torch.tensor([[2.0, 0], [7, 6]], dtype=torch.float64))


def test_transform_matrices_act_as_their_names_say():
    theta = torch.tensor([0.3, -1.2, math.pi / 2], dtype=torch.float64)
    tx, ty, sx, sy = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, -2, 0.5], [3.0, 0, -1], [2.0, 0.5, -1],
                                                                     [4.0, 1, 3]))
    point = torch.tensor([5.0, -7, 1], dtype=torch.float64)
    torch.testing.assert_close(augment.translate2d(tx, ty) @ point, torch.stack([5 + tx, -7 + ty, torch.ones(3,
                               dtype=torch.float64)], dim=1))
    torch.testing.assert_close(augment.scale2d(sx, sy) @ point, torch.stack([5 * sx, -7 * sy, torch.ones(3,
                               dtype=torch.float64)], dim=1))
    # A quarter turn maps the x axis onto the y axis (counter-clockwise for y up).
    torch.testing.assert_close(augment.rotate2d(theta)[2] @ torch.tensor([1.0, 0, 1], dtype=torch.float64),
                               torch.tensor([0.0, 1, 1], dtype=torch.float64))
    eye3 = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    for forward, inverse in [(augment.translate2d(tx, ty), augment.translate2d_inv(tx, ty)),
                             (augment.scale2d(sx, sy), augment.scale2d_inv(sx, sy)),
                             (augment.rotate2d(theta), augment.rotate2d_inv(theta))]:
        torch.testing.assert_close(forward @ inverse, eye3)
    assert torch.equal(augment.translate2d(1, 2, device='cpu'), torch.tensor([[1.0, 0, 1], [0, 1, 2], [0, 0, 1]]))
    tz, sz = torch.tensor([0.5, 1, 2], dtype=torch.float64), torch.tensor([3.0, 1, 2], dtype=torch.float64)
    point3 = torch.tensor([1.0, 2, 3, 1], dtype=torch.float64)
    torch.testing.assert_close(augment.translate3d(tx, ty, tz) @ point3, torch.stack([1 + tx, 2 + ty, 3 + tz,
                               torch.ones(3, dtype=torch.float64)], dim=1))
    torch.testing.assert_close(augment.scale3d(sx, sy, sz) @ point3, torch.stack([sx, 2 * sy, 3 * sz,
                               torch.ones(3, dtype=torch.float64)], dim=1))


def test_rotate3d_is_a_rotation_about_its_axis():
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 2, 2], [0, 0, 1], [-1, 0.5, 0.2]], dtype=torch.float64), dim=1)
    theta = torch.tensor([0.7, 0.4, -2.0], dtype=torch.float64)
    R = augment.rotate3d(v, theta)
    assert R.shape == (3, 4, 4)
    torch.testing.assert_close(R[:, :3, :3] @ R[:, :3, :3].transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R[:, :3, :3]), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(R[:, :3, :3] @ v[:, :, None], v[:, :, None])        # The axis stays.
    cos = (torch.diagonal(R[:, :3, :3], dim1=1, dim2=2).sum(1) - 1) / 2             # trace = 1 + 2 cos(theta).
    torch.testing.assert_close(cos, torch.cos(theta))
    # About the z axis it is rotate2d in the xy plane.
    torch.testing.assert_close(R[1, :2, :2], augment.rotate2d(theta[1:2])[0, :2, :2])


WAVELET_NAMES = ['haar'] + [f'db{n}' for n in range(1, 9)] + [f'sym{n}' for n in range(2, 9)]


def _vanishing_moments(name):
    return 1 if name == 'haar' else int(name.lstrip('dbsym'))


@pytest.mark.parametrize('name', WAVELET_NAMES)
def test_wavelet_lowpass_filters_are_orthogonal_with_their_vanishing_moments(name):
    assert set(augment.wavelets) == set(WAVELET_NAMES)
    h = np.asarray(augment.wavelets[name], dtype=np.float64)
    N = _vanishing_moments(name)
    assert isinstance(augment.wavelets[name], list) and h.shape == (2 * N,)
    assert abs(h.sum() - math.sqrt(2)) < 1e-12
    for m in range(N):  # Orthonormal to its shifts by even offsets: sum h[k] h[k + 2m] = delta_m.
        assert abs(np.dot(h[:h.size - 2 * m], h[2 * m:]) - (m == 0)) < 1e-11, m
    # N vanishing moments: the high-pass g[k] = (-1)^k h[k] annihilates polynomials of degree < N, i.e. H(z) has
    # an N-fold zero at z = -1.
    k = np.arange(h.size, dtype=np.float64)
    for p in range(N):
        terms = (-1) ** k * k ** p * h
        assert abs(terms.sum()) < 1e-11 * np.abs(terms).sum(), p
    if name.startswith('sym'):
        # A symlet is another spectral factor of the same |H|^2: the same autocorrelation as dbN.
        db = np.asarray(augment.wavelets[f'db{N}'])
        np.testing.assert_allclose(np.correlate(h, h, 'full'), np.correlate(db, db, 'full'), atol=1e-11)
    if name.startswith('db') and N > 1:
        # Listed as decomposition filters: the time reverse of the minimum-phase factor, so all zeros of H
        # other than those at z = -1 lie outside the unit circle.
        zeros = np.roots(h)
        assert all(abs(z) > 1 for z in zeros if abs(z + 1) > 0.2), zeros


def test_the_pipe_filters_come_from_the_table():
    pipe = augment.AugmentPipe()
    assert torch.equal(pipe.Hz_geom, upfirdn2d.setup_filter(augment.wavelets['sym6']))  # Normalized to sum 1.
    bank = augment.wavelet_filter_bank(augment.wavelets['sym2'], 4)
    assert torch.equal(pipe.Hz_fbank, torch.as_tensor(bank, dtype=torch.float32))
    # The bank splits the spectrum: its bands add up to the identity filter.
    identity = np.zeros(bank.shape[1])
    identity[bank.shape[1] // 2] = 1
    np.testing.assert_allclose(bank.sum(0), identity, atol=1e-12)
