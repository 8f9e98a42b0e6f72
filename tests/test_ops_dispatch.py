"""torch_utils.ops.dispatch: the auto/ref/cuda policy and lazy plugin loading."""

import types
import warnings

import pytest
import torch

from torch_utils import custom_ops
from torch_utils.ops import dispatch

CPU = types.SimpleNamespace(device=torch.device('cpu'))
# use_cuda_kernel only looks at the device type, so a stand-in is enough to test the decision table.
GPU = types.SimpleNamespace(device=torch.device('cuda', 0))


class _FakeGetPlugin:
    def __init__(self, fail):
        self.fail = fail
        self.calls = 0

    def __call__(self, module_name, **kwargs):
        self.calls += 1
        if self.fail:
            raise custom_ops.PluginBuildError(f'The PyTorch extension "{module_name}" could not be built')
        return types.SimpleNamespace(name=module_name)


@pytest.fixture
def plugin_factory(monkeypatch):
    def make(fail):
        fake = _FakeGetPlugin(fail)
        monkeypatch.setattr(custom_ops, 'get_plugin', fake)
        return dispatch.LazyPlugin('fake_plugin', sources=['fake.cpp']), fake
    return make


def test_policy_from_environment_and_context(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.current_policy() == 'auto'
    monkeypatch.setenv(dispatch.ENV_VAR, ' REF ')
    assert dispatch.current_policy() == 'ref'
    with dispatch.use_impl('cuda'):  # The context manager wins over the environment...
        assert dispatch.current_policy() == 'cuda'
        with dispatch.use_impl('auto'):  # ...and the innermost block wins.
            assert dispatch.current_policy() == 'auto'
        assert dispatch.current_policy() == 'cuda'
    assert dispatch.current_policy() == 'ref'
    monkeypatch.setenv(dispatch.ENV_VAR, 'fast')
    with pytest.raises(ValueError, match='auto, ref, cuda'):
        dispatch.current_policy()
    with pytest.raises(ValueError, match='auto, ref, cuda'):
        with dispatch.use_impl('kernel'):
            pass


def test_use_impl_restores_on_error(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.raises(KeyError):
        with dispatch.use_impl('ref'):
            raise KeyError('boom')
    assert dispatch.current_policy() == 'auto'


def test_decision_table(plugin_factory, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    plugin, fake = plugin_factory(fail=False)
    # auto: the kernel only for impl='cuda' on a CUDA tensor.
    assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is True
    assert dispatch.use_cuda_kernel('ref', GPU, plugin) is False
    assert dispatch.use_cuda_kernel('cuda', CPU, plugin) is False
    with dispatch.use_impl('ref'):
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
    with dispatch.use_impl('cuda'):
        assert dispatch.use_cuda_kernel('ref', GPU, plugin) is True
        with pytest.raises(RuntimeError, match='fake_plugin.*cpu'):
            dispatch.use_cuda_kernel('cuda', CPU, plugin)
    with pytest.raises(ValueError, match='impl'):
        dispatch.use_cuda_kernel('fast', GPU, plugin)
    assert fake.calls == 1  # Built once, then reused.


def test_failed_build_warns_once_then_falls_back(plugin_factory, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    plugin, fake = plugin_factory(fail=True)
    with pytest.warns(RuntimeWarning, match='Falling back to the reference'):
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert dispatch.use_cuda_kernel('cuda', GPU, plugin) is False
    with dispatch.use_impl('cuda'), pytest.raises(custom_ops.PluginBuildError, match='fake_plugin'):
        dispatch.use_cuda_kernel('cuda', GPU, plugin)
    assert fake.calls == 1  # The failure is remembered: no second build attempt.
    plugin.reset()
    with pytest.warns(RuntimeWarning):
        plugin.available()
    assert fake.calls == 2
