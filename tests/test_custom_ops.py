"""Tests for torch_utils.custom_ops, on CPU, with a real (tiny) C++ extension.

Compiling even a one-line torch extension takes about half a minute on two cores, so the real
build happens once per session in the `built_plugin` fixture and every slow test reuses it.
The failure tests use a source that includes no headers, which the compiler rejects in about
a second.
"""

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from torch_utils import custom_ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AFFINE_HEADER = textwrap.dedent("""\
    #pragma once
    #include <torch/extension.h>

    inline torch::Tensor affine(const torch::Tensor& x) { return x * 2 + 1; }
""")

AFFINE_SOURCE = textwrap.dedent("""\
    #include "affine.h"

    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("affine", &affine, "x * 2 + 1"); }
""")

# A syntax error in a file without #includes: the compiler gives up almost immediately.
BROKEN_SOURCE = 'int broken( { return 0; }\n'

# An extension written against the plain Python C API. Without the torch headers it builds in
# about a second, which makes it cheap enough to build once per process in the concurrency test.
LIGHT_SOURCE = textwrap.dedent("""\
    #include <Python.h>

    #define LIGHT_CONCAT_(a, b) a##b
    #define LIGHT_CONCAT(a, b) LIGHT_CONCAT_(a, b)
    #define LIGHT_STR_(a) #a
    #define LIGHT_STR(a) LIGHT_STR_(a)

    static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "Returns 42."}, {nullptr, nullptr, 0, nullptr}};
    static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LIGHT_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
    PyMODINIT_FUNC LIGHT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module_def); }
""")


def _write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def _temp_dirs(cache_dir: str) -> list[str]:
    return [name for name in os.listdir(cache_dir) if '.tmp-' in name]


@pytest.fixture
def counted_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the calls of cpp_extension.load (the only way get_plugin runs the compiler)."""
    from torch.utils import cpp_extension

    calls: list[str] = []
    real_load = cpp_extension.load

    def load(*args, **kwargs):
        calls.append(kwargs['name'])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(cpp_extension, 'load', load)
    return calls


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to build fail the test loudly (AssertionError is not turned into PluginBuildError)."""
    from torch.utils import cpp_extension

    def forbidden(*args, **kwargs):
        raise AssertionError('get_plugin tried to build although a cached build exists')

    monkeypatch.setattr(cpp_extension, 'load', forbidden)
    monkeypatch.setattr(cpp_extension, 'verify_ninja_availability', forbidden)

# ----------------------------------------------------------------------------
# Import.


def test_import_does_no_work(tmp_path):
    # A fresh interpreter, because this one has imported the module long ago.
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HOME=str(tmp_path / 'home'),
               TORCH_EXTENSIONS_DIR=str(tmp_path / 'extensions'), DNNLIB_CACHE_DIR=str(tmp_path / 'dnnlib'))
    code = textwrap.dedent("""\
        import sys
        import torch
        import torch_utils.custom_ops
        print('cpp_extension' if 'torch.utils.cpp_extension' in sys.modules else 'no cpp_extension')
        print('cuda initialized' if torch.cuda.is_initialized() else 'cuda untouched')
    """)
    result = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[:2] == ['no cpp_extension', 'cuda untouched']
    assert os.listdir(tmp_path) == []  # No cache directory of any kind was created.

# ----------------------------------------------------------------------------
# Cache key.

_SOURCES = [('affine.cpp', AFFINE_SOURCE.encode())]
_HEADERS = [('affine.h', AFFINE_HEADER.encode())]
_KWARGS = {'extra_cflags': ['-O3']}


def _key(**overrides) -> str:
    args = dict(module_name='affine_plugin', sources=_SOURCES, headers=_HEADERS, build_kwargs=_KWARGS, arch='cpu')
    args.update(overrides)
    return custom_ops.plugin_dir_name(**args)


def test_key_is_deterministic():
    key = _key()
    assert re.fullmatch(r'affine_plugin-cpu-[0-9a-f]{16}', key)
    assert _key(sources=[(name, bytes(content)) for name, content in _SOURCES],
                build_kwargs={'extra_cflags': ('-O3',)}) == key


@pytest.mark.parametrize('overrides', [
    dict(sources=[('affine.cpp', AFFINE_SOURCE.encode() + b'\n// edited\n')]),
    dict(sources=[('affine2.cpp', AFFINE_SOURCE.encode())]),
    dict(headers=[('affine.h', AFFINE_HEADER.encode() + b'\n// edited\n')]),
    dict(headers=[]),
    dict(sources=_SOURCES + _HEADERS, headers=[]),
    dict(build_kwargs={'extra_cflags': ['-O2']}),
    dict(build_kwargs={'extra_cflags': ['-O3'], 'extra_ldflags': ['-lm']}),
    dict(build_kwargs=None),
    dict(arch='sm_86'),
    dict(cuda_arch_list='8.6;9.0'),
    dict(torch_version='0.0.0'),
    dict(python_version='3.0.0'),
], ids=['source', 'source-name', 'header', 'no-header', 'header-as-source', 'cflags', 'ldflags', 'no-kwargs',
        'arch', 'arch-list', 'torch', 'python'])
