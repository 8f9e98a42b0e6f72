"""torch.compile: Dynamo traces G and D without graph breaks (reference path and kernel path), the kernels'
custom ops pass `torch.library.opcheck`, compiled networks agree with eager ones, and `--compile` of train.py,
generate.py and calc_metrics.py works end to end with snapshots that do not depend on it.

The compiled runs use the `aot_eager` backend (Dynamo + AOTAutograd, no code generation): inductor's C++ build of
every graph would take minutes on a 2-core CI machine. bench/networks.py measures inductor.
"""

import pickle

import numpy as np
import PIL.Image
import pytest
import torch
import torch._dynamo
from click.testing import CliRunner

import calc_metrics
import dataset_tool
import generate
import train
from torch_utils import compiler
from torch_utils.ops import bias_act, conv2d_gradfix, dispatch, upfirdn2d
from training import networks, snapshot_io

pytestmark = pytest.mark.usefixtures('one_thread')

BACKEND = 'aot_eager'


def _tiny_G(architecture, **kwargs):
    synthesis_kwargs = dict(channel_base=128, channel_max=16, architecture=architecture, **kwargs)
    return networks.Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3,
                              mapping_kwargs=dict(num_layers=1), synthesis_kwargs=synthesis_kwargs)


def _tiny_D(architecture):
    return networks.Discriminator(c_dim=2, img_resolution=8, img_channels=3, architecture=architecture,
                                  channel_base=128, channel_max=16, mapping_kwargs=dict(num_layers=1))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_path(monkeypatch):
    """Every op takes its kernel path, i.e. its torch.library custom op (which runs on the CPU too)."""
    monkeypatch.setattr(dispatch, 'use_cuda_kernel', lambda impl, x, plugin: impl == 'cuda')


def _training_paths(monkeypatch, path):
    """The ops on their `path` ('reference', or 'kernel': the custom ops), and our convolution Functions on, as
    in training (they must trace too)."""
    if path == 'kernel':
        monkeypatch.setattr(dispatch, 'use_cuda_kernel', lambda impl, x, plugin: impl == 'cuda')
    monkeypatch.setattr(conv2d_gradfix, 'enabled', True)


