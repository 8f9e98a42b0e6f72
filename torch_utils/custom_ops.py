"""Compile the C++/CUDA extensions behind the fast ops on first use, and cache them on disk.

`get_plugin()` is the single entry point. The first time a given extension is requested it is
compiled with ninja through `torch.utils.cpp_extension.load`; every later request, in this
process or in any other, reuses the compiled shared library without running a compiler.

How the cache works:

* Every build lives in its own directory, named after a digest of everything that can change
  the binary: the names and contents of the sources and headers, the build arguments, the
  torch and Python versions and the target GPU architecture. Editing a header therefore picks
  a new directory instead of silently reusing a stale binary.
* A build happens in a uniquely named temporary directory that is renamed to its final name
  only once the library has been built and loaded successfully. A crash or Ctrl-C in the
  middle of a build can leave a temporary directory behind, but never a half-built final one.
* Processes that build the same extension at the same time (e.g. the ranks of a multi-GPU
  run) take turns through an advisory `flock` on a `<final dir>.lock` file. The kernel drops
  such a lock when its holder dies, so a lock file left over by a killed process never blocks
  anybody, unlike torch's own file-existence "baton".

Importing this module does no work at all: nothing is compiled, no directory is created and
CUDA is not touched until `get_plugin()` is called.
"""

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

import dnnlib

try:
    import fcntl
except ImportError:  # Windows has no fcntl; see _exclusive_lock() for what that costs.
    fcntl = None

# ----------------------------------------------------------------------------
# Settings and in-process state.

verbosity = 'brief'  # 'none': silent; 'brief': one line per build; 'full': the whole compiler output.

_VERBOSITY_LEVELS = ('none', 'brief', 'full')

# Number of compiler output lines quoted in a PluginBuildError. The first error is usually near
# the top of a short log, but long template errors push the useful part to the end.
_ERROR_TAIL_LINES = 40

# cpp_extension names the library `<name>.pyd` on Windows and `<name>.so` everywhere else
# (macOS included), without the ABI tag that setuptools would add.
_LIB_SUFFIX = '.pyd' if os.name == 'nt' else '.so'

# get_plugin() chooses these arguments of cpp_extension.load itself; letting callers override
# them would break the build directory layout or the way the result is imported.
_RESERVED_BUILD_KWARGS = ('name', 'sources', 'build_directory', 'verbose', 'is_python_module', 'is_standalone')

_loaded_plugins: dict[tuple[str, str], types.ModuleType] = {}  # (module_name, dir name) -> module.
_failed_plugins: dict[tuple[str, str], str] = {}               # (module_name, dir name) -> error message.
_state_lock = threading.Lock()                                # Serializes get_plugin() between threads.


class PluginBuildError(RuntimeError):
    """A custom op extension could not be compiled or loaded."""


def reset_plugin_cache() -> None:
    """Forget the plugins loaded and the build failures seen by this process (the disk cache is kept)."""
    with _state_lock:
        _loaded_plugins.clear()
        _failed_plugins.clear()

# ----------------------------------------------------------------------------
# Cache key.


def plugin_dir_name(
    module_name:    str,                                # Name of the extension module.
    sources:        Sequence[tuple[str, bytes]],        # (name in the build dir, content) of each compiled file.
    headers:        Sequence[tuple[str, bytes]] = (),   # Same for files that are only #included.
    build_kwargs:   Mapping[str, Any] | None = None,    # Extra arguments of cpp_extension.load (flags etc.).
    arch:           str = 'cpu',                        # Target GPU architecture such as 'sm_86', or 'cpu'.
    cuda_arch_list: str = '',                           # $TORCH_CUDA_ARCH_LIST when the user set it, else ''.
    torch_version:  str = torch.__version__,
    python_version: str = sys.version,
) -> str:
    """Name of the cache directory for one build: `<module_name>-<arch>-<16 hex digits>`.

    A pure function of its arguments, so that the same inputs always give the same name and a
    change to any source, header, build argument or version gives a different one.
    """
    digest = hashlib.sha256()

    def add(field: bytes) -> None:
        # Prefixing each field with its length keeps the encoding unambiguous: no two
        # different lists of fields can produce the same byte stream.
        digest.update(f'{len(field)}:'.encode())
        digest.update(field)

    for role, files in (('source', sources), ('header', headers)):
        for name, content in files:
            add(role.encode())
            add(name.replace(os.sep, '/').encode())
            add(content)
    add(json.dumps(dict(build_kwargs or {}), sort_keys=True, default=repr).encode())
    for text in (arch, cuda_arch_list, torch_version, python_version):
        add(text.encode())
    return f'{module_name}-{arch}-{digest.hexdigest()[:16]}'