def test_key_changes_with_any_input(overrides):
    assert _key(**overrides) != _key()


def test_get_plugin_dir_reads_current_file_contents(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    src = str(tmp_path)
    _write(src, 'affine.cpp', AFFINE_SOURCE)
    _write(src, 'affine.h', AFFINE_HEADER)
    original = custom_ops.get_plugin_dir('affine_plugin', ['affine.cpp'], ['affine.h'], source_dir=src, **_KWARGS)
    assert original == os.path.join(str(tmp_path / 'cache'), _key())

    _write(src, 'affine.h', AFFINE_HEADER + '// edited\n')
    edited = custom_ops.get_plugin_dir('affine_plugin', ['affine.cpp'], ['affine.h'], source_dir=src, **_KWARGS)
    assert edited != original

    _write(src, 'affine.h', AFFINE_HEADER)
    assert custom_ops.get_plugin_dir('affine_plugin', ['affine.cpp'], ['affine.h'], source_dir=src, **_KWARGS) == original
    assert custom_ops.get_plugin_dir('affine_plugin', [os.path.join(src, 'affine.cpp')],
                                     [os.path.join(src, 'affine.h')], **_KWARGS) == original
    assert not os.path.exists(tmp_path / 'cache')  # Computing the key builds nothing.


def test_invalid_arguments(tmp_path):
    src = str(tmp_path)
    _write(src, 'a.cpp', BROKEN_SOURCE)
    os.makedirs(tmp_path / 'sub')
    _write(str(tmp_path / 'sub'), 'a.cpp', BROKEN_SOURCE)
    with pytest.raises(TypeError, match='build_directory'):
        custom_ops.get_plugin_dir('p', ['a.cpp'], source_dir=src, build_directory=src)
    with pytest.raises(ValueError, match='absolute'):
        custom_ops.get_plugin_dir('p', ['a.cpp'])
    with pytest.raises(ValueError, match='inside source_dir'):
        custom_ops.get_plugin_dir('p', ['../a.cpp'], source_dir=str(tmp_path / 'sub'))
    with pytest.raises(ValueError, match='same name'):
        custom_ops.get_plugin_dir('p', [os.path.join(src, 'a.cpp'), str(tmp_path / 'sub' / 'a.cpp')])
    with pytest.raises(ValueError, match='no source'):
        custom_ops.get_plugin_dir('p', [], source_dir=src)


def test_invalid_verbosity(monkeypatch, tmp_path):
    monkeypatch.setattr(custom_ops, 'verbosity', 'loud')
    with pytest.raises(ValueError, match='verbosity'):
        custom_ops.get_plugin('p', ['a.cpp'], source_dir=str(tmp_path))

# ----------------------------------------------------------------------------
# Helpers of the build step.


def test_cuda_arch_env_is_restored(monkeypatch):
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST', raising=False)
    with custom_ops._cuda_arch_env('8.6'):
        assert os.environ['TORCH_CUDA_ARCH_LIST'] == '8.6'
    assert 'TORCH_CUDA_ARCH_LIST' not in os.environ

    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '7.5')
    with pytest.raises(KeyError), custom_ops._cuda_arch_env('9.0'):
        assert os.environ['TORCH_CUDA_ARCH_LIST'] == '9.0'
        raise KeyError('the build failed')
    assert os.environ['TORCH_CUDA_ARCH_LIST'] == '7.5'


def test_arch_list_follows_current_device(monkeypatch):
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST', raising=False)
    assert custom_ops._current_arch_list(types.SimpleNamespace(arch='sm_86')) == '8.6'
    assert custom_ops._current_arch_list(types.SimpleNamespace(arch='sm_100')) == '10.0'
    assert custom_ops._current_arch_list(types.SimpleNamespace(arch='cpu')) is None
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '8.0')  # The user's choice wins.
    assert custom_ops._current_arch_list(types.SimpleNamespace(arch='sm_86')) is None


