"""Generic Python helpers that the rest of the codebase (and official snapshots) rely on.

Nothing here imports torch: this is the bottom layer of the package stack.
"""

import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from typing import Any, Optional

# ----------------------------------------------------------------------------
# EasyDict. Official snapshots pickle instances of `dnnlib.util.EasyDict`, so the class
# must keep living in this module under this name.


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes (`d.key`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------
# Crash-safe file writing.


def write_atomically(path: str, write: Any) -> None:
    """Call `write(f)` on a new temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX file systems, so readers (and a run resumed after a crash) see either the
    previous file or the complete new one, never a truncated snapshot. The temporary file is removed if
    `write` raises.
    """
    path = os.fspath(path)
    temp_path = f'{path}.tmp-{uuid.uuid4().hex}'
    try:
        with open(temp_path, 'xb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


# ----------------------------------------------------------------------------
# Logger: tee stdout/stderr into a file.


class Logger:
    """Duplicate everything written to stdout and stderr into a log file.

    While active, `sys.stdout` and `sys.stderr` point at this object. `close()` (or leaving the
    `with` block) puts the streams that were there before back in place.
    """

    def __init__(self,
        file_name:      Optional[str] = None,   # Log file path; None logs to the console only.
        file_mode:      str = 'w',              # 'w' to start a new log, 'a' to append to one.
        should_flush:   bool = True,            # Flush after every write, so a crash loses nothing.
    ):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.close()

    def write(self, text) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Flush, close the file and restore the streams. Safe to call more than once."""
        self.flush()
        # Only restore a stream that still points at us: if another Logger was stacked on top
        # and is still active, stealing the stream back would silence it.
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None


# ----------------------------------------------------------------------------
# Cache directory.

_cache_dir_override: Optional[str] = None


def set_cache_dir(path: Optional[str]) -> None:
    """Use `path` as the cache root for this process (None goes back to the default lookup)."""
    global _cache_dir_override
    _cache_dir_override = path


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache root. The root is, in order of precedence: the value given to
    `set_cache_dir`, `$DNNLIB_CACHE_DIR`, `~/.cache/dnnlib`, `<tempdir>/.cache/dnnlib`."""
    if _cache_dir_override is not None:
        return os.path.join(_cache_dir_override, *paths)
    if os.environ.get('DNNLIB_CACHE_DIR'):
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    home = os.environ.get('HOME') or os.environ.get('USERPROFILE')
    if home:
        return os.path.join(home, '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)


# ----------------------------------------------------------------------------
# Small formatting helpers.


def format_time(seconds: float) -> str:
    """Human-readable duration, as in the training status line: '42s', '3m 07s', '5h 02m 09s', '2d 03h 15m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


# ----------------------------------------------------------------------------
# Objects by dotted name: how the kwargs trees of train.py name their classes.


def _is_module_not_found(error: ModuleNotFoundError, module_name: str) -> bool:
    """True if `error` says that `module_name` itself (or one of its parents) does not exist, as
    opposed to the module existing but failing on an import of its own."""
    missing = error.name or ''
    return module_name == missing or module_name.startswith(missing + '.')


def get_module_from_obj_name(obj_name: str) -> tuple:
    """Split a dotted name into (module, attribute path) by importing the longest module prefix."""
    if not isinstance(obj_name, str) or not obj_name or any(part == '' for part in obj_name.split('.')):
        raise ValueError(f'Invalid object name: {obj_name!r} (expected a dotted name such as "package.module.Class")')
    parts = obj_name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if _is_module_not_found(e, module_name):
                continue
            raise ImportError(f'Importing "{module_name}" for "{obj_name}" failed: {e}') from e
        return module, '.'.join(parts[split:])
    # A bare name, or a dotted name with no importable prefix: try the whole thing as a module.
    try:
        return importlib.import_module(obj_name), ''
    except ModuleNotFoundError as e:
        if _is_module_not_found(e, obj_name):
            raise ImportError(f'Cannot find "{obj_name}": no prefix of it is an importable module') from e
        raise


def get_obj_from_module(module: types.ModuleType, obj_name: str) -> Any:
    """Follow a dotted attribute path inside `module` ('' returns the module itself)."""
    obj = module
    if obj_name == '':
        return obj
    for part in obj_name.split('.'):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f'Module "{module.__name__}" has no attribute "{obj_name}"') from None
    return obj


def get_obj_by_name(name: str) -> Any:
    """Find the Python object behind a dotted name such as 'training.networks.Generator'."""
    module, obj_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, obj_name)


def call_func_by_name(*args, func_name: Optional[str] = None, **kwargs) -> Any:
    """Look up `func_name` by its dotted name and call it with the remaining arguments."""
    if func_name is None:
        raise ValueError('call_func_by_name() needs func_name')
    func_obj = get_obj_by_name(func_name)
    if not callable(func_obj):
        raise TypeError(f'"{func_name}" is not callable (it is a {type(func_obj).__name__})')
    return func_obj(*args, **kwargs)


def construct_class_by_name(*args, class_name: Optional[str] = None, **kwargs) -> Any:
    """Look up `class_name` by its dotted name and instantiate it with the remaining arguments."""
    if class_name is None:
        raise ValueError('construct_class_by_name() needs class_name')
    cls = get_obj_by_name(class_name)
    if not isinstance(cls, type):
        raise TypeError(f'"{class_name}" is not a class (it is a {type(cls).__name__})')
    return cls(*args, **kwargs)


def get_top_level_function_name(obj: Any) -> str:
    """Dotted name of a module-level function, the inverse of `get_obj_by_name`."""
    module = obj.__module__
    if module == '__main__':
        module = os.path.splitext(os.path.basename(sys.modules[module].__file__))[0]
    return module + '.' + obj.__name__


# ----------------------------------------------------------------------------
# URLs and the download cache.


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True for http(s)://host/... strings, and for file:// URLs when `allow_file_urls`."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if obj.startswith('file://'):
        return allow_file_urls
    parsed = urllib.parse.urlparse(obj)
    return parsed.scheme in ('http', 'https') and bool(parsed.netloc)


def file_url_to_path(url: str) -> str:
    """'file:///abs/path' -> '/abs/path' (percent-escapes decoded)."""
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.path)
    if parsed.netloc not in ('', 'localhost'):
        raise ValueError(f'Only local file:// URLs are supported, got "{url}"')
    # Windows drive letters come out as '/C:/...'.
    if re.match(r'^/[A-Za-z]:/', path):
        path = path[1:]
    return path


def url_cache_key(url: str) -> str:
    """Hash that names a URL's file in the download cache."""
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def url_cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    """Where `open_url` keeps (or expects) the cached copy of `url`: '<cache>/<hash>_<file name>'."""
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    basename = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    basename = re.sub(r'[^0-9a-zA-Z._-]', '_', basename)
    return os.path.join(cache_dir, f'{url_cache_key(url)}_{basename}')


class DownloadError(IOError):
    """A URL could not be fetched; the message says where to put the file by hand."""


def _download(url: str, num_attempts: int, retry_delay: float, timeout: float, verbose: bool) -> bytes:
    # Imported here so that importing dnnlib stays cheap and works without requests installed.
    import requests

    last_error = None
    for attempt in range(num_attempts):
        try:
            with requests.get(url, timeout=timeout) as response:
                response.raise_for_status()
                data = response.content
                if len(data) == 0:
                    raise OSError('empty response')
                return data
        except (requests.RequestException, OSError) as e:
            last_error = e
            status = getattr(getattr(e, 'response', None), 'status_code', None)
            # A 4xx other than 408/429 will not get better by asking again.
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                break
            if attempt + 1 < num_attempts:
                if verbose:
                    print(f'Download of {url} failed ({e}); retrying ({attempt + 2}/{num_attempts})...', flush=True)
                time.sleep(retry_delay * (2 ** attempt))
    raise DownloadError(f'{url}: {last_error}')


def open_url(
    url:            str,                    # Local path, file:// URL or http(s):// URL.
    cache_dir:      Optional[str] = None,   # Download cache; default make_cache_dir_path('downloads').
    num_attempts:   int = 10,               # Tries before giving up on an http(s) download.
    verbose:        bool = True,            # Print a line while downloading.
    return_filename: bool = False,          # Return the local file path instead of an open file.
    cache:          bool = True,            # Keep downloads on disk and reuse them.
    retry_delay:    float = 1.0,            # Seconds before the first retry; doubles on each retry.
    timeout:        float = 30.0,           # Seconds to wait for the server on each attempt.
) -> Any:
    """Open a local file or a URL for binary reading.

    http(s) downloads are kept in the cache under a name derived from a hash of the URL, written to a
    temporary file and renamed into place, so an interrupted download never leaves a truncated copy that
    later runs would trust. Without network access the error names the exact path where a copy of the
    file can be placed by hand.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f'open_url() needs a path or URL, got {url!r}')

    # Local files: plain paths and file:// URLs.
    if not is_url(url, allow_file_urls=True):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'No such file: "{url}"')
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = file_url_to_path(url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: "{path}" (from URL "{url}")')
        return path if return_filename else open(path, 'rb')

    if return_filename and not cache:
        raise ValueError('open_url(): return_filename=True needs cache=True (a download has no file otherwise)')
    if num_attempts < 1:
        raise ValueError('open_url(): num_attempts must be at least 1')

    cache_path = url_cache_path(url, cache_dir)
    if cache and os.path.isfile(cache_path):
        return cache_path if return_filename else open(cache_path, 'rb')

    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    try:
        data = _download(url, num_attempts=num_attempts, retry_delay=retry_delay, timeout=timeout, verbose=verbose)
    except DownloadError as e:
        if verbose:
            print(' failed.', flush=True)
        raise DownloadError(
            f'Could not download {url} after {num_attempts} attempt(s): {e}.\n'
            f'If this machine is offline, fetch the file elsewhere and place it at:\n  {cache_path}\n'
            f'(the cache root can be moved with the DNNLIB_CACHE_DIR environment variable).') from None
    if verbose:
        print(' done.', flush=True)

    if not cache:
        return io.BytesIO(data)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    temp_path = f'{cache_path}.tmp-{uuid.uuid4().hex}'
    try:
        with open(temp_path, 'wb') as f:
            f.write(data)
        os.replace(temp_path, cache_path)  # Atomic: readers see the old state or the whole file.
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return cache_path if return_filename else open(cache_path, 'rb')
