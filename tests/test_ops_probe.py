"""Parity probes (torch_utils/ops/probe.py) and the verdicts dispatch draws from them.

Without a GPU the probe is driven three ways: with the reference path standing in for the kernel (it must
pass) and with deliberately wrong stand-ins (they must be caught); with the kernels' host builds from
test_ops_bias_act / test_ops_upfirdn2d standing in for the CUDA plugins (`slow`: they are compiled first),
good and broken; and through `dispatch.use_cuda_kernel`, whose per-(op, device) verdict, log line, warning,
fallback and strict error are checked with injected probes. The `cuda` tests run the real probe on a GPU.
"""

import os
import subprocess
import sys
import types
import warnings

import pytest
import test_ops_bias_act
import test_ops_upfirdn2d
import torch
from host_kernels import StubPlugin

from torch_utils import custom_ops
from torch_utils.ops import bias_act, dispatch, upfirdn2d
from torch_utils.ops.probe import TOLERANCES, ProbeResult, probe_error, probe_op

pytestmark = pytest.mark.usefixtures('one_thread')

GPU = types.SimpleNamespace(device=torch.device('cuda', 0))  # use_cuda_kernel only reads the device.

OPS = {
    'bias_act': (bias_act, bias_act._bias_act_ref),
    'upfirdn2d': (upfirdn2d, upfirdn2d._upfirdn2d_ref),
}


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(custom_ops, 'verbosity', 'brief')
    dispatch.reset_kernel_verdicts()
    yield
    dispatch.reset_kernel_verdicts()


def _probe(name, run_kernel, device='cpu'):
    module, reference = OPS[name]
    return probe_op(name, run_kernel, reference, module.probe_cases(device))

# ----------------------------------------------------------------------------
# probe_op with stand-ins written in Python.


def _offset(reference, amount):
    """A 'kernel' whose value is off by `amount` everywhere."""
    return lambda *args, **kwargs: reference(*args, **kwargs) + amount


def _wrong_gradient(reference, factor):
    """A 'kernel' with the right value whose gradient is `factor` times too large."""
    def run(*args, **kwargs):
        y = reference(*args, **kwargs)
        return y + (factor - 1) * (y - y.detach())
    return run


@pytest.mark.parametrize('name', list(OPS))
def test_reference_standing_in_for_the_kernel_passes(name):
    result = _probe(name, OPS[name][1])
    assert result.ok, result.describe()
    # float16 rounding shows (the float16 cases are not compared in float64), but well within the tolerance.
    assert 0 < result.error <= TOLERANCES[torch.float16] / 4


@pytest.mark.parametrize('name', list(OPS))
def test_a_small_offset_is_caught(name):
    # 1e-3 is invisible in float16 (its tolerance is 1e-2) but ten times the float32 tolerance.
    result = _probe(name, _offset(OPS[name][1], 1e-3))
    assert not result.ok
    assert result.case.endswith('/float32') and result.quantity == 'y'
    assert TOLERANCES[torch.float32] < result.error < 1e-3
    assert result.case in result.describe() and f'{result.error:.3g}' in result.describe()


@pytest.mark.parametrize('name', list(OPS))
def test_a_wrong_gradient_is_caught(name):
    result = _probe(name, _wrong_gradient(OPS[name][1], 1.01))
    assert not result.ok and result.quantity == 'dx', result.describe()


def test_a_raising_kernel_is_caught():
    def broken(*args, **kwargs):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    result = _probe('bias_act', broken)
    assert not result.ok and result.error == float('inf')
    assert 'illegal memory access' in result.describe() and result.case in result.describe()


def test_probe_error_measure():
    ref = torch.tensor([0.5, -3.0])
    assert probe_error(ref, ref) == 0
    assert probe_error(ref + torch.tensor([0.0, 0.4]), ref) == pytest.approx(0.1)  # 0.4 / (1 + 3).
    assert probe_error(torch.tensor([0.5, float('nan')]), ref) == float('inf')
    assert probe_error(ref[:1], ref) == float('inf')


def test_probe_ignores_the_callers_grad_mode_and_random_state():
    # The first kernel call may come from inference code; the probe needs autograd regardless, and it must not
    # advance the global random stream that training seeds for exact resumes.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode():
        assert _probe('bias_act', bias_act._bias_act_ref).ok
    with torch.no_grad():
        assert _probe('upfirdn2d', upfirdn2d._upfirdn2d_ref).ok
    assert torch.equal(torch.rand(3), expected)


def test_import_runs_no_probe():
    code = ('import torch_utils.ops.bias_act, torch_utils.ops.upfirdn2d, torch_utils.ops.dispatch as d; '
            'assert not d._verdicts')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))

# ----------------------------------------------------------------------------
# Verdicts in dispatch, with injected probes.


class _CountingProbe:
    def __init__(self, run_kernel, name='bias_act'):
        self.run_kernel = run_kernel
        self.name = name
        self.devices = []

    def __call__(self, device):
        # The verdict is keyed by the device asked for; the probe itself runs on the CPU here.
        self.devices.append(str(device))
        return _probe(self.name, self.run_kernel)