@pytest.mark.skipif(custom_ops.fcntl is None, reason='advisory locks need fcntl')
def test_lock_dies_with_its_holder(tmp_path):
    import fcntl

    lock_path = str(tmp_path / 'plugin.lock')
    holder_code = textwrap.dedent(f"""\
        import fcntl, sys, time
        f = open({lock_path!r}, 'a+b')
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        print('locked', flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, '-c', holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with open(lock_path, 'a+b') as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # A live holder is respected...
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert os.path.exists(lock_path)
    with custom_ops._exclusive_lock(lock_path, 'waiting') as locked:  # ...a dead one is not.
        assert locked

# ----------------------------------------------------------------------------
# Build failures (fast: the broken source includes nothing).


_broken_names = itertools.count()


@pytest.fixture
def broken_source(tmp_path, monkeypatch) -> types.SimpleNamespace:
    cache_dir = str(tmp_path / 'cache')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', cache_dir)
    monkeypatch.setattr(custom_ops, 'verbosity', 'none')
    source_dir = str(tmp_path / 'src')
    os.makedirs(source_dir)
    _write(source_dir, 'broken.cpp', BROKEN_SOURCE)
    # A name no other test uses, so the in-process failure record cannot leak into them.
    name = f'broken_plugin_{next(_broken_names)}'
    return types.SimpleNamespace(name=name, source_dir=source_dir, cache_dir=cache_dir)


def test_build_failure_is_reported_and_remembered(broken_source, counted_load):
    b = broken_source
    with pytest.raises(custom_ops.PluginBuildError) as first:
        custom_ops.get_plugin(b.name, ['broken.cpp'], source_dir=b.source_dir)
    message = str(first.value)
    assert isinstance(first.value, RuntimeError)
    assert f'"{b.name}" could not be built' in message
    assert 'error' in message and 'broken.cpp' in message  # The compiler's own words.
    assert 'reference (pure PyTorch) implementation' in message
    assert len(message.splitlines()) <= custom_ops._ERROR_TAIL_LINES + 5
    assert counted_load == [b.name]

    with pytest.raises(custom_ops.PluginBuildError) as second:
        custom_ops.get_plugin(b.name, ['broken.cpp'], source_dir=b.source_dir)
    assert str(second.value) == message
    assert counted_load == [b.name]  # Not compiled again.

    # Neither a final directory nor a temporary one is left; only the (harmless) lock file.
    final_dir = custom_ops.get_plugin_dir(b.name, ['broken.cpp'], source_dir=b.source_dir)
    assert final_dir in message
    assert os.listdir(b.cache_dir) == [os.path.basename(final_dir) + '.lock']


def test_missing_ninja_is_explained(broken_source, counted_load, monkeypatch):
    from torch.utils import cpp_extension

    def no_ninja():
        raise RuntimeError('Ninja is required to load C++ extensions')

    monkeypatch.setattr(cpp_extension, 'verify_ninja_availability', no_ninja)
    with pytest.raises(custom_ops.PluginBuildError, match='pip install ninja') as error:
        custom_ops.get_plugin(broken_source.name, ['broken.cpp'], source_dir=broken_source.source_dir)
    assert f'"{broken_source.name}"' in str(error.value)
    assert counted_load == []

# ----------------------------------------------------------------------------
# A real build, once per session.


@pytest.fixture(scope='session')
def built_plugin(tmp_path_factory) -> types.SimpleNamespace:
    source_dir = str(tmp_path_factory.mktemp('affine_src'))
    cache_dir = str(tmp_path_factory.mktemp('affine_cache'))
    _write(source_dir, 'affine.cpp', AFFINE_SOURCE)
    _write(source_dir, 'affine.h', AFFINE_HEADER)
    args = dict(module_name='affine_plugin', sources=['affine.cpp'], headers=['affine.h'], source_dir=source_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCH_EXTENSIONS_DIR', cache_dir)
        mp.setattr(custom_ops, 'verbosity', 'brief')
        final_dir = custom_ops.get_plugin_dir(**args)

        # What a build killed half-way leaves behind: its lock file, and a temporary directory
        # with torch's own lock file and a partial object file in it.
        _write(cache_dir, os.path.basename(final_dir) + '.lock', 'left over by a dead process\n')
        stale_temp_dir = final_dir + '.tmp-0123456789abcdef'
        os.makedirs(stale_temp_dir)
        _write(stale_temp_dir, 'lock', '')
        _write(stale_temp_dir, 'affine.o', 'half an object file')

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            module = custom_ops.get_plugin(**args)

    return types.SimpleNamespace(module=module, args=args, source_dir=source_dir, cache_dir=cache_dir,
                                 final_dir=final_dir, stale_temp_dir=stale_temp_dir, output=output.getvalue(),
                                 library=os.path.join(final_dir, 'affine_plugin.so'))


@pytest.fixture
def plugin_env(built_plugin, monkeypatch) -> types.SimpleNamespace:
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', built_plugin.cache_dir)
    return built_plugin


@pytest.mark.slow
def test_built_plugin_computes(plugin_env):
    x = torch.tensor([[-1.5, 0.0, 2.0], [3.0, 4.25, -7.0]])
    assert torch.equal(plugin_env.module.affine(x), x * 2 + 1)
    assert os.path.samefile(plugin_env.module.__file__, plugin_env.library)
    assert plugin_env.module.__name__ == 'affine_plugin'


@pytest.mark.slow
def test_build_prints_one_brief_line(plugin_env):
    lines = plugin_env.output.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f'Building PyTorch extension "affine_plugin" (first use; cached in {plugin_env.final_dir})')
    assert 'done' in lines[0]


@pytest.mark.slow
def test_interrupted_build_leftovers_are_harmless(plugin_env):
    # The build went through despite the leftovers, and cleaned up the orphaned directory.
    assert os.path.isfile(plugin_env.library)
    assert not os.path.exists(plugin_env.stale_temp_dir)
    assert _temp_dirs(plugin_env.cache_dir) == []
    assert sorted(os.listdir(plugin_env.cache_dir)) == sorted([os.path.basename(plugin_env.final_dir),
                                                               os.path.basename(plugin_env.final_dir) + '.lock'])


@pytest.mark.slow
def test_second_call_returns_same_module(plugin_env, no_compiler):
    first = custom_ops.get_plugin(**plugin_env.args)
    assert custom_ops.get_plugin(**plugin_env.args) is first


@pytest.mark.slow
def test_disk_cache_hit_after_reset(plugin_env, no_compiler, capsys):
    custom_ops.reset_plugin_cache()
    module = custom_ops.get_plugin(**plugin_env.args)
    assert os.path.samefile(module.__file__, plugin_env.library)
    assert torch.equal(module.affine(torch.ones(4)), torch.full([4], 3.0))
    assert 'Building' not in capsys.readouterr().out


@pytest.mark.slow
def test_fresh_interpreter_hits_cache(plugin_env, tmp_path):
    before = os.stat(plugin_env.library)
    listing = sorted(os.listdir(plugin_env.cache_dir))

    # An empty PATH hides the compiler and ninja: any attempt to rebuild fails the subprocess.
    empty_bin = tmp_path / 'empty_bin'
    empty_bin.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ('CXX', 'CC')}
    env.update(PATH=str(empty_bin), PYTHONPATH=REPO_ROOT, TORCH_EXTENSIONS_DIR=plugin_env.cache_dir)
    code = textwrap.dedent(f"""\
        import torch
        from torch_utils import custom_ops
        custom_ops.verbosity = 'brief'
        plugin = custom_ops.get_plugin(**{plugin_env.args!r})
        print(plugin.affine(torch.tensor([0.0, 1.0, 2.5])).tolist())
        print(plugin.__file__)
    """)
    result = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ['[1.0, 3.0, 6.0]', plugin_env.library]

    after = os.stat(plugin_env.library)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(os.listdir(plugin_env.cache_dir)) == listing


# ----------------------------------------------------------------------------
# Several processes asking for the same plugin at the same moment.

_RACER_CODE = textwrap.dedent("""\
    import os, sys, time
    import torch
    from torch_utils import custom_ops
    custom_ops.verbosity = 'brief'
    if sys.argv[3] == 'no-lock':
        custom_ops.fcntl = None  # What a platform without fcntl (Windows) gets.
    print('ready', flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.005)
    plugin = custom_ops.get_plugin('light_plugin', ['light.cpp'], source_dir=sys.argv[2])
    print('answer', plugin.answer(), flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize('locking', ['lock', 'no-lock'])
def test_concurrent_builders(tmp_path, locking):
    if locking == 'lock' and custom_ops.fcntl is None:
        pytest.skip('advisory locks need fcntl')
    source_dir, cache_dir, start_file = str(tmp_path / 'src'), str(tmp_path / 'cache'), str(tmp_path / 'start')
    os.makedirs(source_dir)
    _write(source_dir, 'light.cpp', LIGHT_SOURCE)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TORCH_EXTENSIONS_DIR=cache_dir)

    # Every racer first pays for its slow `import torch`, then all of them are released at
    # once, so that their calls to get_plugin overlap with each other's builds.
    racers = [subprocess.Popen([sys.executable, '-c', _RACER_CODE, start_file, source_dir, locking], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(3)]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == 'ready'
        _write(str(tmp_path), 'start', '')
        outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    assert [racer.returncode for racer in racers] == [0, 0, 0], outputs
    assert all(output.splitlines()[-1] == 'answer 42' for output in outputs), outputs

    builds = sum(output.count('Building PyTorch extension') for output in outputs)
    final_name = os.path.basename(custom_ops.get_plugin_dir('light_plugin', ['light.cpp'], source_dir=source_dir))
    if locking == 'lock':
        assert builds == 1, outputs  # The others waited for the lock and then found the build.
        assert sorted(os.listdir(cache_dir)) == [final_name, final_name + '.lock']
    else:
        assert builds >= 1  # Each may build; the first rename wins and the others discard theirs.
        assert os.listdir(cache_dir) == [final_name]
