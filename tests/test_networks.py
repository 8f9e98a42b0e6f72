"""training.networks: the exact parameter counts of SPEC §1, the block contract over every registered
architecture (and every squeeze ablation), and the invariants of G and D."""

import copy

import pytest
import torch

from torch_utils import misc
from training import networks

W = 512  # w_dim of the paper configurations.

# ----------------------------------------------------------------------------
# Configurations.


def paper256_G(**synthesis_kwargs):
    return networks.Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=256, img_channels=3,
                              mapping_kwargs=dict(num_layers=8),
                              synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=4,
                                                    conv_clamp=256, **synthesis_kwargs))


def cifar_G(**synthesis_kwargs):
    return networks.Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=32, img_channels=3,
                              mapping_kwargs=dict(num_layers=2),
                              synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4,
                                                    conv_clamp=256, **synthesis_kwargs))


def tiny_G(c_dim=0, img_resolution=16, **synthesis_kwargs):
    kwargs = dict(channel_base=128, channel_max=16, conv_clamp=256)
    kwargs.update(synthesis_kwargs)
    return networks.Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=img_resolution, img_channels=3,
                              mapping_kwargs=dict(num_layers=2), synthesis_kwargs=kwargs)


def tiny_D(c_dim=0, architecture='resnet', **kwargs):
    return networks.Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, architecture=architecture,
                                  channel_base=128, channel_max=16, conv_clamp=256,
                                  epilogue_kwargs=dict(mbstd_group_size=2), **kwargs)


# Every registered architecture, plus every squeeze ablation, as synthesis kwargs.
VARIANTS = {
    'orig':                 dict(architecture='orig'),
    'skip':                 dict(architecture='skip'),
    'resnet':               dict(architecture='resnet'),
    'squeeze':              dict(architecture='squeeze', squeeze_r=2),
    'squeeze-noblend':      dict(architecture='squeeze', squeeze_r=2, squeeze_blend=False),
    'squeeze-torgb-conv0':  dict(architecture='squeeze', squeeze_r=2, squeeze_torgb='conv0'),
    'squeeze-torgb-excite': dict(architecture='squeeze', squeeze_r=2, squeeze_torgb='excite'),
    'squeeze-noblend-excite': dict(architecture='squeeze', squeeze_r=4, squeeze_blend=False, squeeze_torgb='excite'),
}


def test_every_registered_architecture_is_covered():
    assert {kw['architecture'] for kw in VARIANTS.values()} == set(networks.SYNTHESIS_BLOCKS)

# ----------------------------------------------------------------------------
# Parameter counts (SPEC §1), exact.


def test_paper256_stock_counts():
    G = paper256_G(architecture='skip')
    assert networks.num_params(G) == 24_767_458
    assert networks.num_params(G.mapping) == 2_101_248
    assert networks.num_params(G.synthesis) == 22_666_210
    assert G.num_ws == 14


@pytest.mark.parametrize('r, total', [(4, 24_240_457), (8, 21_788_217), (16, 20_562_097)])
def test_paper256_squeeze_counts(r, total):
    G = paper256_G(architecture='squeeze', squeeze_r=r)
    assert networks.num_params(G) == total
    assert G.num_ws == 24  # b4: 1, five full blocks x 4, last block: 2 convs + toRGB.


def test_paper256_squeeze_r8_per_block_counts():
    G = paper256_G(architecture='squeeze', squeeze_r=8)
    assert networks.num_params(G.synthesis) == 19_686_969
    per_block = {res: networks.num_params(getattr(G.synthesis, f'b{res}')) for res in G.synthesis.block_resolutions}
    assert per_block == {4: 2_630_657, 8: 4_591_495, 16: 4_591_495, 32: 4_591_495, 64: 2_328_967,
                         128: 763_079, 256: 189_781}


def test_paper256_discriminator_count():
    D = networks.Discriminator(c_dim=0, img_resolution=256, img_channels=3, channel_base=16384, channel_max=512,
                               num_fp16_res=4, conv_clamp=256, epilogue_kwargs=dict(mbstd_group_size=8))
    assert networks.num_params(D) == 24_001_089


