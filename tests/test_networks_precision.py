"""Reduced precision (fp16, bf16) in the `use_fp16` blocks, proven on the CPU.

On a GPU the top `num_fp16_res` blocks of G and D compute in float16 (the official behaviour) or, with
`precision='bf16'`, in bfloat16. Off the GPU they run in float32, so none of that code path would run here;
`networks.low_precision_on_cpu()` (a test-only context) lets them compute in their reduced dtype on the CPU. This
torch build (2.x CPU) implements float16 and bfloat16 convolutions, transposed and grouped convolutions and
their gradients on the CPU (checked by `_require_cpu_convolutions`), so every test below really computes in
float16 resp. bfloat16; no dtype stands in for another.

Tolerances against float32. A reduced dtype with unit roundoff u (float16: 2^-11, bfloat16: 2^-8, i.e. 8 times
coarser) rounds every activation once per layer; over the handful of layers of a tiny network the errors add
up to a few u relative to the output scale. We allow 16 u times the largest float32 output, i.e. 0.0078 for
fp16 (the official networks, whose images are about [-1, 1], differ by 0.0065-0.016 between fp16 and fp32 on
their snapshots, the same order) and 0.0625 for bf16. Measured on these nets (every variant, fused and not,
three seeds; images of max |x| 2-4): G fp16 at most 5.2 u (max abs 0.0082), bf16 8.2 u (0.059); D logits fp16
3.7 u (0.0010), bf16 5.7 u (0.0088). So the bound holds with a margin of 2-3 for bf16 and 3-4 for fp16.
"""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_legacy_adopt import embedded
from test_training_loop import make_image_folder, tiny_options

from torch_utils import training_stats
from training import adoption, networks, weights_only
from training.loss import StyleGAN2Loss
from training.training_loop import training_loop

pytestmark = pytest.mark.usefixtures('one_thread')

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}
UNIT_ROUNDOFF = {'fp16': 2.0 ** -11, 'bf16': 2.0 ** -8}
CLAMPED_LAYERS = (networks.SynthesisLayer, networks.ToRGBLayer, networks.Conv2dLayer)

VARIANTS = {
    'orig':     dict(architecture='orig'),
    'skip':     dict(architecture='skip'),
    'resnet':   dict(architecture='resnet'),
    'squeeze':  dict(architecture='squeeze', squeeze_r=2),
}


def _require_cpu_convolutions(dtype):
    """Skip (naming the missing op) on a torch build without reduced-precision CPU convolutions."""
    x = torch.randn([2, 4, 4, 4], dtype=dtype, requires_grad=True)
    w = torch.randn([4, 2, 3, 3], dtype=dtype, requires_grad=True)
    try:
        y = F.conv2d(x, w, padding=1, groups=2) + F.conv_transpose2d(x, w, padding=1, groups=2)
        y.sum().backward()
    except (RuntimeError, NotImplementedError) as e:
        if 'not implemented' not in str(e):
            raise
        pytest.skip(f'{dtype} convolutions are not implemented on this CPU build: {e}')


@pytest.fixture(params=list(DTYPES))
def precision(request):
    _require_cpu_convolutions(DTYPES[request.param])
    return request.param


def tiny_G(precision=None, num_fp16_res=2, conv_clamp=256, architecture='skip', **synthesis_kwargs):
    """16x16, at most 16 channels; num_fp16_res=2 puts b8 and b16 in reduced precision, b4 in float32."""
    kwargs = dict(channel_base=128, channel_max=16, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
                  **VARIANTS[architecture], **synthesis_kwargs)
    if precision is not None:
        kwargs['precision'] = precision
    torch.manual_seed(0)
    return networks.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3,
                              mapping_kwargs=dict(num_layers=2), synthesis_kwargs=kwargs)


def tiny_D(precision=None, num_fp16_res=2, conv_clamp=256, architecture='resnet', **kwargs):
    """b16 and b8 in reduced precision; the 4x4 epilogue always computes in float32."""
    if precision is not None:
        kwargs['precision'] = precision
    torch.manual_seed(1)
    return networks.Discriminator(c_dim=0, img_resolution=16, img_channels=3, architecture=architecture,
                                  channel_base=128, channel_max=16, num_fp16_res=num_fp16_res,
                                  conv_clamp=conv_clamp, epilogue_kwargs=dict(mbstd_group_size=2), **kwargs)


def _d_architecture(architecture):
    return 'skip' if architecture == 'squeeze' else architecture


def _blocks(net):
    return [(res, getattr(net, f'b{res}')) for res in net.block_resolutions]