def _explain(fn, *args, **kwargs):
    """(number of graph breaks, their reasons, the custom-op calls in the graphs by op name) of fn(*args)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    ops = dict(bias_act_kernel=0, upfirdn2d_kernel=0)
    for graph in explanation.graphs:
        for node in graph.graph.nodes:
            for name in ops:
                ops[name] += name in str(node.target)
    return explanation.graph_break_count, [reason.reason for reason in explanation.break_reasons], ops


# (architecture, synthesis options, training mode) of the generators each test traces: train mode runs modulated
# activations, eval mode the fused grouped convolution.
G_CASES = {
    'reference': [('skip', {}, True), ('skip', {}, False), ('squeeze', dict(squeeze_r=4), True),
                  ('squeeze', dict(squeeze_r=4), False)],
    'kernel':    [('skip', {}, False), ('squeeze', dict(squeeze_r=4), True)],
}
D_CASES = {'reference': ['orig', 'skip', 'resnet'], 'kernel': ['skip', 'resnet']}


@pytest.mark.parametrize('path', ['reference', 'kernel'])
def test_G_and_D_trace_without_graph_breaks(fresh_dynamo, monkeypatch, path):
    _training_paths(monkeypatch, path)
    torch.manual_seed(0)
    z, c = torch.randn(2, 8), torch.zeros(2, 0)
    for architecture, kwargs, training in G_CASES[path]:
        breaks, reasons, ops = _explain(_tiny_G(architecture, **kwargs).train(training), z, c)
        assert (breaks, reasons) == (0, [])
        # On the kernel path the kernels are in the graph as single nodes, not traced through or left out.
        assert all(count > 0 if path == 'kernel' else count == 0 for count in ops.values()), ops
    img, label = torch.randn(2, 3, 8, 8), torch.randn(2, 2)
    for architecture in D_CASES[path]:
        breaks, reasons, ops = _explain(_tiny_D(architecture), img, label)
        assert (breaks, reasons) == (0, [])
        assert (ops['bias_act_kernel'] > 0) == (path == 'kernel'), ops


def test_kernel_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    for act in ('lrelu', 'tanh', 'swish'):  # Gradient from y without / with f'', from x with f''.
        spec = bias_act.activation_funcs[act]
        from_x = spec.ref == 'x'
        for clamp in (-1.0, 0.5):
            x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
            config = (1, spec.cuda_idx, 0.2, 1.3, clamp)
            torch.library.opcheck(bias_act._kernel_op, (x, b, None, None, None, 0, *config))
            y = bias_act._kernel_op(x.detach(), b.detach(), None, None, None, 0, *config)
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64, requires_grad=True)
            xref, bref, yref = (x, b, None) if from_x else (None, None, y.requires_grad_(True))
            torch.library.opcheck(bias_act._kernel_op, (dy, bref, xref, yref, None, 1, *config))
            # Mode 2 has no derivative of its own (a third one): checked without gradients.
            detached = [t.detach() if t is not None else None for t in (dy, bref, xref, yref)]
            torch.library.opcheck(bias_act._kernel_op, (*detached, dy.detach(), 2, *config))
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    for up, down, padding, channels_last in (((2, 2), (1, 1), (2, 1, 2, 1), False), ((1, 2), (2, 1), (-1, 2, 0, 3), True)):
        x = torch.randn(2, 4, 6, 6, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for flip in (False, True):
            args = (x.requires_grad_(True), f, *up, *down, *padding, flip, 2.0)
            torch.library.opcheck(upfirdn2d._kernel_op, args)


@pytest.mark.parametrize('kind', ['custom_op', 'function'])
def test_kernel_ops_match_the_reference_to_second_order(kernel_path, monkeypatch, kind):
    # The parity probes compare value, gradient and second-order gradient of the kernel path (here: the custom
    # ops with their CPU implementations and autograd formulas) with the reference path, in float32 and float16.
    # 'function': the autograd.Function that dispatch.kernel_op makes of the same pieces on PyTorch < 2.4.
    for op in (bias_act, upfirdn2d):
        if kind == 'function':
            monkeypatch.setattr(op, '_kernel_op', dispatch._function_op(op._kernel_impl, op._kernel_setup_context,
                                                                        op._kernel_backward))
        result = op.probe_kernel('cpu')
        assert result.ok, result.describe()


def _train_step(G, D, z, c):
    """Images, logits and every parameter gradient of one G+D forward and backward pass."""
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # The noise inputs.
    img = G(z, c)
    logits = D(img, c)
    logits.square().sum().backward()
    return [img.detach(), logits.detach()] + [p.grad for p in [*G.parameters(), *D.parameters()]]


@pytest.mark.parametrize('path', ['reference', 'kernel'])
def test_compiled_networks_agree_with_eager(fresh_dynamo, monkeypatch, path):
    _training_paths(monkeypatch, path)
    torch.manual_seed(0)
    G = _tiny_G('squeeze', squeeze_r=4)
    D = networks.Discriminator(c_dim=0, img_resolution=8, img_channels=3, channel_base=128, channel_max=16)
    z, c = torch.randn(4, 8), torch.zeros(4, 0)
    eager = _train_step(G, D, z, c)
    compiled = _train_step(torch.compile(G, backend=BACKEND), torch.compile(D, backend=BACKEND), z, c)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    if path == 'reference':  # Eval mode (the fused modulated convolution), as generate.py and the metrics run G.
        G.eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(G, backend=BACKEND)(z, c, noise_mode='const'),
                                       G(z, c, noise_mode='const'), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The scripts.


@pytest.fixture(scope='module')
def dataset_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('compile')
    images = root / 'images'
    images.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(8):
        PIL.Image.fromarray((rnd.rand(16, 16, 3) * 255).astype(np.uint8)).save(images / f'{i:02d}.png')
    result = CliRunner().invoke(dataset_tool.main, [f'--source={images}', f'--dest={root / "tiny.zip"}'])
    assert result.exit_code == 0, result.output
    return str(root / 'tiny.zip')


TINY_FLAGS = ['--cfg=cifar', '--cbase=128', '--cmax=16', '--map=1', '--batch=4', '--gpus=0', '--metrics=none',
              '--workers=0', '--kimg=0.008', '--tick=0.004', '--snap=1', '--aug=noaug', '--arch=squeeze',
              '--squeeze-r=4']


def _png(path):
    with PIL.Image.open(path) as image:
        return np.asarray(image).astype(np.int16)


def test_train_and_generate_with_compile(tmp_path, dataset_zip, monkeypatch, fresh_dynamo):
    # Dynamo alone: what this test checks is the flags' plumbing and the snapshots (the tests above check that
    # the compiled graphs compute the same numbers).
    monkeypatch.setenv(compiler.BACKEND_ENV_VAR, 'eager')
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={dataset_zip}', *TINY_FLAGS,
                                             '--compile'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / 'runs').iterdir()
    assert 'tick 1' in (run_dir / 'log.txt').read_text()
    snapshot_path = run_dir / 'network-snapshot-000000.008.pkl'

    # The snapshot holds the plain networks: nothing of torch.compile is pickled, and it loads and runs as is.
    raw = snapshot_path.read_bytes()
    assert b'OptimizedModule' not in raw and b'_orig_mod' not in raw and b'torch._dynamo' not in raw
    with open(snapshot_path, 'rb') as f:
        snapshot = snapshot_io.load_network_pkl(f)
    for name in ('G', 'D', 'G_ema'):
        assert type(snapshot[name]).__name__ in ('Generator', 'Discriminator')
    assert snapshot['G_ema'](torch.randn(1, snapshot['G_ema'].z_dim), None).shape == (1, 3, 16, 16)
    assert pickle.loads(pickle.dumps(snapshot['G'])) is not None

    outputs = []
    for flags in ([], ['--compile']):
        outdir = tmp_path / f'out{len(flags)}'
        result = CliRunner().invoke(generate.main, [f'--network={snapshot_path}', '--seeds=0-1', f'--outdir={outdir}',
                                                    '--device=cpu', *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append([_png(outdir / f'seed{seed:04d}.png') for seed in (0, 1)])
    for eager, compiled in zip(*outputs, strict=True):
        assert np.abs(eager - compiled).max() <= 1  # One step of uint8 rounding at most.


def test_compile_without_a_backend_is_one_error_line(tmp_path, dataset_zip, monkeypatch):
    monkeypatch.setenv(compiler.BACKEND_ENV_VAR, 'no_such_backend')
    runs = tmp_path / 'runs'
    commands = [
        (train.main, [f'--outdir={runs}', f'--data={dataset_zip}', *TINY_FLAGS, '--compile']),
        (generate.main, ['--network=missing.pkl', '--seeds=0', f'--outdir={tmp_path / "out"}', '--device=cpu',
                         '--compile']),
        (calc_metrics.main, ['--network=missing.pkl', '--gpus=0', '--compile']),
    ]
    for command, args in commands:
        result = CliRunner().invoke(command, args)
        assert result.exit_code != 0
        errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
        assert len(errors) == 1 and '--compile' in errors[0] and 'no_such_backend' in errors[0], result.output
        assert 'Traceback' not in result.output
    assert not runs.exists() and not (tmp_path / 'out').exists()  # Refused before any work.


def test_the_compiled_wrapper_is_never_the_module(fresh_dynamo, monkeypatch):
    monkeypatch.setenv(compiler.BACKEND_ENV_VAR, BACKEND)
    G = _tiny_G('skip')
    wrapped = compiler.compile_module(G, torch.device('cpu'))
    assert wrapped is not G and wrapped.z_dim == G.z_dim  # Attributes come from the module itself.
    assert type(G) is networks.Generator and not any('_orig_mod' in key for key in G.state_dict())
