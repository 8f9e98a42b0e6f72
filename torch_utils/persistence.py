"""Pickling of network objects together with the source code of the module that defines them.

A snapshot must keep working after the code base changes: its networks are pickled not as references to
`training.networks.Generator` (which may have moved or changed) but as a call to
`_reconstruct_persistent_obj(meta)`, where `meta` carries the full text of the defining module. Loading
executes that text as a fresh module and rebuilds the object from it. The layout of `meta` is the one
official StyleGAN2-ADA snapshots use (version 6):

    meta = {'type': 'class', 'version': 6, 'module_src': <source of the module>,
            'class_name': <class name>, 'state': <the object's state dict, incl. _init_args/_init_kwargs>}

A class opts in with the `@persistent_class` decorator, which also records the constructor arguments
(`obj.init_args`, `obj.init_kwargs`) so that a network can be rebuilt from them.

Loading a pickle runs the code inside it: only load snapshots you trust (see training/weights_only.py for a
weights-only alternative).
"""

import copy
import inspect
import io
import linecache
import pickle
import sys
import types
import uuid
from typing import Any, Callable

import dnnlib

_version = 6            # Version of the `meta` layout; official snapshots are version 6.
_decorators = set()     # Every class returned by persistent_class(), for is_persistent().
_import_hooks = []      # Callables applied to `meta` before an object is rebuilt.
_module_to_src_dict = dict()    # module -> source text, for modules seen by either direction.
_src_to_module_dict = dict()    # source text -> module, so each source is executed only once.

# ----------------------------------------------------------------------------


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances pickle together with the source code of the class's module.

    Use it on a module-level class whose constructor arguments are themselves picklable:

        @persistence.persistent_class
        class MyNetwork(torch.nn.Module):
            ...

    The returned subclass records the constructor arguments (deep copies, available as `init_args` and
    `init_kwargs`) and pickles as `_reconstruct_persistent_obj(meta)`.
    """
    if not isinstance(orig_class, type):
        raise TypeError(f'persistent_class() decorates classes, got {type(orig_class).__name__}')
    if is_persistent(orig_class):
        return orig_class

    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)
    orig_class_name = orig_class.__name__

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class_name

        def __init__(self, *args, **kwargs):
            # Copy before the constructor runs, so arguments it modifies in place are recorded as given.
            init_args = copy.deepcopy(args)
            init_kwargs = copy.deepcopy(kwargs)
            super().__init__(*args, **kwargs)
            self._init_args = init_args
            self._init_kwargs = init_kwargs
            # Fail now rather than at the first snapshot, hours into training.
            if orig_module.__dict__.get(orig_class_name) is not Decorator:
                raise TypeError(f'persistent class "{orig_class_name}" must be defined at the top level of module '
                                f'"{orig_module.__name__}": snapshots look it up there by name')
            check_pickleable((init_args, init_kwargs), what=f'the constructor arguments of {orig_class_name}')

        @property
        def init_args(self) -> tuple:
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dict:
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            # Let the base class describe its state as usual, then replace "how to rebuild" by a call that
            # carries the module source. Extra fields (list/dict items of container subclasses) are kept.
            reduced = list(super().__reduce__())
            reduced += [None] * (3 - len(reduced))
            meta = dict(
                type        = 'class',
                version     = _version,
                module_src  = self._orig_module_src,
                class_name  = self._orig_class_name,
                state       = reduced[2],
            )
            return (_reconstruct_persistent_obj, (meta,), None, *reduced[3:])

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator


def is_persistent(obj: Any) -> bool:
    """True for classes made by `persistent_class` and for their instances."""
    try:
        if obj in _decorators:
            return True
    except TypeError:  # Unhashable objects cannot be decorator classes.
        pass
    return type(obj) in _decorators


def import_hook(hook: Callable[[dnnlib.EasyDict], dnnlib.EasyDict]) -> Callable:
    """Register `hook(meta) -> meta`, applied to every persistent object before it is rebuilt.

    Hooks can patch old source code (`meta.module_src`) or state (`meta.state`) so that old snapshots keep
    loading. Returns the hook, so it can be used as a decorator and removed with `remove_import_hook`.
    """
    if not callable(hook):
        raise TypeError('import_hook() needs a callable')
    _import_hooks.append(hook)
    return hook


def remove_import_hook(hook: Callable) -> None:
    """Undo `import_hook(hook)`."""
    _import_hooks.remove(hook)


# ----------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object from its `meta` record. Called by pickle; the name is part of the
    snapshot format and must not change."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state) if meta.get('state') is not None else dnnlib.EasyDict()
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise ValueError(f'persistence import hook {hook!r} returned None instead of the meta record')

    if meta.get('version') != _version:
        raise ValueError(f'Unsupported persistent object version {meta.get("version")!r} (this code reads version '
                         f'{_version}); the file was written by an incompatible code base')
    if meta.get('type') != 'class':
        raise ValueError(f'Unsupported persistent object type {meta.get("type")!r}')

    module = _src_to_module(meta.module_src, meta.class_name)
    orig_class = module.__dict__.get(meta.class_name)
    if not isinstance(orig_class, type):
        raise ImportError(f'The source code stored with this object defines no class "{meta.class_name}"')
    decorator_class = persistent_class(orig_class)

    obj = decorator_class.__new__(decorator_class)
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module (cached; modules created from snapshot sources are known already)."""
    src = _module_to_src_dict.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src


def _src_to_module(src: str, class_name: str = '?') -> types.ModuleType:
    """The module for a source text, executing the text as a fresh module the first time it is seen.

    The source of an already imported module (e.g. our own training/networks.py) maps back to that module,
    so pickling and unpickling within one process, or `copy.deepcopy`, keeps the same classes.
    """
    module = _src_to_module_dict.get(src)
    if module is not None:
        return module

    module_name = '_imported_module_' + uuid.uuid4().hex
    module = types.ModuleType(module_name)
    filename = f'<persistent module {module_name}>'
    # Registering the text with linecache makes tracebacks through snapshot code show the lines.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    sys.modules[module_name] = module
    _module_to_src_dict[module] = src
    _src_to_module_dict[src] = module
    try:
        exec(compile(src, filename, 'exec'), module.__dict__)  # noqa: S102 -- executing the stored source is the protocol.
    except Exception as e:
        del _src_to_module_dict[src]
        del _module_to_src_dict[module]
        del sys.modules[module_name]
        raise ImportError(f'Could not run the source code stored with class "{class_name}" '
                          f'({type(e).__name__}: {e}). The snapshot needs a name that this code base does not provide '
                          f'or provides differently.') from e
    return module


# ----------------------------------------------------------------------------


class _PickleabilityProbe(pickle.Pickler):
    """Pickler that skips the payload of tensors, arrays and persistent objects: only whether the rest of the
    structure can be pickled matters, and copying a large tensor just to find out would be wasteful."""

    def persistent_id(self, obj):
        if is_persistent(obj):
            return 'persistent'
        name = type(obj).__module__.split('.')[0]
        if name in ('torch', 'numpy') and hasattr(obj, 'shape'):
            return 'array'
        return None


def check_pickleable(obj: Any, what: str = 'object') -> None:
    """Raise a TypeError naming `what` if `obj` cannot be pickled (lambdas, open files, local classes, ...)."""
    try:
        _PickleabilityProbe(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception as e:
        raise TypeError(f'{what} cannot be pickled ({type(e).__name__}: {e}); snapshots need them to be') from e
