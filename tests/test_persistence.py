"""torch_utils.persistence: the version-6 snapshot protocol.

Module sources are written as strings here, pickled through the protocol and loaded in fresh interpreters
where the defining module does not exist as a file, the situation of an official snapshot.
"""

import copy
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import persistence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET_SOURCE = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Net(torch.nn.Module):
        def __init__(self, channels, *, scale=2.0, extra=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(channels, dtype=torch.float32))
            self.register_buffer('count', torch.zeros([]))
            self.scale = scale
            if extra is not None:
                extra['touched'] = True  # Modifies its argument: the recorded kwargs must not show it.

        def forward(self, x):
            return x * self.weight * self.scale

        def version(self):
            return 'v1'
''')


def _import_source(tmp_path, module_name, source):
    """Write `source` as an importable module and import it."""
    (tmp_path / f'{module_name}.py').write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(tmp_path))


def _run_fresh(code, cwd):
    """Run `code` in a fresh interpreter (repo importable, nothing else) and return its JSON output."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _meta_of(data):
    """Unpickle `data`, but return the `meta` records instead of rebuilding the persistent objects."""
    class MetaUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return lambda meta: ('META', meta)
            return super().find_class(module, name)
    return MetaUnpickler(io.BytesIO(data)).load()


@pytest.fixture
def net_module(tmp_path):
    module = _import_source(tmp_path, 'persist_net_v1', NET_SOURCE)
    yield module
    sys.modules.pop('persist_net_v1', None)


# ----------------------------------------------------------------------------


def test_pickle_format_is_the_official_version_6_record(net_module):
    net = net_module.Net(3, scale=3.0)
    meta = _meta_of(pickle.dumps(net))[1]
    assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert meta['type'] == 'class' and meta['version'] == 6 == persistence._version
    assert meta['module_src'] == NET_SOURCE
    assert meta['class_name'] == 'Net'
    assert meta['state']['_init_args'] == (3,)
    assert meta['state']['_init_kwargs'] == {'scale': 3.0}
    assert torch.equal(meta['state']['_parameters']['weight'], torch.arange(3.0))


def test_snapshot_loads_in_a_fresh_interpreter_without_the_module_file(net_module, tmp_path):
    extra = {'a': [1, 2]}
    net = net_module.Net(3, scale=3.0, extra=extra)
    assert extra['touched'] is True
    with torch.no_grad():
        net.weight.copy_(torch.tensor([1.5, -2.0, 4.0]))
    snapshot = dict(training_set_kwargs=dnnlib.EasyDict(path='data.zip'), G=net, D=None)
    (tmp_path / 'snapshot.pkl').write_bytes(pickle.dumps(snapshot))
    os.remove(tmp_path / 'persist_net_v1.py')  # The loader must rely on the embedded source alone.

    out = _run_fresh('''
        import json, pickle, torch
        from torch_utils import persistence
        with open('snapshot.pkl', 'rb') as f:
            snap = pickle.load(f)
        G = snap['G']
        print(json.dumps(dict(
            cls=type(G).__name__, module=type(G).__module__, persistent=persistence.is_persistent(G),
            out=G(torch.ones(3)).tolist(), weight=G.weight.tolist(), version=G.version(),
            init_args=list(G.init_args), init_kwargs=G.init_kwargs, kwargs_type=type(G.init_kwargs).__name__,
            set_kwargs_type=type(snap['training_set_kwargs']).__module__ + '.' + type(snap['training_set_kwargs']).__name__,
            buffers=[name for name, _ in G.named_buffers()], training=G.training)))
    ''', cwd=tmp_path)
    assert out['cls'] == 'Net' and out['module'].startswith('_imported_module_') and out['persistent']
    assert out['weight'] == [1.5, -2.0, 4.0]
    assert out['out'] == [4.5, -6.0, 12.0]
    assert out['version'] == 'v1'
    assert out['init_args'] == [3]
    assert out['init_kwargs'] == {'scale': 3.0, 'extra': {'a': [1, 2]}}
    assert out['kwargs_type'] == 'EasyDict'
    assert out['set_kwargs_type'] == 'dnnlib.util.EasyDict'
    assert out['buffers'] == ['count']
    assert out['training'] is True


def test_two_versions_of_a_module_load_side_by_side(net_module, tmp_path):
    v2_source = NET_SOURCE.replace("return 'v1'", "return 'v2'").replace('x * self.weight', 'x + self.weight')
    v2 = _import_source(tmp_path, 'persist_net_v2', v2_source)
    try:
        pair = [net_module.Net(2), v2.Net(2)]
    finally:
        sys.modules.pop('persist_net_v2', None)
    (tmp_path / 'pair.pkl').write_bytes(pickle.dumps(pair))
    for name in ['persist_net_v1.py', 'persist_net_v2.py']:
        os.remove(tmp_path / name)
    out = _run_fresh('''
        import json, pickle, torch
        a, b = pickle.load(open('pair.pkl', 'rb'))
        print(json.dumps(dict(versions=[a.version(), b.version()], same_class=type(a) is type(b),
                              outs=[a(torch.ones(2)).tolist(), b(torch.ones(2)).tolist()])))
    ''', cwd=tmp_path)
    assert out['versions'] == ['v1', 'v2']
    assert out['same_class'] is False
    assert out['outs'] == [[0.0, 2.0], [1.0, 3.0]]  # v1: x * w * 2, v2: x + w * 2.


OFFICIAL_STYLE_SOURCE = textwrap.dedent('''
    import numpy as np
    from torch_utils import misc
    from torch_utils import persistence

    @persistence.persistent_class
    class Thing:
        def __init__(self, a, b=2):
            self.value = a + b

        def describe(self):
            return f'Thing({self.value}, {misc.constant(np.float32(self.value)).item()})'