def _plugin(monkeypatch, probe):
    monkeypatch.setattr(custom_ops, 'get_plugin', lambda module_name, **kwargs: types.SimpleNamespace())
    return dispatch.LazyPlugin('bias_act_plugin', sources=['bias_act.cpp'], probe=probe)


def test_good_kernel_is_probed_once_per_device_and_logged_once(monkeypatch, capsys):
    probe = _CountingProbe(bias_act._bias_act_ref)
    plugin = _plugin(monkeypatch, probe)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(3):
            assert dispatch.use_cuda_kernel('cuda', GPU, plugin)
        with dispatch.use_impl('cuda'):
            assert dispatch.use_cuda_kernel('cuda', GPU, plugin)
    out = capsys.readouterr().out
    assert out.count('Ops: bias_act kernel ok on cuda:0 (probe ') == 1 and out.count('\n') == 1
    assert probe.devices == ['cuda:0']
    # Another device is probed on its own; reset_kernel_verdicts() makes every device probe again.
    assert dispatch.use_cuda_kernel('cuda', types.SimpleNamespace(device=torch.device('cuda', 1)), plugin)
    dispatch.reset_kernel_verdicts()
    assert dispatch.use_cuda_kernel('cuda', GPU, plugin)
    assert probe.devices == ['cuda:0', 'cuda:1', 'cuda:0']
    # So does resetting the plugin, whose module may be rebuilt.
    plugin.reset()
    assert dispatch.use_cuda_kernel('cuda', GPU, plugin)
    assert len(probe.devices) == 4


def test_verbosity_none_silences_the_log_line(monkeypatch, capsys):
    monkeypatch.setattr(custom_ops, 'verbosity', 'none')
    assert dispatch.use_cuda_kernel('cuda', GPU, _plugin(monkeypatch, _CountingProbe(bias_act._bias_act_ref)))
    assert capsys.readouterr().out == ''


def test_broken_kernel_warns_once_and_falls_back_under_auto(monkeypatch, capsys):
    probe = _CountingProbe(_offset(bias_act._bias_act_ref, 1e-3))
    plugin = _plugin(monkeypatch, probe)
    with pytest.warns(RuntimeWarning) as record:
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
    (message,) = [str(w.message) for w in record]
    assert 'bias_act' in message and 'lrelu_clamp/float32' in message and 'max error' in message
    assert 'Falling back to the reference' in message
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
        assert dispatch.use_cuda_kernel('ref', GPU, plugin) is False
    assert probe.devices == ['cuda:0'] and 'kernel ok' not in capsys.readouterr().out


def test_broken_kernel_raises_under_strict_cuda_policy(monkeypatch):
    probe = _CountingProbe(_wrong_gradient(bias_act._bias_act_ref, 1.01))
    plugin = _plugin(monkeypatch, probe)
    monkeypatch.setenv(dispatch.ENV_VAR, 'cuda')
    for _ in range(2):  # Every strict call raises, not only the first; the probe still runs once.
        with pytest.raises(dispatch.KernelMismatchError, match=r'bias_act.*lrelu_clamp/float32, dx: max error'):
            dispatch.use_cuda_kernel('cuda', GPU, plugin)
    assert probe.devices == ['cuda:0']
    assert not dispatch.probe_results()[('bias_act_plugin', 'cuda:0')].ok
    assert issubclass(dispatch.KernelMismatchError, RuntimeError)


def test_plugin_without_probe_is_trusted(monkeypatch):
    plugin = _plugin(monkeypatch, None)
    assert dispatch.kernel_verdict(plugin, torch.device('cuda', 0), strict=True)
    assert not dispatch.probe_results()


def test_op_plugins_have_probes():
    for name, (module, _) in OPS.items():
        assert module._plugin.probe is not None, name

# ----------------------------------------------------------------------------
# The host builds of the kernels standing in for the CUDA plugins.


@pytest.fixture(scope='module')
def bias_act_host(tmp_path_factory):
    return test_ops_bias_act.build_host_plugin(tmp_path_factory.mktemp('probe_bias_act_host'))


@pytest.fixture(scope='module')
def upfirdn2d_host(tmp_path_factory):
    # The real grid limits: the probe's shapes must reach every kernel as the plugin's launcher chooses them.
    host = test_ops_upfirdn2d.build_host_plugin(tmp_path_factory.mktemp('probe_upfirdn2d_host'))
    host.variant = 0  # Let the launcher choose the kernel, as the real plugin does.
    return host


class _BrokenBiasAct:
    """The host kernel with one mode (grad 0: value, 1: gradient) scaled by `scale` and shifted by `offset`."""

    def __init__(self, host, grad, scale=1.0, offset=0.0):
        self.host, self.grad, self.scale, self.offset = host, grad, scale, offset

    def bias_act(self, *args, **kwargs):
        out = self.host.bias_act(*args, **kwargs)
        return out * self.scale + self.offset if kwargs['grad'] == self.grad else out


class _BrokenUpfirdn2d:
    """The host kernels with every output shifted by `offset`."""

    def __init__(self, host, offset):
        self.host, self.offset = host, offset

    def upfirdn2d(self, *args):
        return self.host.upfirdn2d(*args) + self.offset


