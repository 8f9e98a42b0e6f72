"""training.networks against the reference vectors of the public release (../shared/vectors/README.md).

Two tiny configurations (tinyA: unconditional, 2 mapping layers, D 'orig'; tinyB: conditional, 8 mapping
layers, D 'resnet') are rebuilt from their kwargs, loaded with `strict=True`, and every stored output and
intermediate is recomputed: mapping layers, truncation, each synthesis layer and its styles, each block's
(x, img), fused and non-fused images, train mode and the w_avg update, and every D layer. The test also checks
that no stored tensor is left unchecked, so a vector file that grows cannot silently outrun the test.
"""

import copy
import re

import pytest
import torch
import vectors

from training import networks

pytestmark = pytest.mark.skipif(not vectors.available(), reason='reference vectors not found')

CONFIGS = ['tinyA', 'tinyB']
TOL = dict(atol=1e-5, rtol=1e-5)


def _load(cfg):
    kwargs = vectors.network_file(f'{cfg}_kwargs.json')
    G = networks.Generator(**kwargs['G_kwargs']).eval().requires_grad_(False)
    D = networks.Discriminator(**kwargs['D_kwargs']).eval().requires_grad_(False)
    G.load_state_dict(vectors.network_file(f'{cfg}_G.pt'), strict=True)
    D.load_state_dict(vectors.network_file(f'{cfg}_D.pt'), strict=True)
    return kwargs, G, D, vectors.network_file(f'{cfg}_io.pt')


def _record_outputs(root, prefix):
    """Forward hooks storing every submodule's output under `<prefix><dotted name>`."""
    outputs, handles = {}, []
    for name, module in root.named_modules():
        if name:
            def hook(_module, _inputs, output, key=prefix + name):
                # Clone: a later in-place op (the resnet `y.add_(x)`) must not change what was recorded.
                if isinstance(output, tuple):
                    outputs[key] = tuple(t.clone() if t is not None else None for t in output)
                else:
                    outputs[key] = output.clone()
            handles.append(module.register_forward_hook(hook))
    return outputs, handles


def _reference_key_to_module(key):
    """Map an io key to (recorded module name, index into a tuple output or None), or None if not a layer."""
    m = re.fullmatch(r'G_b(\d+)_(x|img)', key)
    if m:
        return f'G.synthesis.b{m[1]}', (0 if m[2] == 'x' else 1)
    m = re.fullmatch(r'G_b(\d+)_(\w+?)_styles_raw', key)
    if m:
        return f'G.synthesis.b{m[1]}.{m[2]}.affine', None
    m = re.fullmatch(r'G_b(\d+)_(conv0|conv1|torgb)', key)
    if m:
        return f'G.synthesis.b{m[1]}.{m[2]}', None
    m = re.fullmatch(r'map_(embed|fc\d+)', key)
    if m:
        return f'G.mapping.{m[1]}', None
    m = re.fullmatch(r'D_b(\d+)_x', key)
    if m:
        return f'D.b{m[1]}', 0
    m = re.fullmatch(r'D_b(\d+)_(fromrgb|conv0|conv1|skip|mbstd|conv|fc|out)', key)
    if m:
        return f'D.b{m[1]}.{m[2]}', None
    m = re.fullmatch(r'D_mapping_(embed|fc\d+)', key)
    if m:
        return f'D.mapping.{m[1]}', None
    if key == 'D_b4_epilogue_out':
        return 'D.b4', None
    if key == 'D_cmap':
        return 'D.mapping', None
    return None


@pytest.mark.parametrize('cfg', CONFIGS)
def test_state_dict_names_and_shapes_match(cfg):
    _kwargs, G, D, _io = _load(cfg)
    expected = []
    with open(f'{vectors.VECTORS_DIR}/{cfg}_names.txt') as f:
        for line in f:
            m = re.fullmatch(r'(G|D)\s+(\S+)\s+(\[[^\]]*\])\s+\S+\s+(param|buffer)\s*', line)
            assert m, f'unexpected line in {cfg}_names.txt: {line!r}'
            expected.append((m[1], m[2], m[3].replace(' ', '')))
    ours = [('G', k, str(list(v.shape)).replace(' ', '')) for k, v in G.state_dict().items()]
    ours += [('D', k, str(list(v.shape)).replace(' ', '')) for k, v in D.state_dict().items()]
    assert sorted(ours) == sorted(expected)