''')


class _HandMadeRecord:
    """Pickles exactly like an official snapshot's network: the record is written by hand, not by our decorator."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))


def test_hand_made_version_6_record_loads_in_a_fresh_interpreter(tmp_path):
    meta = dict(type='class', version=6, module_src=OFFICIAL_STYLE_SOURCE, class_name='Thing',
                state=dict(_init_args=(40,), _init_kwargs=dict(b=2), value=42))
    (tmp_path / 'record.pkl').write_bytes(pickle.dumps(dict(G=_HandMadeRecord(meta))))
    out = _run_fresh('''
        import json, pickle
        from torch_utils import persistence
        obj = pickle.load(open('record.pkl', 'rb'))['G']
        print(json.dumps(dict(describe=obj.describe(), args=list(obj.init_args), kwargs=obj.init_kwargs,
                              persistent=persistence.is_persistent(obj))))
    ''', cwd=tmp_path)
    assert out == dict(describe='Thing(42, 42.0)', args=[40], kwargs={'b': 2}, persistent=True)


def test_reloaded_object_pickles_again_with_the_same_source():
    meta = dict(type='class', version=6, module_src=OFFICIAL_STYLE_SOURCE, class_name='Thing',
                state=dict(_init_args=(1,), _init_kwargs={}, value=3))
    obj = pickle.loads(pickle.dumps(_HandMadeRecord(meta)))
    again = _meta_of(pickle.dumps(obj))[1]
    assert again['module_src'] == OFFICIAL_STYLE_SOURCE and again['state']['value'] == 3
    # A new instance made from the loaded class records its own arguments (as `G_ema = G(**G.init_kwargs)` does).
    new = type(obj)(5, b=1)
    assert new.value == 6 and new.init_args == (5,) and new.init_kwargs == {'b': 1}


def test_in_process_round_trip_and_deepcopy_keep_the_class(net_module):
    net = net_module.Net(4)
    for clone in [pickle.loads(pickle.dumps(net)), copy.deepcopy(net)]:
        assert type(clone) is type(net)
        assert torch.equal(clone.weight, net.weight) and clone.weight is not net.weight
        assert clone.init_args == (4,)


def test_init_args_are_copies(net_module):
    kwargs = dict(scale=1.0, extra={'k': [1]})
    net = net_module.Net(2, **kwargs)
    kwargs['scale'] = 99.0
    assert net.init_kwargs['scale'] == 1.0
    assert 'touched' not in net.init_kwargs['extra']
    net.init_kwargs['extra']['k'].append(2)
    assert net.init_kwargs['extra'] == {'k': [1]}
    assert isinstance(net.init_kwargs, dnnlib.EasyDict)


def test_import_hook_can_patch_the_source(net_module):
    data = pickle.dumps(net_module.Net(1))

    def hook(meta):
        meta.module_src = meta.module_src.replace("return 'v1'", "return 'patched'")
        return meta

    persistence.import_hook(hook)
    try:
        assert pickle.loads(data).version() == 'patched'
    finally:
        persistence.remove_import_hook(hook)
    assert pickle.loads(data).version() == 'v1'

    persistence.import_hook(lambda meta: None)
    try:
        with pytest.raises(ValueError, match='returned None'):
            pickle.loads(data)
    finally:
        persistence._import_hooks.clear()


def test_loading_errors_are_clear():
    base = dict(type='class', version=6, module_src=OFFICIAL_STYLE_SOURCE, class_name='Thing',
                state=dict(_init_args=(), _init_kwargs={}))
    with pytest.raises(ValueError, match='version 5'):
        pickle.loads(pickle.dumps(_HandMadeRecord(dict(base, version=5))))
    with pytest.raises(ValueError, match='type'):
        pickle.loads(pickle.dumps(_HandMadeRecord(dict(base, type='function'))))
    with pytest.raises(ImportError, match='Missing'):
        pickle.loads(pickle.dumps(_HandMadeRecord(dict(base, class_name='Missing'))))
    broken = dict(base, module_src='from torch_utils import no_such_helper\n')
    with pytest.raises(ImportError, match='no_such_helper') as info:
        pickle.loads(pickle.dumps(_HandMadeRecord(broken)))
    assert 'Thing' in str(info.value)
    assert broken['module_src'] not in persistence._src_to_module_dict  # A failed source is not cached.


def test_is_persistent(net_module):
    net = net_module.Net(1)
    assert persistence.is_persistent(net_module.Net) and persistence.is_persistent(net)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert not persistence.is_persistent(torch.nn.Linear)
    assert not persistence.is_persistent([1, 2])  # Unhashable objects are fine.
    assert persistence.persistent_class(net_module.Net) is net_module.Net  # Decorating twice is a no-op.
    assert net_module.Net.__name__ == 'Net' and 'Net(' in repr(net)


def test_decorator_rejects_misuse():
    with pytest.raises(TypeError):
        persistence.persistent_class(lambda: None)

    @persistence.persistent_class
    class LocalNet(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match='top level'):
        LocalNet()


UNPICKLABLE_SOURCE = textwrap.dedent('''
    from torch_utils import persistence

    @persistence.persistent_class
    class Holder:
        def __init__(self, fn):
            self.fn = fn
''')


def test_unpicklable_constructor_arguments_fail_at_construction(tmp_path):
    module = _import_source(tmp_path, 'persist_holder', UNPICKLABLE_SOURCE)
    try:
        with pytest.raises(TypeError, match='Holder'):
            module.Holder(lambda x: x)
        assert module.Holder(fn=torch.ones(3)).init_kwargs['fn'].shape == (3,)  # Tensors are fine.
    finally:
        sys.modules.pop('persist_holder', None)