def test_cifar_counts():
    assert networks.num_params(cifar_G(architecture='skip')) == 19_947_539
    assert networks.num_params(cifar_G(architecture='squeeze', squeeze_r=8)) == 15_552_084
    D = networks.Discriminator(c_dim=0, img_resolution=32, img_channels=3, architecture='orig', channel_base=32768,
                               channel_max=512, num_fp16_res=4, conv_clamp=256,
                               epilogue_kwargs=dict(mbstd_group_size=32))
    assert networks.num_params(D) == 20_720_641


def _layer_count(c_in, c_out, k, w=W):
    """SPEC §1: a synthesis layer has (w+1)*c_in + c_out*c_in*k^2 + c_out + 1 parameters."""
    return (w + 1) * c_in + c_out * c_in * k * k + c_out + 1


def _torgb_count(c, w=W):
    return (w + 1) * c + 3 * c + 3


def _expected_squeeze_block(c_in, c, r, is_last, blend=True, torgb='squeeze'):
    """The parameter count of one squeeze block from the layer formulas, for any variant."""
    q = max(1, c_in // r)
    layers = dict(conv0=_layer_count(c_in, c, 3), squeeze=_layer_count(c, q, 3), excite=_layer_count(q, c, 3),
                  blend=_layer_count(2 * c, c, 1))
    names = ['conv0', 'squeeze', 'excite'] + (['blend'] if blend else [])
    if is_last:
        names = names[:names.index(torgb) + 1]
    return sum(layers[n] for n in names) + _torgb_count(q if torgb == 'squeeze' else c)


@pytest.mark.parametrize('variant', [dict(), dict(squeeze_blend=False), dict(squeeze_torgb='conv0'),
                                     dict(squeeze_torgb='excite'), dict(squeeze_blend=False, squeeze_torgb='excite')])
def test_squeeze_block_counts_follow_the_layer_formulas(variant):
    # Every block of the paper256 squeeze generator, every ablation: the structure is the one of SPEC §1.
    G = paper256_G(architecture='squeeze', squeeze_r=8, **variant)
    synthesis = G.synthesis
    expected_torgb = variant.get('squeeze_torgb', 'squeeze')
    for res in synthesis.block_resolutions[1:]:
        block = getattr(synthesis, f'b{res}')
        expected = _expected_squeeze_block(block.in_channels, block.out_channels, 8, block.is_last,
                                           blend=variant.get('squeeze_blend', True), torgb=expected_torgb)
        assert networks.num_params(block) == expected, f'b{res}'
    b4 = synthesis.b4
    assert not hasattr(b4, 'torgb') and b4.num_torgb == 0
    assert networks.num_params(b4) == 512 * 16 + _layer_count(512, 512, 3)


def test_paper_weight_count_per_block():
    # SPEC §1: for c_in = c the block's conv weights are (11 + 18/r) c^2 (the paper's 10 + 18/r is a slip).
    for r in (4, 8, 16):
        block = networks.SqueezeSynthesisBlock(512, 512, w_dim=512, resolution=16, img_channels=3, is_last=False,
                                               squeeze_r=r)
        weights = sum(getattr(block, n).weight.numel() for n in block.layer_names)
        assert weights == (11 + 18 / r) * 512 ** 2

# ----------------------------------------------------------------------------
# The block contract, over every registered architecture and ablation.


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_num_ws_and_row_bookkeeping(variant):
    G = tiny_G(**VARIANTS[variant])
    synthesis = G.synthesis
    blocks = [getattr(synthesis, f'b{res}') for res in synthesis.block_resolutions]
    assert synthesis.num_ws == sum(b.num_conv for b in blocks) + blocks[-1].num_torgb
    # Each block gets num_conv + num_torgb rows; the pointer advances by num_conv.
    ws = torch.arange(synthesis.num_ws, dtype=torch.float32).reshape(1, -1, 1).repeat(1, 1, 8)
    start = 0
    for block, part in zip(blocks, synthesis.block_ws(ws), strict=True):
        assert part.shape[1] == block.num_conv + block.num_torgb
        assert part[0, 0, 0].item() == start
        start += block.num_conv


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_ws_row_and_every_parameter_is_used(variant):
    # DDP needs a gradient for every parameter; every row of ws must influence the image.
    torch.manual_seed(0)
    G = tiny_G(**VARIANTS[variant]).train()
    for name, p in G.named_parameters():
        if name.endswith('noise_strength'):
            p.data.fill_(0.1)  # Zero-initialized; with 0 the noise path would give zero gradient to nothing.
    z = torch.randn([2, G.z_dim])
    ws = G.mapping(z, None).detach().requires_grad_(True)
    img = G.synthesis(ws, noise_mode='const')
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
    (img * torch.randn_like(img)).sum().backward()
    unused = [name for name, p in G.synthesis.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert unused == []
    row_influence = ws.grad.abs().sum(dim=[0, 2])
    assert (row_influence > 0).all(), f'unused ws rows: {(row_influence == 0).nonzero().flatten().tolist()}'


def _tiny_block(variant, resolution=8, is_last=False, dtype=torch.float64):
    kwargs = dict(VARIANTS[variant])
    architecture = kwargs.pop('architecture')
    block_class = networks.synthesis_block_class(architecture)
    torch.manual_seed(1)
    block = block_class(4, 4, w_dim=3, resolution=resolution, img_channels=3, is_last=is_last,
                        architecture=architecture, conv_clamp=256, **kwargs)
    for name, p in block.named_parameters():
        if name.endswith('noise_strength'):
            p.data.fill_(0.3)
        elif name.endswith('bias'):
            p.data.normal_(0, 0.2)
    return block.to(dtype)


def _block_inputs(block, dtype=torch.float64, batch=1):
    torch.manual_seed(2)
    res = block.resolution // 2
    x = torch.randn([batch, block.in_channels, res, res], dtype=dtype, requires_grad=True)
    img = torch.randn([batch, block.img_channels, res, res], dtype=dtype, requires_grad=True)
    ws = torch.randn([batch, block.num_conv + block.num_torgb, block.w_dim], dtype=dtype, requires_grad=True)
    return x, img, ws


def _block_output(block, fused):
    def fn(x, img, ws):
        x_out, img_out = block(x, img, ws, noise_mode='const', fused_modconv=fused)
        return (x_out, img_out) if img_out is not None else (x_out,)
    return fn


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('is_last', [False, True])
def test_block_gradcheck_float64(variant, is_last):
    block = _tiny_block(variant, is_last=is_last)
    inputs = _block_inputs(block)
    for fused in (False, True):
        # fast_mode checks random projections of the Jacobian: the same test of correctness at a fraction
        # of the cost of the full Jacobian.
        assert torch.autograd.gradcheck(_block_output(block, fused), inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize('variant', ['skip', 'squeeze', 'resnet'])
def test_block_gradgradcheck_float64(variant):
    # Path-length regularization differentiates through the gradient of G: second derivatives must be right.
    block = _tiny_block(variant, resolution=4 * 2)
    x, img, ws = _block_inputs(block)
    assert torch.autograd.gradgradcheck(_block_output(block, False), (x, img, ws), eps=1e-6, atol=1e-5,
                                        fast_mode=True)


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_equals_non_fused(variant, dtype, tol):
    G = tiny_G(**VARIANTS[variant]).to(dtype).eval()
    torch.manual_seed(3)
    ws = G.mapping(torch.randn([3, G.z_dim], dtype=dtype), None)
    fused = G.synthesis(ws, noise_mode='const', fused_modconv=True)
    non_fused = G.synthesis(ws, noise_mode='const', fused_modconv=False)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused, non_fused, atol=tol, rtol=tol)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_block_output_shapes_and_image_path(variant):
    G = tiny_G(**VARIANTS[variant]).eval()
    recorded = {}
    hooks = [getattr(G.synthesis, f'b{res}').register_forward_hook(
        lambda _m, _i, out, res=res: recorded.__setitem__(res, out)) for res in G.synthesis.block_resolutions]
    G(torch.randn([2, G.z_dim]), None, noise_mode='none')
    for hook in hooks:
        hook.remove()
    for res, (x, img) in recorded.items():
        block = getattr(G.synthesis, f'b{res}')
        assert x.shape[0] == 2 and x.shape[2:] == (res, res)
        if not block.is_last:  # What the next block reads.
            assert x.shape[1] == block.out_channels
        if img is not None:
            assert img.shape == (2, 3, res, res) and img.dtype == torch.float32
    architecture = VARIANTS[variant]['architecture']
    if architecture == 'squeeze':
        assert recorded[4][1] is None  # The squeeze image path starts at 8x8.
        assert recorded[8][1] is not None
    elif architecture in ('orig', 'resnet'):  # toRGB only in the last block.
        assert recorded[8][1] is None and recorded[16][1] is not None
    else:
        assert recorded[4][1] is not None


def test_squeeze_layer_row_order():
    # conv0, squeeze, excite, blend take rows 0..3 of the block's ws; toRGB the row after them.
    G = tiny_G(architecture='squeeze', squeeze_r=2).eval()
    block = G.synthesis.b8
    assert block.layer_names == ['conv0', 'squeeze', 'excite', 'blend'] and block.num_conv == 4
    seen = {}
    hooks = [getattr(block, name).affine.register_forward_hook(
        lambda _m, inputs, _o, name=name: seen.__setitem__(name, inputs[0])) for name in block.layer_names + ['torgb']]
    ws = torch.randn([1, G.num_ws, G.w_dim])
    G.synthesis(ws, noise_mode='none')
    for hook in hooks:
        hook.remove()
    start = G.synthesis.b4.num_conv
    for idx, name in enumerate(block.layer_names + ['torgb']):
        assert torch.equal(seen[name], ws[:, start + idx]), name


def test_squeeze_layers_shapes():
    block = networks.SqueezeSynthesisBlock(64, 32, w_dim=8, resolution=16, img_channels=3, is_last=False,
                                           squeeze_r=8)
    assert block.squeeze_channels == 8  # q = c_in // r, from the *input* channels.
    assert (block.conv0.in_channels, block.conv0.out_channels, block.conv0.up) == (64, 32, 2)
    assert (block.squeeze.in_channels, block.squeeze.out_channels) == (32, 8)
    assert (block.excite.in_channels, block.excite.out_channels) == (8, 32)
    assert (block.blend.in_channels, block.blend.out_channels, block.blend.weight.shape[2]) == (64, 32, 1)
    assert block.torgb.in_channels == 8
    last = networks.SqueezeSynthesisBlock(64, 32, w_dim=8, resolution=16, img_channels=3, is_last=True, squeeze_r=128)
    assert last.layer_names == ['conv0', 'squeeze'] and last.squeeze_channels == 1  # q = max(1, c_in // r)


def test_squeeze_without_blend_passes_the_excited_feature_on():
    torch.manual_seed(0)
    block = networks.SqueezeSynthesisBlock(8, 8, w_dim=4, resolution=8, img_channels=3, is_last=False,
                                           squeeze_r=2, squeeze_blend=False).eval()
    x, img, ws = (t.float().detach() for t in _block_inputs(block, torch.float32))
    excited = {}
    hook = block.excite.register_forward_hook(lambda _m, _i, out: excited.__setitem__('x', out))
    x_out, _ = block(x, img, ws, noise_mode='none')
    hook.remove()
    assert torch.equal(x_out, excited['x'])

# ----------------------------------------------------------------------------
# Generator invariants.


def test_truncation_psi_one_is_identity_and_psi_zero_gives_w_avg():
    torch.manual_seed(0)
    G = tiny_G().eval()
    G.mapping.w_avg.normal_()
    z = torch.randn([4, G.z_dim])
    ws = G.mapping(z, None)
    assert torch.equal(G.mapping(z, None, truncation_psi=1), ws)
    assert torch.equal(G.mapping(z, None, truncation_psi=1, truncation_cutoff=3), ws)
    zero = G.mapping(z, None, truncation_psi=0)
    assert torch.equal(zero, G.mapping.w_avg.expand_as(ws))
    cut = G.mapping(z, None, truncation_psi=0, truncation_cutoff=3)
    assert torch.equal(cut[:, :3], G.mapping.w_avg.expand(4, 3, -1))
    assert torch.equal(cut[:, 3:], ws[:, 3:])


def test_w_avg_tracks_in_train_mode_only():
    G = tiny_G()
    z = torch.randn([4, G.z_dim])
    G.eval()(z, None)
    assert torch.equal(G.mapping.w_avg, torch.zeros_like(G.mapping.w_avg))
    G.train().mapping(z, None, skip_w_avg_update=True)
    assert torch.equal(G.mapping.w_avg, torch.zeros_like(G.mapping.w_avg))
    w = G.mapping(z, None)[:, 0]
    torch.testing.assert_close(G.mapping.w_avg, w.mean(0) * (1 - 0.995))


@pytest.mark.parametrize('variant', ['skip', 'squeeze'])
def test_noise_modes(variant):
    G = tiny_G(**VARIANTS[variant]).eval()
    for name, p in G.named_parameters():
        if name.endswith('noise_strength'):
            p.data.fill_(0.5)
    z = torch.randn([2, G.z_dim])
    assert torch.equal(G(z, None, noise_mode='const'), G(z, None, noise_mode='const'))
    assert torch.equal(G(z, None, noise_mode='none'), G(z, None, noise_mode='none'))
    assert not torch.equal(G(z, None, noise_mode='random'), G(z, None, noise_mode='random'))
    assert not torch.equal(G(z, None, noise_mode='const'), G(z, None, noise_mode='none'))
    with pytest.raises(ValueError, match='noise_mode'):
        G(z, None, noise_mode='bogus')


@pytest.mark.parametrize('variant', ['skip', 'squeeze'])
def test_conditional_generator_and_discriminator(variant):
    torch.manual_seed(0)
    G = tiny_G(c_dim=4, **VARIANTS[variant]).eval()
    D = tiny_D(c_dim=4).eval()
    z = torch.randn([1, G.z_dim]).repeat(4, 1)
    c = torch.eye(4)
    img = G(z, c, noise_mode='const')
    assert img.shape == (4, 3, 16, 16)
    assert not torch.equal(img[0], img[1])  # Same z, different labels.
    logits = D(img[:2].repeat(2, 1, 1, 1), torch.eye(4))
    assert logits.shape == (4, 1)
    assert not torch.equal(logits[0], logits[2])  # Same image, different labels.
    assert D.mapping.num_ws is None and not hasattr(D.mapping, 'w_avg')


def test_fp16_request_runs_in_fp32_on_cpu():
    torch.manual_seed(0)
    G16 = tiny_G(architecture='squeeze', squeeze_r=2, num_fp16_res=4).eval()
    G32 = tiny_G(architecture='squeeze', squeeze_r=2, num_fp16_res=0).eval()
    misc.copy_params_and_buffers(G16, G32, require_all=True)
    assert all(getattr(G16.synthesis, f'b{res}').use_fp16 for res in (8, 16))
    z = torch.randn([2, G16.z_dim])
    img = G16(z, None, noise_mode='const')
    assert img.dtype == torch.float32
    assert torch.equal(img, G32(z, None, noise_mode='const'))
    D16 = tiny_D(num_fp16_res=4).eval()
    assert D16(img, None).dtype == torch.float32


@pytest.mark.parametrize('variant', ['skip', 'squeeze', 'orig'])
def test_copy_params_and_buffers_gives_identical_outputs(variant):
    torch.manual_seed(0)
    src = tiny_G(**VARIANTS[variant]).eval()
    torch.manual_seed(1)
    dst = tiny_G(**VARIANTS[variant]).eval()
    z = torch.randn([2, src.z_dim])
    assert not torch.equal(src(z, None, noise_mode='const'), dst(z, None, noise_mode='const'))
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(src(z, None, noise_mode='const'), dst(z, None, noise_mode='const'))


def test_deepcopy_and_init_kwargs_record_the_architecture():
    G = tiny_G(architecture='squeeze', squeeze_r=2, squeeze_blend=False)
    assert G.init_kwargs.synthesis_kwargs['architecture'] == 'squeeze'
    assert G.init_kwargs.synthesis_kwargs['squeeze_r'] == 2
    assert G.synthesis.architecture == 'squeeze'
    assert G.synthesis.init_kwargs['squeeze_blend'] is False
    clone = copy.deepcopy(G)
    z = torch.randn([1, G.z_dim])
    assert torch.equal(clone.eval()(z, None, noise_mode='const'), G.eval()(z, None, noise_mode='const'))


def test_discriminator_architectures_and_freezing():
    for architecture in ('orig', 'skip', 'resnet'):
        D = tiny_D(architecture=architecture)
        assert D(torch.randn([4, 3, 16, 16]), None).shape == (4, 1)
    D = tiny_D(block_kwargs=dict(freeze_layers=2))
    frozen = [name for name, _ in D.named_buffers() if name.endswith('weight')]
    assert frozen == ['b16.fromrgb.weight', 'b16.conv0.weight']

# ----------------------------------------------------------------------------
# Clear errors.


def test_unknown_architecture_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"'sqeeze'.*orig, skip, resnet, squeeze"):
        tiny_G(architecture='sqeeze')


def test_squeeze_options_are_rejected_for_other_architectures():
    with pytest.raises(ValueError, match="squeeze_r=8 applies to architecture 'squeeze' only"):
        tiny_G(architecture='skip', squeeze_r=8)


@pytest.mark.parametrize('kwargs, message', [
    (dict(squeeze_r=0), 'squeeze_r must be a positive integer'),
    (dict(squeeze_r=2.5), 'squeeze_r must be a positive integer'),
    (dict(squeeze_torgb='f_s'), 'squeeze_torgb must be one of squeeze, conv0, excite'),
])
def test_bad_squeeze_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_G(architecture='squeeze', **kwargs)


def test_squeeze_needs_at_least_8x8():
    with pytest.raises(ValueError, match='img_resolution >= 8'):
        tiny_G(img_resolution=4, architecture='squeeze')


@pytest.mark.parametrize('resolution', [0, 3, 24, 100])
def test_resolution_must_be_a_power_of_two(resolution):
    with pytest.raises(ValueError, match='power of two'):
        tiny_G(img_resolution=resolution)
    with pytest.raises(ValueError, match='power of two'):
        networks.Discriminator(c_dim=0, img_resolution=resolution, img_channels=3)


def test_minibatch_std_group_must_divide_the_batch():
    layer = networks.MinibatchStdLayer(group_size=4)
    with pytest.raises(ValueError, match='not divisible by the group size 4'):
        layer(torch.randn([6, 2, 4, 4]))


def test_wrong_input_shapes_are_reported():
    G = tiny_G()
    with pytest.raises(AssertionError, match='Wrong size for dimension 1'):
        G.synthesis(torch.randn([1, G.num_ws + 1, G.w_dim]))
    with pytest.raises(AssertionError, match='Wrong size'):
        G(torch.randn([1, G.z_dim + 1]), None)


# ----------------------------------------------------------------------------
# Half precision.


@pytest.mark.parametrize('fused', [True, False])
def test_fp16_prenormalization_keeps_the_result(fused):
    # In fp16 the weight and styles are rescaled before modulation so nothing overflows; demodulation removes
    # the scale again. Styles of magnitude 1e3 would overflow fp16 per-sample weights without it.
    torch.manual_seed(0)
    x = torch.randn([2, 4, 6, 6])
    weight = torch.randn([5, 4, 3, 3]) * 30
    styles = torch.randn([2, 4]) * 1e3
    ref = networks.modulated_conv2d(x, weight, styles, padding=1, fused_modconv=fused)
    try:
        out = networks.modulated_conv2d(x.half(), weight, styles, padding=1, fused_modconv=fused)
    except RuntimeError as e:  # Some CPU builds lack fp16 convolutions; the GPU test below covers it then.
        pytest.skip(f'fp16 convolution not available on this CPU build: {e}')
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize('variant', ['skip', 'squeeze', 'resnet'])
def test_fp16_generator_on_cuda_matches_fp32(variant):
    torch.manual_seed(0)
    G = tiny_G(num_fp16_res=2, **VARIANTS[variant]).eval().cuda()
    z = torch.randn([4, G.z_dim], device='cuda')
    img16 = G(z, None, noise_mode='const')
    img32 = G(z, None, noise_mode='const', force_fp32=True)
    assert img16.dtype == torch.float32 and torch.isfinite(img16).all()
    torch.testing.assert_close(img16, img32, atol=5e-2, rtol=5e-2)
    D = tiny_D(num_fp16_res=2).eval().cuda()
    torch.testing.assert_close(D(img32, None), D(img32, None, force_fp32=True), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.parametrize('variant', ['skip', 'squeeze'])
def test_cuda_matches_cpu(variant):
    torch.manual_seed(0)
    G = tiny_G(**VARIANTS[variant]).eval()
    z = torch.randn([4, G.z_dim])
    cpu = G(z, None, noise_mode='const')
    gpu = copy.deepcopy(G).cuda()(z.cuda(), None, noise_mode='const')
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