@pytest.mark.parametrize('cfg', CONFIGS)
def test_parameter_counts(cfg):
    kwargs, G, D, _io = _load(cfg)
    counts = kwargs['param_counts']
    assert networks.num_params(G) == counts['G']
    assert networks.num_params(G.mapping) == counts['G_mapping']
    assert networks.num_params(G.synthesis) == counts['G_synthesis']
    assert networks.num_params(D) == counts['D']
    if 'D_mapping' in counts:
        assert networks.num_params(D.mapping) == counts['D_mapping']
    assert sum(b.numel() for b in G.buffers()) == kwargs['buffer_element_counts']['G']
    assert sum(b.numel() for b in D.buffers()) == kwargs['buffer_element_counts']['D']


@pytest.mark.parametrize('cfg', CONFIGS)
def test_ws_slicing_matches_reference(cfg):
    kwargs, G, _D, io = _load(cfg)
    assert G.num_ws == kwargs['derived']['G_num_ws']
    parts = G.synthesis.block_ws(io['ws'])
    for part, entry in zip(parts, kwargs['derived']['G_ws_slicing'], strict=True):
        assert torch.equal(part, io['ws'][:, entry['start']:entry['start'] + entry['length']])
        block = getattr(G.synthesis, entry['block'])
        assert (block.num_conv, block.num_torgb) == (entry['num_conv'], entry['num_torgb'])


@pytest.mark.parametrize('cfg', CONFIGS)
def test_every_layer_output_matches_reference(cfg):
    kwargs, G, D, io = _load(cfg)
    recorded_G, handles_G = _record_outputs(G, 'G.')
    recorded_D, handles_D = _record_outputs(D, 'D.')
    try:
        ws = G.mapping(io['z'], io['c'])
        G.synthesis(ws, noise_mode='const')
        D(io['img_const'], io['c'])
    finally:
        for handle in handles_G + handles_D:
            handle.remove()
    recorded = {**recorded_G, **recorded_D}

    checked = set()
    for key in list(io) + list(kwargs['io_aliases']):
        target = _reference_key_to_module(key)
        if target is None:
            continue
        module_name, index = target
        assert module_name in recorded, f'{key}: no module {module_name}'
        ours = recorded[module_name]
        ours = ours[index] if index is not None else ours
        ref = io[kwargs['io_aliases'].get(key, key)]
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m, key=key: f'{key}: {m}')
        checked.add(key)

    # The remaining keys are checked by the other tests of this file; make sure none is forgotten.
    covered_elsewhere = {'z', 'c', 'ws', 'ws_trunc07', 'ws_trunc05_cut2', 'w_avg', 'map_z_normalized',
                         'map_embed_normalized', 'img_const', 'img_const_nonfused', 'img_none', 'img_none_nonfused',
                         'img_G_trunc07_const', 'img_G_trunc05_cut2_const', 'img_train_mode_const',
                         'w_avg_after_train_update', 'D_logits'}
    assert set(io) - checked - covered_elsewhere == set()


@pytest.mark.parametrize('cfg', CONFIGS)
def test_mapping_and_truncation(cfg):
    _kwargs, G, _D, io = _load(cfg)
    z, c = io['z'], io['c']
    torch.testing.assert_close(G.mapping(z, c), io['ws'], atol=1e-5, rtol=0)
    torch.testing.assert_close(G.mapping.w_avg, io['w_avg'], atol=0, rtol=0)
    torch.testing.assert_close(networks.normalize_2nd_moment(z), io['map_z_normalized'], **TOL)
    if 'map_embed' in io:
        torch.testing.assert_close(networks.normalize_2nd_moment(io['map_embed']), io['map_embed_normalized'], **TOL)
    torch.testing.assert_close(G.mapping(z, c, truncation_psi=0.7), io['ws_trunc07'], atol=1e-5, rtol=0)
    cut = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    torch.testing.assert_close(cut, io['ws_trunc05_cut2'], atol=1e-5, rtol=0)
    # Rows at or after the cutoff are untouched: bitwise equal to the untruncated ws.
    assert torch.equal(cut[:, 2:], G.mapping(z, c)[:, 2:])