def _build_names(files: Sequence[str], source_dir: str | None) -> list[tuple[str, str]]:
    """(path to read, name inside the build directory) of each file."""
    pairs = []
    for file in files:
        if source_dir is None:
            if not os.path.isabs(file):
                raise ValueError(f'"{file}" must be an absolute path when source_dir is None')
            pairs.append((file, os.path.basename(file)))
        else:
            name = os.path.normpath(file)
            if os.path.isabs(name) or name.split(os.sep)[0] == os.pardir:
                raise ValueError(f'"{file}" must be a path inside source_dir')
            pairs.append((os.path.join(source_dir, name), name))
    return pairs


def _read_files(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """(name inside the build directory, content) of each file."""
    result = []
    for path, name in pairs:
        with open(path, 'rb') as f:
            result.append((name, f.read()))
    return result


def _wants_cuda(source_names: Sequence[str], build_kwargs: Mapping[str, Any]) -> bool:
    """Whether the build compiles CUDA code, decided the same way as cpp_extension decides it."""
    if build_kwargs.get('with_cuda') is not None:
        return bool(build_kwargs['with_cuda'])
    return any(name.endswith(('.cu', '.cuh')) for name in source_names)


def _target_arch(wants_cuda: bool) -> str:
    """'sm_XY' of the current GPU for CUDA builds, 'cpu' when no GPU code is compiled."""
    if not (wants_cuda and torch.cuda.is_available()):
        return 'cpu'
    major, minor = torch.cuda.get_device_capability()
    return f'sm_{major}{minor}'

# ----------------------------------------------------------------------------
# One build request, resolved.


class _Request:
    """Everything get_plugin() derives from its arguments before it looks at the cache."""

    def __init__(self, module_name: str, sources: Sequence[str], headers: Sequence[str],
                 source_dir: str | None, build_kwargs: dict[str, Any]):
        for key in _RESERVED_BUILD_KWARGS:
            if key in build_kwargs:
                raise TypeError(f'get_plugin() chooses "{key}" itself; it cannot be passed as a build argument')
        if len(sources) == 0:
            raise ValueError(f'Plugin "{module_name}" has no source files')
        self.module_name = module_name
        self.build_kwargs = build_kwargs
        # The contents are read once and that exact data is both hashed and compiled, so that
        # a file edited in between cannot end up in a directory named after its old content.
        self.sources = _read_files(_build_names(sources, source_dir))
        self.headers = _read_files(_build_names(headers, source_dir))
        names = [name for name, _ in self.sources + self.headers]
        if len(set(names)) != len(names):
            raise ValueError(f'Plugin "{module_name}" has several files with the same name: {names}')
        self.wants_cuda = _wants_cuda([name for name, _ in self.sources], build_kwargs)
        self.arch = _target_arch(self.wants_cuda)
        user_arch_list = os.environ.get('TORCH_CUDA_ARCH_LIST', '') if self.wants_cuda else ''
        self.dir_name = plugin_dir_name(module_name, self.sources, self.headers, build_kwargs,
                                        arch=self.arch, cuda_arch_list=user_arch_list)
        self.final_dir = os.path.join(_cache_root(), self.dir_name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.module_name, self.dir_name)


def _cache_root() -> str:
    """Directory that holds one subdirectory per build; read at call time so tests can redirect it."""
    if os.environ.get('TORCH_EXTENSIONS_DIR'):
        return os.environ['TORCH_EXTENSIONS_DIR']
    return dnnlib.make_cache_dir_path('torch_extensions')


def get_plugin_dir(module_name: str, sources: Sequence[str], headers: Sequence[str] | None = None,
                   source_dir: str | None = None, **build_kwargs: Any) -> str:
    """Cache directory that get_plugin() would use for these arguments. Builds nothing."""
    return _Request(module_name, sources, headers or [], source_dir, build_kwargs).final_dir

# ----------------------------------------------------------------------------
# Loading a finished build.


def _find_library(directory: str, module_name: str) -> str | None:
    """Path of the built library in `directory`, or None when there is none.

    cpp_extension renames a module to `<name>_v<N>` when the same name is built again with
    different inputs in one process, so that suffix is accepted too.
    """
    pattern = re.compile(re.escape(module_name) + r'(_v\d+)?' + re.escape(_LIB_SUFFIX))
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    matches = [name for name in names if pattern.fullmatch(name)]
    return os.path.join(directory, matches[0]) if matches else None


def _import_library(path: str) -> types.ModuleType:
    """Import a compiled extension module from an explicit file path.

    The module name has to be the file's stem, because that is the name its PyInit_ function
    was compiled with. The module is deliberately not put in sys.modules: plugins are reached
    through get_plugin(), and a generic name there could shadow an unrelated module.
    """
    import_name = os.path.basename(path)[:-len(_LIB_SUFFIX)]
    loader = importlib.machinery.ExtensionFileLoader(import_name, path)
    spec = importlib.util.spec_from_file_location(import_name, path, loader=loader)
    if spec is None:
        raise ImportError(f'Cannot import an extension module from {path}')
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module

# ----------------------------------------------------------------------------
# Building.


@contextlib.contextmanager
def _exclusive_lock(lock_path: str, waiting_message: str) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `lock_path`; yields whether locking is available.

    The lock file itself is never deleted. Removing it would open a race in which one process
    locks the old file while another creates and locks a new one; leaving it costs nothing,
    because only a live process can hold the lock on it.
    """
    if fcntl is None:
        # Without flock, concurrent builders are still safe, only wasteful: each builds in its
        # own temporary directory and the loser of the final rename discards its result.
        yield False
        return
    with open(lock_path, 'a+b') as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say('brief', waiting_message)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_orphaned_temp_dirs(final_dir: str) -> None:
    """Delete temporary build directories that interrupted builds left next to `final_dir`.

    Only called while holding the lock of `final_dir`: every builder holds that lock for the
    whole life of its temporary directory, so any such directory found now belongs to a dead
    process.
    """
    parent, prefix = os.path.dirname(final_dir), os.path.basename(final_dir) + '.tmp-'
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def _cuda_arch_env(arch_list: str | None) -> Iterator[None]:
    """Set $TORCH_CUDA_ARCH_LIST to `arch_list` (None: leave it alone) and restore it afterwards."""
    if arch_list is None:
        yield
        return
    previous = os.environ.get('TORCH_CUDA_ARCH_LIST')
    os.environ['TORCH_CUDA_ARCH_LIST'] = arch_list
    try:
        yield
    finally:
        if previous is None:
            del os.environ['TORCH_CUDA_ARCH_LIST']
        else:
            os.environ['TORCH_CUDA_ARCH_LIST'] = previous


def _current_arch_list(request: _Request) -> str | None:
    """Arch list to build for: only the current GPU, unless the user chose a list themselves.

    Compiling for every architecture torch supports takes many times longer, and the cache
    key already ties the binary to the current GPU.
    """
    if request.arch == 'cpu' or os.environ.get('TORCH_CUDA_ARCH_LIST'):
        return None
    major, minor = request.arch[len('sm_'):-1], request.arch[-1]
    return f'{major}.{minor}'


def _write_files(directory: str, files: Sequence[tuple[str, bytes]]) -> list[str]:
    """Write (name, content) pairs under `directory`; returns the paths written."""
    paths = []
    for name, content in files:
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(content)
        paths.append(path)
    return paths


def _compile(request: _Request, temp_dir: str) -> None:
    """Compile the sources of `request` inside `temp_dir` and check that the library loads."""
    from torch.utils import cpp_extension  # Deferred: it imports setuptools, which takes a while.

    source_paths = _write_files(temp_dir, request.sources)
    _write_files(temp_dir, request.headers)
    with _cuda_arch_env(_current_arch_list(request)):
        # is_python_module=False makes cpp_extension dlopen the library without importing it
        # as a Python module. That still catches missing symbols before the directory is
        # published, and lets the one real import happen from the final path, so the module's
        # __file__ does not point at the temporary directory. The dynamic loader recognizes the
        # renamed file as the library it already mapped, so it is not loaded twice.
        cpp_extension.load(name=request.module_name, sources=source_paths, build_directory=temp_dir,
                           verbose=(verbosity == 'full'), is_python_module=False, **request.build_kwargs)


def _publish(temp_dir: str, final_dir: str, module_name: str) -> None:
    """Move a finished build into place, or keep the one another process put there first."""
    if os.path.isdir(final_dir) and _find_library(final_dir, module_name) is None:
        # Final directories only ever appear through the rename below, so one without a
        # library was damaged by hand. It is in the way of the rename, so it goes.
        shutil.rmtree(final_dir)
    try:
        os.replace(temp_dir, final_dir)
    except OSError:
        if _find_library(final_dir, module_name) is None:
            raise
        # Another builder won the race (only possible without flock); both builds are
        # equivalent, so keeping theirs is correct and ours is discarded by the caller.


def _build(request: _Request) -> None:
    """Build `request` into its final directory unless another process does so first."""
    os.makedirs(os.path.dirname(request.final_dir), exist_ok=True)
    waiting = f'Waiting for another process to build PyTorch extension "{request.module_name}"...'
    with _exclusive_lock(request.final_dir + '.lock', waiting) as locked:
        if _find_library(request.final_dir, request.module_name) is not None:
            return  # Built by the process we waited for.
        if locked:
            _remove_orphaned_temp_dirs(request.final_dir)
        temp_dir = f'{request.final_dir}.tmp-{uuid.uuid4().hex}'
        os.makedirs(temp_dir)
        try:
            _say('brief', f'Building PyTorch extension "{request.module_name}" (first use; cached in '
                          f'{request.final_dir})...', end='' if verbosity == 'brief' else '\n')
            start = time.time()
            try:
                _compile(request, temp_dir)
                _publish(temp_dir, request.final_dir, request.module_name)
            except BaseException:
                _say('brief', ' failed.' if verbosity == 'brief' else 'Build failed.')
                raise
            _say('brief', f' done ({time.time() - start:.0f}s).' if verbosity == 'brief' else 'Build done.')
        finally:
            # Gone after a successful rename; otherwise a failed, interrupted or redundant build.
            shutil.rmtree(temp_dir, ignore_errors=True)


def _check_ninja() -> None:
    """Fail early, and say how to fix it, when ninja is missing: cpp_extension cannot build without it."""
    from torch.utils import cpp_extension  # Deferred, as in _compile: it imports setuptools, which is slow.

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise RuntimeError('The ninja build tool was not found on PATH; install it with "pip install ninja".') from None


def _failure_message(request: _Request, error: BaseException) -> str:
    """The one message of a PluginBuildError: which plugin, what the build said, what to do."""
    lines = str(error).strip().splitlines()
    if len(lines) > _ERROR_TAIL_LINES:
        lines = ['...'] + lines[-_ERROR_TAIL_LINES:]
    if verbosity == 'full':
        lines.append('(the complete compiler output is printed above)')
    output = '\n'.join('    ' + line for line in lines)
    return (f'The PyTorch extension "{request.module_name}" could not be built (it would be cached in '
            f'{request.final_dir}). Build output (last {_ERROR_TAIL_LINES} lines at most):\n{output}\n'
            f'The reference (pure PyTorch) implementation of this op can be used instead; it gives '
            f'the same results, only more slowly.')


def _say(level: str, text: str, end: str = '\n') -> None:
    """Print `text` when the current verbosity is at least `level`."""
    if _VERBOSITY_LEVELS.index(verbosity) >= _VERBOSITY_LEVELS.index(level):
        print(text, end=end, flush=True)


def _build_and_load(request: _Request) -> types.ModuleType:
    """Load the cached build of `request`, building it first when there is none.

    Every way this can fail becomes a PluginBuildError carrying the whole explanation.
    """
    try:
        if _find_library(request.final_dir, request.module_name) is None:
            _check_ninja()
            _build(request)
        path = _find_library(request.final_dir, request.module_name)
        if path is None:
            raise FileNotFoundError(f'The build finished but left no library in {request.final_dir}')
        # Also fails when a cache directory shared between machines holds a library that
        # cannot be loaded here, e.g. because the system libraries differ.
        return _import_library(path)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
        raise PluginBuildError(_failure_message(request, e)) from None


# ----------------------------------------------------------------------------
# Entry point.


def get_plugin(
    module_name:    str,                            # Module name; the C++ code sees it as TORCH_EXTENSION_NAME.
    sources:        Sequence[str],                  # Files to compile (.cpp, .cu), relative to source_dir.
    headers:        Sequence[str] | None = None,    # Files that are only #included; they count for the cache key.
    source_dir:     str | None = None,              # Directory of the files above; None: they are absolute paths.
    **build_kwargs: Any,                            # Passed on to torch.utils.cpp_extension.load (extra_cflags...).
) -> types.ModuleType:
    """Return the compiled extension module, building it first if no cached build matches.

    Sources and headers are copied into the build directory under the names given, so sources
    must include headers by those names, and every header they include must be listed (that is
    what makes an edited header trigger a rebuild). Raises PluginBuildError when the extension
    cannot be built; the failure is remembered, so asking again does not rerun the compiler.
    """
    if verbosity not in _VERBOSITY_LEVELS:
        raise ValueError(f'custom_ops.verbosity must be one of {_VERBOSITY_LEVELS}, not {verbosity!r}')
    with _state_lock:
        request = _Request(module_name, sources, headers or [], source_dir, build_kwargs)
        if request.key in _loaded_plugins:
            return _loaded_plugins[request.key]
        if request.key in _failed_plugins:
            raise PluginBuildError(_failed_plugins[request.key])
        try:
            module = _build_and_load(request)
        except PluginBuildError as e:
            _failed_plugins[request.key] = str(e)
            raise
        _loaded_plugins[request.key] = module
        return module