def _record_block_outputs(net, record):
    """Forward hooks storing each block's feature output x under its resolution; returns the handles."""
    def hook(module, args, output, res):
        record[res] = output[0] if isinstance(output, tuple) else output
    return [block.register_forward_hook(lambda m, a, o, res=res: hook(m, a, o, res)) for res, block in _blocks(net)]


def _max_abs_tolerance(precision, reference):
    return 16 * UNIT_ROUNDOFF[precision] * reference.abs().max().item()

# ----------------------------------------------------------------------------
# The test-only context.


def test_context_is_scoped_and_restores_the_default():
    G = tiny_G().eval()
    ws = G.mapping(torch.randn([2, 8]), None)
    dtypes = dict()
    handles = _record_block_outputs(G.synthesis, dtypes)

    def b16_dtype():
        G.synthesis(ws, noise_mode='const')
        return dtypes[16].dtype

    assert b16_dtype() == torch.float32  # Off the GPU, fp16 blocks compute in float32 by default.
    with networks.low_precision_on_cpu():
        assert b16_dtype() == torch.float16
        with networks.low_precision_on_cpu(False):
            assert b16_dtype() == torch.float32
        assert b16_dtype() == torch.float16
        assert G.synthesis(ws, noise_mode='const', force_fp32=True).dtype == torch.float32
        assert dtypes[16].dtype == torch.float32  # force_fp32 still wins.
    assert b16_dtype() == torch.float32
    with pytest.raises(KeyError), networks.low_precision_on_cpu():
        raise KeyError('the flag must be restored on the way out of an exception')
    assert b16_dtype() == torch.float32
    for handle in handles:
        handle.remove()

# ----------------------------------------------------------------------------
# Outputs and gradients against float32.


@pytest.mark.parametrize('architecture', list(VARIANTS))
@pytest.mark.parametrize('fused', [False, True])
def test_generator_in_reduced_precision_matches_fp32(precision, architecture, fused):
    G = tiny_G(precision, architecture=architecture).eval()
    ws = G.mapping(torch.randn([4, 8], generator=torch.Generator().manual_seed(2)), None).detach()
    reference = G.synthesis(ws, noise_mode='const', fused_modconv=fused)

    outputs = dict()
    handles = _record_block_outputs(G.synthesis, outputs)
    ws.requires_grad_(True)
    with networks.low_precision_on_cpu():
        img = G.synthesis(ws, noise_mode='const', fused_modconv=fused)
        img.square().sum().backward()
    for handle in handles:
        handle.remove()

    # Inside, the use_fp16 blocks compute in the reduced dtype; the image path leaves in float32.
    assert {res: x.dtype for res, x in outputs.items()} == {4: torch.float32, 8: DTYPES[precision],
                                                            16: DTYPES[precision]}
    assert img.dtype == torch.float32 and img.is_contiguous()
    assert torch.isfinite(img).all()
    assert torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0
    grads = [p.grad for p in G.synthesis.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    error = (img - reference).abs().max().item()
    assert error <= _max_abs_tolerance(precision, reference), error


@pytest.mark.parametrize('architecture', ['orig', 'skip', 'resnet'])
def test_discriminator_in_reduced_precision_matches_fp32(precision, architecture):
    D = tiny_D(precision, architecture=architecture).eval()
    img = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(3))
    reference = D(img, None)

    outputs = dict()
    handles = _record_block_outputs(D, outputs)
    img.requires_grad_(True)
    with networks.low_precision_on_cpu():
        logits = D(img, None)
        logits.sum().backward()
    for handle in handles:
        handle.remove()

    assert {res: x.dtype for res, x in outputs.items()} == {16: DTYPES[precision], 8: DTYPES[precision]}
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert img.grad.dtype == torch.float32 and torch.isfinite(img.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())
    # Logits come out of the float32 epilogue; the same rule (16 u of the output scale) holds.
    error = (logits - reference).abs().max().item()
    assert error <= _max_abs_tolerance(precision, reference), error


def test_fp16_prenormalization_runs_for_float16_only(monkeypatch, precision):
    # The pre-normalization guards against float16 overflow (largest value 65504). bfloat16 has float32's range,
    # so it computes the modulated convolution exactly as float32 does, only rounded.
    calls = []
    original = networks._prenormalize_fp16

    def spy(weight, styles):
        calls.append(weight.shape)
        return original(weight, styles)

    monkeypatch.setattr(networks, '_prenormalize_fp16', spy)
    G = tiny_G(precision).eval()
    ws = G.mapping(torch.randn([2, 8]), None)
    G.synthesis(ws, noise_mode='const')
    assert calls == []  # float32 (default on the CPU): never.
    with networks.low_precision_on_cpu():
        G.synthesis(ws, noise_mode='const')
    # fp16: once per demodulated layer of b8 and b16 (conv0, conv1), not for toRGB (no demodulation).
    assert len(calls) == (4 if precision == 'fp16' else 0)

