"""LPIPS-AlexNet v0.1 and mse (training/lpips.py): parameter counts, metric properties, the input constants and
the distance in closed form, small images, weight files in the published layouts and every bad-file message.

No test downloads anything: the weights are random tensors written in torchvision's and lpips' key layouts."""

import math

import pytest
import torch
import torch.nn.functional as F

from training import lpips

pytestmark = pytest.mark.usefixtures('one_thread')


def random_trunk(seed=0):
    """A state dict in the layout of torchvision's alexnet-owt-7be5be79.pth, classifier keys included."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in lpips.TRUNK_SHAPES.items():
        if key.endswith('.weight'):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2 / fan_in)
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.05
    sd['classifier.1.weight'] = torch.randn(8, 16, generator=g)   # Ignored, as the real 4096x9216 one is.
    sd['classifier.1.bias'] = torch.randn(8, generator=g)
    return sd


def random_lin(seed=1):
    """A state dict in the layout of the lpips package's weights/v0.1/alex.pth: non-negative [1, C, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {key: torch.rand(shape, generator=g) for key, shape in lpips.LIN_SHAPES.items()}


@pytest.fixture(scope='module')
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('lpips-weights')
    trunk, lin = random_trunk(), random_lin()
    trunk_path, lin_path = str(folder / lpips.TRUNK_FILE), str(folder / 'alex.pth')
    torch.save(trunk, trunk_path)
    torch.save(lin, lin_path)
    return dict(trunk=trunk, lin=lin, trunk_path=trunk_path, lin_path=lin_path, folder=folder)


@pytest.fixture(scope='module')
def metric(weight_files):
    return lpips.reconstruction_distance('lpips', (weight_files['trunk_path'], weight_files['lin_path']))