def _use(monkeypatch, module, kernel, module_name):
    monkeypatch.setattr(module, '_plugin', StubPlugin(kernel, module_name))
    monkeypatch.setattr(module, '_host_module', kernel)  # What the op's custom op runs for CPU tensors.


@pytest.mark.slow
def test_host_bias_act_kernel_passes_its_probe(bias_act_host, monkeypatch):
    _use(monkeypatch, bias_act, bias_act_host, 'bias_act_plugin')
    bias_act_host.calls.clear()
    result = bias_act.probe_kernel('cpu')
    assert result.ok, result.describe()
    print(result.describe())  # The probe's cost on the host build, for the log (never asserted).
    assert set(bias_act_host.calls) == {0, 1, 2}  # Value, gradient and the f'' term all ran the kernel.


@pytest.mark.slow
def test_host_upfirdn2d_kernel_passes_its_probe(upfirdn2d_host, monkeypatch):
    _use(monkeypatch, upfirdn2d, upfirdn2d_host, 'upfirdn2d_plugin')
    upfirdn2d_host.kernels_used.clear()
    result = upfirdn2d.probe_kernel('cpu')
    assert result.ok, result.describe()
    print(result.describe())  # The probe's cost on the host build, for the log (never asserted).
    assert upfirdn2d_host.kernels_used == {'general', 'tiled_planar', 'tiled_channel_groups'}


@pytest.mark.slow
@pytest.mark.parametrize('grad, scale, offset, quantity', [(0, 1.0, 1e-3, 'y'), (1, 1.01, 0.0, 'dx')],
                         ids=['value_off', 'gradient_off'])
def test_broken_host_bias_act_kernel_is_caught(bias_act_host, monkeypatch, grad, scale, offset, quantity):
    _use(monkeypatch, bias_act, _BrokenBiasAct(bias_act_host, grad, scale, offset), 'bias_act_plugin')
    result = bias_act.probe_kernel('cpu')
    assert not result.ok and result.case == 'lrelu_clamp/float32' and result.quantity == quantity


@pytest.mark.slow
def test_broken_host_upfirdn2d_kernel_is_caught(upfirdn2d_host, monkeypatch):
    _use(monkeypatch, upfirdn2d, _BrokenUpfirdn2d(upfirdn2d_host, 1e-3), 'upfirdn2d_plugin')
    result = upfirdn2d.probe_kernel('cpu')
    assert not result.ok and result.case == 'up2/float32' and result.quantity == 'y'


@pytest.mark.slow
@pytest.mark.parametrize('broken', [False, True], ids=['good', 'broken'])
def test_host_kernel_through_dispatch(bias_act_host, monkeypatch, capsys, broken):
    # The op's own probe, behind a LazyPlugin that "builds" the host kernel; the probe runs on the CPU even
    # though dispatch keys the verdict by the CUDA device the call asked for.
    kernel = _BrokenBiasAct(bias_act_host, 0, offset=1e-3) if broken else bias_act_host
    monkeypatch.setattr(custom_ops, 'get_plugin', lambda module_name, **kwargs: kernel)
    plugin = dispatch.LazyPlugin('bias_act_plugin', sources=['bias_act.cpp'],
                                 probe=lambda device: bias_act.probe_kernel('cpu'))
    monkeypatch.setattr(bias_act, '_plugin', plugin)
    monkeypatch.setattr(bias_act, '_host_module', kernel)  # What the op's custom op runs for CPU tensors.
    if not broken:
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) and dispatch.use_cuda_kernel('cuda', GPU, plugin)
        assert capsys.readouterr().out.count('Ops: bias_act kernel ok on cuda:0') == 1
        return
    with pytest.warns(RuntimeWarning, match='lrelu_clamp/float32, y: max error'):
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
    with dispatch.use_impl('cuda'), pytest.raises(dispatch.KernelMismatchError, match='bias_act'):
        dispatch.use_cuda_kernel('cuda', GPU, plugin)

# ----------------------------------------------------------------------------
# The real probe on a GPU.


@pytest.mark.cuda
@pytest.mark.parametrize('name', list(OPS))
def test_real_probe_passes_on_gpu(name):
    result = OPS[name][0].probe_kernel(torch.device('cuda', torch.cuda.current_device()))
    assert isinstance(result, ProbeResult) and result.ok, result.describe()
    print(f'{name}: {result.describe()}')  # The probe's cost, for the log (never asserted: see STYLE.md).


@pytest.mark.cuda
def test_first_gpu_call_probes_and_logs_once(capsys):
    x = torch.randn(2, 8, 4, 4, device='cuda')
    b = torch.zeros(8, device='cuda')
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device='cuda')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # A failing probe warns; on a correct kernel nothing does.
        for _ in range(2):
            bias_act.bias_act(x, b, act='lrelu')
            upfirdn2d.upsample2d(x, f)
    out = capsys.readouterr().out
    device = f'cuda:{x.device.index}'
    for name in OPS:
        assert out.count(f'Ops: {name} kernel ok on {device} (probe ') == 1, out
        assert dispatch.probe_results()[(f'{name}_plugin', device)].ok