# ----------------------------------------------------------------------------
# Clamping.


def _clamp_records(net, records):
    """Forward hooks on every layer with a conv_clamp setting: (name, max |output|, conv_clamp * gain, dtype)."""
    handles = []
    for name, module in net.named_modules():
        if isinstance(module, CLAMPED_LAYERS):
            def hook(module, args, kwargs, output, name=name):
                gain = kwargs.get('gain', 1)
                clamp = module.conv_clamp * gain if module.conv_clamp is not None else None
                records.append((name, output.abs().max().item(), clamp, output.dtype))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def _with_huge_biases(net, value):
    """Every layer bias set to `value`: pre-activations far beyond any clamp (+bias -> lrelu -> gain -> clamp)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, CLAMPED_LAYERS) and module.bias is not None:
                module.bias.fill_(value)
    return net


@pytest.mark.parametrize('architecture', ['skip', 'resnet', 'squeeze'])
def test_clamping_is_active_exactly_where_conv_clamp_says(precision, architecture):
    clamp = 8.0
    rounding = 1 + 2 * UNIT_ROUNDOFF[precision]  # conv_clamp * gain is itself rounded to the reduced dtype.
    z = torch.randn([2, 8], generator=torch.Generator().manual_seed(4))
    img = 100 * torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(5))

    for conv_clamp in (clamp, None):
        G = _with_huge_biases(tiny_G(precision, architecture=architecture, conv_clamp=conv_clamp).eval(), 100.0)
        D = _with_huge_biases(tiny_D(precision, architecture=_d_architecture(architecture),
                                     conv_clamp=conv_clamp).eval(), 100.0)
        records = []
        handles = _clamp_records(G, records) + _clamp_records(D, records)
        with networks.low_precision_on_cpu():
            G(z, None, noise_mode='const')
            D(img, None)
        for handle in handles:
            handle.remove()

        # Both precisions appear among the clamped layers: clamping is a property of the layer, not of fp16.
        assert {dtype for *_, dtype in records} == {torch.float32, DTYPES[precision]}
        clamped = [(name, peak, bound) for name, peak, bound, _ in records if bound is not None]
        unclamped = [name for name, _, bound, _ in records if bound is None]
        if conv_clamp is None:
            assert clamped == []
            # Without the clamp the same inputs exceed it (fp16 may even overflow to inf or nan).
            assert all(not peak <= clamp for _, peak, _, _ in records)
            continue
        # Every layer clamps except, as in the official code, the resnet shortcuts of G and D (1x1, no bias, no
        # activation) and the fromRGB of D's epilogue (skip architecture only).
        assert unclamped == [name for name, _, _, _ in records if name.endswith('.skip') or name == 'b4.fromrgb']
        for name, peak, bound in clamped:
            assert peak <= bound * rounding, (name, peak, bound)
            assert peak >= bound / rounding, (name, peak, bound)  # Huge inputs: the clamp is reached.


def test_clamped_network_stays_finite_where_fp16_would_overflow():
    # With huge biases an unclamped fp16 network overflows (inf/nan); conv_clamp keeps it finite. bf16 does not
    # overflow at all, which is why it needs neither the clamp nor the pre-normalization for range.
    _require_cpu_convolutions(torch.float16)
    z = torch.randn([2, 8], generator=torch.Generator().manual_seed(6))
    outputs = dict()
    for precision in ('fp16', 'bf16'):
        _require_cpu_convolutions(DTYPES[precision])
        for conv_clamp in (256, None):
            G = _with_huge_biases(tiny_G(precision, conv_clamp=conv_clamp).eval(), 2e4)
            with networks.low_precision_on_cpu():
                outputs[precision, conv_clamp] = G(z, None, noise_mode='const')
    assert torch.isfinite(outputs['fp16', 256]).all()
    assert not torch.isfinite(outputs['fp16', None]).all()
    assert torch.isfinite(outputs['bf16', 256]).all() and torch.isfinite(outputs['bf16', None]).all()

# ----------------------------------------------------------------------------
# Channels-last.


def _is_channels_last(t, expected):
    """Whether `t` is laid out as `expected` (True: channels-last, False: NCHW). A tensor with one channel or
    one pixel (a 1x1 kernel, say) is both, and so fits either."""
    return t.is_contiguous(memory_format=torch.channels_last if expected else torch.contiguous_format)


def _layout_records(net, records):
    handles = []
    for name, module in net.named_modules():
        if isinstance(module, (networks.SynthesisLayer, networks.Conv2dLayer)):
            def hook(module, args, output, name=name):
                records[name] = (args[0], output)
            handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize('architecture', ['skip', 'squeeze'])
def test_channels_last_in_reduced_precision_blocks(precision, architecture):
    G = tiny_G(precision, architecture=architecture, fp16_channels_last=True).train()
    D = tiny_D(precision, architecture=_d_architecture(architecture),
               block_kwargs=dict(fp16_channels_last=True)).train()
    for net in (G.synthesis, D):
        for _, block in _blocks(net):
            for module in block.modules():
                if isinstance(module, (networks.SynthesisLayer, networks.Conv2dLayer, networks.ToRGBLayer)):
                    assert _is_channels_last(module.weight, block.use_fp16)
    z = torch.randn([4, 8], generator=torch.Generator().manual_seed(7))

    records = dict()
    handles = _layout_records(G, records) + _layout_records(D, records)
    G(z, None)  # Outside the context the blocks compute in float32 and keep their inputs NCHW.
    assert _is_channels_last(records['synthesis.b8.conv0'][0], False)
    assert not _is_channels_last(records['synthesis.b8.conv0'][0], True)
    records.clear()
    with networks.low_precision_on_cpu():
        img = G(z, None)   # Training mode: the non-fused modulated convolution, where layout pays.
        D(img, None)
    for handle in handles:
        handle.remove()

    assert img.is_contiguous() and img.dtype == torch.float32
    reduced = DTYPES[precision]
    for name, (inp, out) in records.items():
        in_reduced_block = out.dtype == reduced
        assert in_reduced_block == (name.split('.')[-2] in ('b8', 'b16')), name
        assert _is_channels_last(inp, in_reduced_block) and _is_channels_last(out, in_reduced_block), name

# ----------------------------------------------------------------------------
# A full training step.


def _loss_setup(precision, num_fp16_res, architecture):
    G = tiny_G(precision, num_fp16_res=num_fp16_res, architecture=architecture).train()
    D = tiny_D(precision, num_fp16_res=num_fp16_res, architecture=_d_architecture(architecture)).train()
    loss = StyleGAN2Loss('cpu', G.mapping, G.synthesis, D, r1_gamma=1.0, pl_batch_shrink=2)
    gen = torch.Generator().manual_seed(8)
    batch = dict(real_img=torch.randn([4, 3, 16, 16], generator=gen), real_c=torch.zeros([4, 0]),
                 gen_z=torch.randn([4, 8], generator=gen), gen_c=torch.zeros([4, 0]))
    return G, D, loss, batch


def _phase_gradients(precision, num_fp16_res, architecture):
    """Gradients of each phase (Gmain, Greg, Dmain, Dreg with the lazy-regularization gains) as one vector."""
    G, D, loss, batch = _loss_setup(precision, num_fp16_res, architecture)
    result = dict()
    with networks.low_precision_on_cpu():
        for phase, gain in (('Gmain', 1), ('Greg', 4), ('Dmain', 1), ('Dreg', 16)):
            module = G if phase.startswith('G') else D
            G.requires_grad_(module is G)
            D.requires_grad_(module is D)
            module.zero_grad(set_to_none=True)
            torch.manual_seed(9)
            loss.accumulate_gradients(phase, gain=gain, **batch)
            missing = [name for name, p in module.named_parameters() if p.grad is None]
            assert missing == [], (phase, missing)
            result[phase] = torch.cat([p.grad.flatten() for p in module.parameters()])
    return result


@pytest.mark.parametrize('architecture', ['skip', 'squeeze'])
def test_training_step_with_reduced_precision_blocks(precision, architecture):
    training_stats.reset()
    collector = training_stats.Collector(regex='Loss/.*')
    grads = _phase_gradients(precision, 2, architecture)
    collector.update()
    assert {'Loss/G/loss', 'Loss/G/reg', 'Loss/D/loss', 'Loss/D/reg', 'Loss/r1_penalty'} <= set(collector.names())
    assert all(np.isfinite(collector.mean(name)) for name in collector.names())
    training_stats.reset()

    reference = _phase_gradients(precision, 0, architecture)  # The same networks and inputs, all float32.
    # Every gradient is finite and points where the float32 one does. Gradients pass through the rounded
    # forward and a rounded backward, the regularization phases through a second (double) backward, so the
    # bound is on direction: cosine similarity (measured: fp16 >= 0.9994, bf16 >= 0.985).
    min_cosine = 0.99 if precision == 'fp16' else 0.95
    for phase, g in grads.items():
        assert torch.isfinite(g).all(), phase
        cosine = F.cosine_similarity(g, reference[phase], dim=0).item()
        assert cosine >= min_cosine, (phase, cosine)

# ----------------------------------------------------------------------------
# The `precision` keyword.


def test_precision_is_recorded_only_when_given():
    G, D = tiny_G(), tiny_D()
    assert 'precision' not in G.init_kwargs['synthesis_kwargs'] and 'precision' not in D.init_kwargs
    assert G.synthesis.precision == D.precision == 'fp16'  # The official behaviour.
    assert all(block.precision == 'fp16' for net in (G.synthesis, D) for _, block in _blocks(net))
    G, D = tiny_G('bf16'), tiny_D('bf16')
    assert G.init_kwargs['synthesis_kwargs']['precision'] == 'bf16' and D.init_kwargs['precision'] == 'bf16'
    assert all(block.precision == 'bf16' for net in (G.synthesis, D) for _, block in _blocks(net))
    assert 'precision=bf16' in repr(G.synthesis.b16) and 'precision' not in repr(G.synthesis.b4)


@pytest.mark.parametrize('make', [lambda: tiny_G(precision='fp32'), lambda: tiny_D(precision='float16'),
                                  lambda: networks.SynthesisBlock(4, 4, 4, 8, 3, False, precision='half')])
def test_unknown_precision_lists_the_valid_names(make):
    with pytest.raises(ValueError, match='precision must be one of fp16, bf16'):
        make()


def test_bf16_snapshot_round_trips(tmp_path):
    _require_cpu_convolutions(torch.bfloat16)
    G, D = tiny_G('bf16').eval(), tiny_D('bf16').eval()
    z = torch.randn([2, 8], generator=torch.Generator().manual_seed(10))
    for loaded in (pickle.loads(pickle.dumps(dict(G=G, D=D))),
                   adoption.adopt_snapshot(dict(G=embedded(G), D=embedded(D)), verbose=False)):
        G2, D2 = loaded['G'], loaded['D']
        assert type(G2) is networks.Generator and type(D2) is networks.Discriminator
        assert G2.init_kwargs['synthesis_kwargs']['precision'] == 'bf16' and D2.init_kwargs['precision'] == 'bf16'
        with networks.low_precision_on_cpu():
            img, img2 = G(z, None, noise_mode='const'), G2(z, None, noise_mode='const')
            assert torch.equal(img, img2)
            assert torch.equal(D(img, None), D2(img, None))
    # The weights-only path rebuilds from init kwargs as well.
    path = str(tmp_path / 'bf16.pt')
    weights_only.save_weights_only(dict(G=G, D=D, G_ema=G, augment_pipe=None, training_set_kwargs=None), path)
    G3 = weights_only.load_weights_only(path)['G']
    assert G3.init_kwargs['synthesis_kwargs']['precision'] == 'bf16' and G3.synthesis.b16.precision == 'bf16'
    with networks.low_precision_on_cpu():
        assert torch.equal(G(z, None, noise_mode='const'), G3(z, None, noise_mode='const'))


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_the_training_loop_runs_with_reduced_precision_blocks(tmp_path, precision):
    # The whole loop (four phases with lazy regularization, ADA, EMA, the gradient nan_to_num, snapshots) with
    # the two highest resolutions of G and D in reduced precision.
    data = make_image_folder(tmp_path / 'data')
    opts = tiny_options(tmp_path / 'run', data, steps=4, steps_per_tick=2)
    extra = dict(precision='bf16') if precision == 'bf16' else {}
    opts['G_kwargs']['synthesis_kwargs'].update(num_fp16_res=2, **extra)
    opts['D_kwargs'].update(num_fp16_res=2, conv_clamp=256, **extra)
    (tmp_path / 'run').mkdir()
    training_stats.reset()
    with networks.low_precision_on_cpu():
        state = training_loop(**opts)
    assert state.progress.cur_nimg == 4 * 8
    for net in (state.nets.G, state.nets.D, state.nets.G_ema):
        assert all(torch.isfinite(p).all() for p in net.parameters())
    assert state.nets.G.synthesis.b16.use_fp16 and not state.nets.G.synthesis.b4.use_fp16
    with open(tmp_path / 'run' / 'stats.jsonl') as f:
        last = json.loads(f.readlines()[-1])
    assert np.isfinite(last['Loss/G/loss']['mean']) and np.isfinite(last['Loss/D/loss']['mean'])