def images(n=4, size=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand([n, 3, size, size], generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


# ----------------------------------------------------------------------------
# Structure and metric properties.

def test_parameter_counts_and_frozen(metric):
    trunk = sum(p.numel() for conv in metric.convs for p in conv.parameters())
    lin = sum(p.numel() for conv in metric.lins for p in conv.parameters())
    assert trunk == 2_469_696
    assert lin == 64 + 192 + 384 + 256 + 256 == 1_152
    assert sum(p.numel() for p in metric.parameters()) == trunk + lin
    assert not any(p.requires_grad for p in metric.parameters())
    assert [conv.weight.shape[1] for conv in metric.lins] == list(lpips.TAP_CHANNELS)


def test_tap_shapes(metric):
    taps = metric.taps(images(n=2, size=64))
    assert [list(t.shape) for t in taps] == [[2, 64, 15, 15], [2, 192, 7, 7], [2, 384, 3, 3], [2, 256, 3, 3],
                                             [2, 256, 3, 3]]


def test_identical_images_are_at_distance_zero(metric):
    x = images()
    d = metric(x, x.clone())
    assert d.shape == (4,) and d.dtype == torch.float32
    assert torch.equal(d, torch.zeros(4))


def test_nonnegative_and_symmetric(metric):
    x, y = images(seed=1), images(seed=2)
    d_xy, d_yx = metric(x, y), metric(y, x)
    assert d_xy.shape == (4,)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    # Per sample: each distance depends on its own pair only.
    torch.testing.assert_close(metric(x[1:2], y[1:2]), d_xy[1:2], rtol=1e-5, atol=0)


def test_gradients_reach_both_inputs(metric):
    x = images(n=2, seed=3).requires_grad_(True)
    y = images(n=2, seed=4).requires_grad_(True)
    metric(x, y).sum().backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


def test_directional_derivative_float64(metric):
    x, y = images(n=1, seed=5, dtype=torch.float64), images(n=1, seed=6, dtype=torch.float64)
    v = images(n=1, seed=7, dtype=torch.float64)
    x.requires_grad_(True)
    d = metric(x, y)
    assert d.dtype == torch.float64
    (grad,) = torch.autograd.grad(d.sum(), x)
    h = 1e-6
    with torch.no_grad():
        numeric = (metric(x + h * v, y) - metric(x - h * v, y)).sum() / (2 * h)
    torch.testing.assert_close(numeric, (grad * v).sum(), rtol=1e-5, atol=1e-9)


def test_dead_taps_give_zero_gradients_not_nan(weight_files):
    # With very negative biases every ReLU is off: the channel norm is 0 there, and sqrt'(0) must not leak NaN.
    trunk = {k: (torch.full_like(v, -100.0) if k.endswith('.bias') else v) for k, v in weight_files['trunk'].items()}
    metric = lpips.LPIPSAlex({**trunk, **weight_files['lin']})
    x = images(n=1, seed=8).requires_grad_(True)
    d = metric(x, images(n=1, seed=9))
    d.backward()
    assert torch.equal(d, torch.zeros(1))
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------
# The published constants, in closed form.

def picking_weights(lin0_channel_weights=(1.0, 1.0, 1.0), bias=0.0):
    """conv0 copies input channel c (the centre pixel of its 11x11 window) to output channel c < 3, with `bias`
    on those three channels; only lin0 is non-zero. The rest of the trunk is random and does not matter."""
    sd = {**random_trunk(), **random_lin()}
    w0 = torch.zeros(lpips.TRUNK_SHAPES['features.0.weight'])
    b0 = torch.zeros(lpips.TRUNK_SHAPES['features.0.bias'])
    for c in range(3):
        w0[c, c, 5, 5] = 1.0
        b0[c] = bias
    sd['features.0.weight'], sd['features.0.bias'] = w0, b0
    for k, key in enumerate(lpips.LIN_SHAPES):
        sd[key] = torch.zeros(lpips.LIN_SHAPES[key])
        if k == 0:
            sd[key][0, :3, 0, 0] = torch.tensor(lin0_channel_weights)
    return sd


def test_first_tap_applies_shift_and_scale():
    metric = lpips.LPIPSAlex(picking_weights(bias=10.0))    # The bias keeps every ReLU on.
    x = images(n=2, size=64, seed=10)
    tap0 = metric.taps(x)[0]
    # Output position i of the k11 s4 p2 conv sees input pixels 4i-2 ... 4i+8, centre 4i+3.
    centres = x[:, :, 3:60:4, 3:60:4]
    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(tap0[:, :3], (centres - shift) / scale + 10.0, rtol=1e-6, atol=1e-6)
    assert torch.equal(tap0[:, 3:], torch.zeros_like(tap0[:, 3:]))


def test_trunk_pools_take_3x3_maxima_with_stride_2(weight_files):
    # conv1 and conv2 copy channel 0 (the centre of their windows) to channel 0, so after the ReLUs (a no-op on
    # the non-negative tap 0) taps 1 and 2 hold the 3x3 stride-2 maxima of the tap before them, in channel 0.
    sd = {**weight_files['trunk'], **weight_files['lin']}
    for key, centre in (('features.3', 2), ('features.6', 1)):
        w = torch.zeros(lpips.TRUNK_SHAPES[f'{key}.weight'])
        w[0, 0, centre, centre] = 1.0
        sd[f'{key}.weight'], sd[f'{key}.bias'] = w, torch.zeros(lpips.TRUNK_SHAPES[f'{key}.bias'])
    taps = lpips.LPIPSAlex(sd).taps(images(n=1, size=64, seed=22))
    for before, after in ((taps[0][0, 0], taps[1][0, 0]), (taps[1][0, 0], taps[2][0, 0])):
        n_out = (before.shape[0] - 3) // 2 + 1
        expected = torch.tensor([[before[2 * i:2 * i + 3, 2 * j:2 * j + 3].max().item() for j in range(n_out)]
                                 for i in range(n_out)])
        assert after.shape == expected.shape
        assert before.max() > 0 and torch.equal(after, expected)


def test_distance_of_constant_images_in_closed_form():
    lin_w = (0.5, 2.0, 3.0)
    metric = lpips.LPIPSAlex(picking_weights(lin0_channel_weights=lin_w))
    a, b = (0.0, 0.0, 0.0), (0.5, -0.1, 0.9)

    def unit(rgb):
        # Tap 0 at every position: ReLU((v - shift) / scale) on three channels, zero on the other 61.
        t = [max(0.0, (v - s) / k) for v, s, k in zip(rgb, lpips.SHIFT, lpips.SCALE, strict=True)]
        norm = math.sqrt(sum(u * u for u in t))
        return [u / (norm + 1e-10) for u in t]

    ua, ub = unit(a), unit(b)
    expected = sum(w * (p - q) ** 2 for w, p, q in zip(lin_w, ua, ub, strict=True))
    x = torch.tensor(a).reshape(1, 3, 1, 1).expand(1, 3, 64, 64)
    y = torch.tensor(b).reshape(1, 3, 1, 1).expand(1, 3, 64, 64)
    d = metric(x, y)
    assert expected > 0.1
    torch.testing.assert_close(d, torch.tensor([expected]), rtol=1e-5, atol=0)


def test_spatial_mean_and_sum_over_taps(weight_files):
    # Doubling every lin weight doubles the distance, and the distance is the sum of what each tap gives alone.
    sd = {**weight_files['trunk'], **weight_files['lin']}
    doubled = {k: (2 * v if k.startswith('lin') else v) for k, v in sd.items()}
    x, y = images(n=2, seed=11), images(n=2, seed=12)
    torch.testing.assert_close(lpips.LPIPSAlex(doubled)(x, y), 2 * lpips.LPIPSAlex(sd)(x, y), rtol=1e-6, atol=0)
    per_tap = []
    for k in range(5):
        only_k = {key: (v if not key.startswith('lin') or key.startswith(f'lin{k}.') else torch.zeros_like(v))
                  for key, v in sd.items()}
        per_tap.append(lpips.LPIPSAlex(only_k)(x, y))
    torch.testing.assert_close(sum(per_tap), lpips.LPIPSAlex(sd)(x, y), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------
# Small images.

@pytest.mark.parametrize('size', [16, 32])
def test_small_images_are_upsampled_to_min_size(metric, size):
    x, y = images(n=2, size=size, seed=13), images(n=2, size=size, seed=14)
    d = metric(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(metric(x, x), torch.zeros(2))
    up = lambda t: F.interpolate(t, size=(64, 64), mode='bilinear', align_corners=False)  # noqa: E731
    unscaled = lpips.LPIPSAlex(metric.published_state_dict(), min_size=0)
    torch.testing.assert_close(d, unscaled(up(x), up(y)), rtol=1e-5, atol=0)


def test_min_size_zero_runs_from_31_pixels_and_says_so_below(weight_files):
    metric = lpips.LPIPSAlex({**weight_files['trunk'], **weight_files['lin']}, min_size=0)
    d = metric(images(n=1, size=31, seed=15), images(n=1, size=31, seed=16))
    assert torch.isfinite(d).all() and metric.taps(images(n=1, size=31))[-1].shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match=r'at least 31x31 pixels, got 30x30') as info:
        metric(images(n=1, size=30), images(n=1, size=30))
    assert '\n' not in str(info.value)


def test_non_square_small_images_keep_their_aspect(metric):
    x = torch.zeros([1, 3, 16, 32])
    assert metric.prepare(x).shape == (1, 3, 64, 128)
    assert metric.prepare(torch.zeros([1, 3, 64, 80])).shape == (1, 3, 64, 80)


# ----------------------------------------------------------------------------
# Weight files.

def assert_weights_landed(metric, trunk, lin):
    for spec, conv in zip(lpips.TRUNK, metric.convs, strict=True):
        assert torch.equal(conv.weight, trunk[f'{spec.key}.weight'])
        assert torch.equal(conv.bias, trunk[f'{spec.key}.bias'])
        assert conv.stride == spec.stride and conv.padding == spec.padding
    for k, conv in enumerate(metric.lins):
        assert torch.equal(conv.weight, lin[f'lin{k}.model.1.weight']) and conv.bias is None


def test_loading_a_pair_puts_each_tensor_in_place(weight_files, metric):
    assert_weights_landed(metric, weight_files['trunk'], weight_files['lin'])
    assert [conv.pool_before for conv in metric.convs] == [False, True, True, False, False]


def test_combined_file_round_trip(weight_files, metric, tmp_path):
    path = tmp_path / 'lpips_alex.pt'
    lpips.save_combined((weight_files['trunk_path'], weight_files['lin_path']), path)
    data = torch.load(path, weights_only=True)
    assert set(data) == set(lpips.TRUNK_SHAPES) | set(lpips.LIN_SHAPES)   # The classifier is dropped.
    combined = lpips.reconstruction_distance('lpips', str(path))
    assert_weights_landed(combined, weight_files['trunk'], weight_files['lin'])
    x, y = images(n=2, seed=17), images(n=2, seed=18)
    assert torch.equal(combined(x, y), metric(x, y))
    from_module = lpips.LPIPSAlex(metric.published_state_dict())
    assert_weights_landed(from_module, weight_files['trunk'], weight_files['lin'])


def write(path, obj):
    torch.save(obj, path)
    return str(path)


def bad_cases(files, tmp_path):
    """(name, weights argument, exception type, text the one-line message must hold)."""
    trunk, lin = files['trunk'], files['lin']
    text_file = tmp_path / 'notes.txt'
    text_file.write_text('these are not weights\n')
    no_bias = {k: v for k, v in trunk.items() if k != 'features.8.bias'}
    narrow = {**lin, 'lin2.model.1.weight': torch.rand(1, 383, 1, 1)}
    negative = {**lin, 'lin3.model.1.weight': -torch.rand(1, 256, 1, 1)}
    return [
        ('missing file', (str(tmp_path / 'nowhere.pth'), files['lin_path']), FileNotFoundError,
         ['no such file', 'nowhere.pth', lpips.TRUNK_URL]),
        ('missing lin file', (files['trunk_path'], str(tmp_path / 'alex.pth')), FileNotFoundError,
         ['no such file', 'weights/v0.1/alex.pth']),
        ('not a torch file', (str(text_file), files['lin_path']), ValueError,
         ['notes.txt', 'not a PyTorch weights file', lpips.TRUNK_URL]),
        ('not a state dict', (files['trunk_path'], write(tmp_path / 'tensor.pth', torch.zeros(3))), ValueError,
         ['tensor.pth', 'not a state dict', 'alex.pth']),
        ('missing key', (write(tmp_path / 'no_bias.pth', no_bias), files['lin_path']), ValueError,
         ['no_bias.pth', "no key 'features.8.bias'", lpips.TRUNK_URL]),
        ('wrong shape', (files['trunk_path'], write(tmp_path / 'narrow.pth', narrow)), ValueError,
         ['narrow.pth', "'lin2.model.1.weight' has shape [1, 383, 1, 1], expected [1, 384, 1, 1]", 'alex.pth']),
        ('swapped pair', (files['lin_path'], files['trunk_path']), ValueError,
         ["no key 'features.0.weight'", "'lin0.model.1.weight'", lpips.TRUNK_URL]),
        ('trunk file alone', files['trunk_path'], ValueError,
         ["no key 'lin0.model.1.weight'", lpips.TRUNK_URL, 'alex.pth', 'save_combined']),
        ('negative lin', (files['trunk_path'], write(tmp_path / 'negative.pth', negative)), ValueError,
         ['negative.pth', "'lin3.model.1.weight'", 'non-negative']),
    ]


@pytest.mark.parametrize('case', range(9))
def test_each_bad_file_gives_one_clear_line(weight_files, tmp_path, case):
    name, weights, error, parts = bad_cases(weight_files, tmp_path)[case]
    with pytest.raises(error) as info:
        lpips.reconstruction_distance('lpips', weights)
    message = str(info.value)
    assert type(info.value) is error, name
    assert '\n' not in message, name
    for part in parts:
        assert part in message, f'{name}: {part!r} not in {message!r}'


def test_bad_arguments(weight_files):
    with pytest.raises(ValueError, match=r"unknown reconstruction distance 'l2'; valid choices: lpips, mse"):
        lpips.reconstruction_distance('l2')
    with pytest.raises(ValueError, match=r"LPIPS needs weights.*alexnet-owt-7be5be79\.pth.*'mse'"):
        lpips.reconstruction_distance('lpips')
    with pytest.raises(ValueError, match=r'expected a path, a \(trunk_path, lin_path\) pair'):
        lpips.reconstruction_distance('lpips', (weight_files['trunk_path'],))


def test_installed_lin_file_when_present():
    path = lpips.installed_lin_file()
    if path is None:
        pytest.skip('the lpips package is not installed (pip install --no-deps lpips)')
    lin = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in lin.items()} == lpips.LIN_SHAPES
    assert all((v >= 0).all() for v in lin.values())


# ----------------------------------------------------------------------------
# mse, and CUDA.

def test_mse_closed_form():
    mse = lpips.reconstruction_distance('mse')
    x = images(n=3, size=16, seed=19)
    torch.testing.assert_close(mse(x, x + 1), torch.ones(3))
    y = x.clone()
    y[1, 2, 5, 7] += 4.0       # One pixel of one channel of sample 1: 16 / (3 * 16 * 16).
    torch.testing.assert_close(mse(x, y), torch.tensor([0.0, 16 / 768, 0.0]))
    assert not list(mse.parameters())


@pytest.mark.cuda
def test_cuda_matches_cpu(weight_files, metric):
    gpu = lpips.reconstruction_distance('lpips', (weight_files['trunk_path'], weight_files['lin_path']),
                                        device='cuda')
    # Full float32 on the GPU: cuDNN may otherwise use TF32 (10-bit mantissa) for the convolutions.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _check_cuda_against_cpu(gpu, metric)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _check_cuda_against_cpu(gpu, metric):
    x = images(n=2, size=32, seed=20).requires_grad_(True)
    y = images(n=2, size=32, seed=21)
    x_gpu = x.detach().cuda().requires_grad_(True)
    d_cpu, d_gpu = metric(x, y), gpu(x_gpu, y.cuda())
    assert d_gpu.device.type == 'cuda' and d_gpu.dtype == torch.float32
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-6)
    d_cpu.sum().backward()
    d_gpu.sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=1e-3, atol=1e-4 * x.grad.abs().max().item())
    torch.testing.assert_close(gpu(x_gpu, x_gpu).cpu(), torch.zeros(2), rtol=0, atol=1e-6)