@pytest.mark.parametrize('cfg', CONFIGS)
@pytest.mark.parametrize('key, kwargs', [
    ('img_const',           dict(noise_mode='const')),
    ('img_const_nonfused',  dict(noise_mode='const', fused_modconv=False)),
    ('img_none',            dict(noise_mode='none')),
    ('img_none_nonfused',   dict(noise_mode='none', fused_modconv=False)),
])
def test_synthesis_images(cfg, key, kwargs):
    _kwargs, G, _D, io = _load(cfg)
    torch.testing.assert_close(G.synthesis(io['ws'], **kwargs), io[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize('cfg', CONFIGS)
def test_generator_call_with_truncation(cfg):
    _kwargs, G, _D, io = _load(cfg)
    z, c = io['z'], io['c']
    torch.testing.assert_close(G(z, c, truncation_psi=0.7, noise_mode='const'), io['img_G_trunc07_const'],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(G(z, c, truncation_psi=0.5, truncation_cutoff=2, noise_mode='const'),
                               io['img_G_trunc05_cut2_const'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('cfg', CONFIGS)
def test_train_mode_and_w_avg_update(cfg):
    _kwargs, G, _D, io = _load(cfg)
    G_train = copy.deepcopy(G).train()
    ws = G_train.mapping(io['z'], io['c'], skip_w_avg_update=True)
    assert torch.equal(G_train.mapping.w_avg, io['w_avg'])
    img = G_train.synthesis(ws, noise_mode='const')  # Train mode: the non-fused path.
    torch.testing.assert_close(img, io['img_train_mode_const'], atol=1e-5, rtol=0)
    # Train mode defaults to the non-fused path: bitwise the eval-mode non-fused image of the same ws.
    assert torch.equal(img, G.synthesis(ws, noise_mode='const', fused_modconv=False))

    G_update = copy.deepcopy(G).train()
    G_update.mapping(io['z'], io['c'])
    torch.testing.assert_close(G_update.mapping.w_avg, io['w_avg_after_train_update'], atol=1e-6, rtol=1e-6)
    G.mapping(io['z'], io['c'])  # Eval mode never updates w_avg.
    assert torch.equal(G.mapping.w_avg, io['w_avg'])


@pytest.mark.parametrize('cfg', CONFIGS)
def test_discriminator_logits(cfg):
    _kwargs, _G, D, io = _load(cfg)
    torch.testing.assert_close(D(io['img_const'], io['c']), io['D_logits'], **TOL)

# ----------------------------------------------------------------------------
# Op cases that belong to the network module.


def _case_tolerance(case):
    return vectors.tolerances(case)


@pytest.mark.parametrize('case', vectors.op_cases('modulated_conv2d'), ids=vectors.case_id)
def test_modulated_conv2d_cases(case):
    out = networks.modulated_conv2d(**vectors.case_inputs(case), **case['kwargs'])
    assert list(out.shape) == case['out_shape']
    torch.testing.assert_close(out, vectors.case_output(case), **_case_tolerance(case))


@pytest.mark.parametrize('case', vectors.op_cases('normalize_2nd_moment'), ids=vectors.case_id)
def test_normalize_2nd_moment_cases(case):
    out = networks.normalize_2nd_moment(**vectors.case_inputs(case), **case['kwargs'])
    torch.testing.assert_close(out, vectors.case_output(case), **_case_tolerance(case))


@pytest.mark.parametrize('case', vectors.op_cases('MinibatchStdLayer'), ids=vectors.case_id)
def test_minibatch_std_cases(case):
    layer = networks.MinibatchStdLayer(**case['kwargs'])
    out = layer(**vectors.case_inputs(case))
    assert list(out.shape) == case['out_shape']
    torch.testing.assert_close(out, vectors.case_output(case), **_case_tolerance(case))


def test_op_cases_exist():
    if not vectors.available():
        pytest.skip('reference vectors not found')
    assert len(vectors.op_cases('modulated_conv2d')) == 36
    assert len(vectors.op_cases('MinibatchStdLayer')) == 14
