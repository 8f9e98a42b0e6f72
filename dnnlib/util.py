"""Generic Python helpers that the rest of the codebase (and official snapshots) rely on.

Nothing here imports torch: this is the bottom layer of the package stack.
"""

import ctypes
import errno
import fnmatch
import hashlib
import importlib
import importlib.metadata
import io
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import types
import urllib.parse
import uuid
from typing import Any, List, Optional, Tuple

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
    previous file or the complete new one, never a truncated snapshot. The temporary file is removed whatever
    happens.

    When a write to the file fails (a full disk: OSError with errno ENOSPC), that OSError is what comes out,
    even where `write` turned it into something else: torch.save's zip writer reports it as a RuntimeError
    about an "unexpected pos", which loses the errno that tells the caller the disk is full. And if `write`
    swallowed such an error, the file is incomplete: it is not renamed, and the error is raised. An OSError
    that names no file (a failed write or fsync) or the temporary one gets `path` as its filename.
    """
    path = os.fspath(path)
    temp_path = f'{path}.tmp-{uuid.uuid4().hex}'
    file = None
    try:
        with open(temp_path, 'xb') as raw_file:
            file = _ErrorRecordingFile(raw_file)
            write(file)
            file.flush()
            if file.error is not None:
                raise file.error
            os.fsync(raw_file.fileno())
        os.replace(temp_path, path)
    except Exception as e:
        error = file.error if file is not None and file.error is not None else e
        if (isinstance(error, OSError) and error.errno is not None and error.filename in (None, temp_path)
                and error.filename2 is None):  # Not the rename's error, which names both files.
            # A failed write does not say which file it was, and the temporary name means nothing to the user:
            # name the file being written, so the caller's message can.
            error.filename = path
        # A failed write is the cause of whatever followed it; the consequence stays visible as its context.
        if error is not e:
            raise error  # noqa: B904 (not `from e`: e is the consequence, not the cause)
        raise
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


class _ErrorRecordingFile:
    """A file object that passes everything on to `file` and remembers the first OSError that its write,
    writelines or flush raised (the error itself is raised as usual). fileno(), tell() and the rest reach the
    real file, so PIL, pickle and torch.save work through it as through the file itself."""

    def __init__(self, file):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data):
        return self._recording(self._file.write, data)

    def writelines(self, lines):
        return self._recording(self._file.writelines, lines)

    def flush(self):
        return self._recording(self._file.flush)

    def _recording(self, method, *args):
        try:
            return method(*args)
        except OSError as e:
            if self.error is None:
                self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        if name == '_file':  # Not set yet (a copy under construction): no recursion into __getattr__.
            raise AttributeError(name)
        return getattr(self._file, name)


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


def installed_package_file(package: str, path_in_package: str) -> Optional[str]:
    """Path of a file that an installed distribution ships (`path_in_package` as its RECORD lists it, with '/'),
    or None when the distribution or the file is not installed. The package is found through its metadata and
    never imported, so that importing it cannot pull in its dependencies (e.g. torchvision)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).replace(os.sep, '/') == path_in_package:
            path = str(file.locate())
            return path if os.path.isfile(path) else None
    return None


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
    """A URL could not be fetched; the message says where to put the file by hand.

    `attempts` is the number of requests made, `transient` whether the last error was of a kind that can go
    away by itself (a server error, a connection lost in the middle of a transfer)."""

    def __init__(self, message: str, attempts: int = 1, transient: bool = False):
        super().__init__(message)
        self.attempts = attempts
        self.transient = transient


# Seconds between two updates of the progress line on a terminal, and between two progress lines elsewhere (a log
# file gets one line each time, so updates there are rare).
PROGRESS_INTERVAL_TTY = 0.5
PROGRESS_INTERVAL_LOG = 30.0

# errno values of a connect() that cannot succeed from this machine however often it is tried.
_UNREACHABLE_ERRNOS = {getattr(errno, name): text for name, text in [
    ('ENETUNREACH', 'the network is unreachable'), ('EHOSTUNREACH', 'there is no route to the host'),
    ('ENETDOWN', 'the network is down'), ('EHOSTDOWN', 'the host is down'),
] if hasattr(errno, name)}


class _IncompleteDownload(Exception):
    """The server closed the transfer early, or sent nothing."""


def _exception_chain(error: BaseException) -> list:
    """`error` and every exception behind it: causes, contexts, and the errors that urllib3 keeps in `.reason`
    or in its arguments (requests wraps urllib3's errors, which wrap the socket's)."""
    seen, stack = [], [error]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        stack += [e.__cause__, e.__context__, getattr(e, 'reason', None), *e.args]
    return seen


def format_bytes(num_bytes: float) -> str:
    """Three significant digits in powers of 1000: '512 B', '1.05 kB', '45.6 MB', '363 MB', '1.23 GB'."""
    for unit, scale in [('GB', 1e9), ('MB', 1e6), ('kB', 1e3)]:
        if num_bytes >= scale:
            value = num_bytes / scale
            return f'{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}'
    return f'{int(num_bytes)} B'


def classify_download_error(error: BaseException, url: str) -> tuple:
    """(reason, transient) for an error of requests (or of the download itself).

    Not transient, so not retried: the host name does not resolve, the connection is refused, there is no
    route to the host or no network, the host does not answer the connection at all (connect timeout), a
    proxy cannot be reached, TLS fails, a 4xx answer other than 408/429. An offline machine meets the first
    few at once, and waiting minutes between retries would not change them. Transient: 5xx, 408 and 429
    answers, a read timeout or a connection lost in the middle of a transfer, a truncated or empty body.
    """
    import requests  # Imported here so that importing dnnlib stays cheap.

    host = urllib.parse.urlparse(url).hostname or url
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        reason = f'the server answered HTTP {status} {error.response.reason or ""}'.rstrip()
        return reason, status >= 500 or status in (408, 429)
    if isinstance(error, _IncompleteDownload):
        return str(error), True
    if isinstance(error, requests.exceptions.ProxyError):
        return f'the proxy cannot be reached or refused the connection to {host}', False
    if isinstance(error, requests.exceptions.SSLError):
        return f'the TLS connection to {host} failed ({error.__class__.__name__})', False
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return f'{host} did not accept a connection (connect timeout)', False
    for e in _exception_chain(error):
        if isinstance(e, socket.gaierror):
            return f'the host name "{host}" cannot be resolved (no network or no name server)', False
        if isinstance(e, ConnectionRefusedError):
            return f'{host} refused the connection', False
        if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS:
            return f'{_UNREACHABLE_ERRNOS[e.errno]} ({host})', False
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                          requests.exceptions.MissingSchema)):
        return f'invalid URL ({error})', False
    # requests reports a read timeout during the body as a ConnectionError wrapping urllib3's timeout.
    if isinstance(error, requests.exceptions.Timeout) or any(isinstance(e, TimeoutError)
                                                             for e in _exception_chain(error)):
        return f'{host} stopped sending data (read timeout)', True
    # Connection resets and protocol errors in the middle of a transfer.
    return f'the transfer from {host} failed ({error.__class__.__name__}: {str(error)[:200]})', True


class _DownloadProgress:
    """Progress of one download: bytes so far (of the total, when the server sends it) and the rate. On a
    terminal it is one line, rewritten in place; elsewhere (a log file) it prints a line every
    PROGRESS_INTERVAL_LOG seconds, so that logs do not fill with updates."""

    def __init__(self, total: Optional[int], stream: Any = None):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, 'isatty', lambda: False)())
        self.interval = PROGRESS_INTERVAL_TTY if self.tty else PROGRESS_INTERVAL_LOG
        self.start_time = time.time()
        self.last_time = self.start_time
        self.line_width = 0  # Length of the line now on the terminal (0 = none open).

    def _status(self, received: int) -> str:
        elapsed = time.time() - self.start_time
        rate = received / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f'  {format_bytes(received)} of {format_bytes(self.total)} ({100 * received / self.total:.0f}%)'
        else:
            text = f'  {format_bytes(received)}'
        text += f', {format_bytes(rate)}/s'
        if self.total and rate > 0 and received < self.total:
            text += f', {format_time((self.total - received) / rate)} left'
        return text

    def _show(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write('\r' + text.ljust(self.line_width) + ('\n' if final else ''))
            self.line_width = 0 if final else len(text)
        else:
            self.stream.write(text + '\n')
        self.stream.flush()

    def update(self, received: int) -> None:
        now = time.time()
        if now - self.last_time >= self.interval:
            self.last_time = now
            self._show(self._status(received), final=False)

    def finish(self, received: int) -> None:
        elapsed = time.time() - self.start_time
        rate = received / elapsed if elapsed > 0 else 0.0
        self._show(f'  {format_bytes(received)} in {format_time(elapsed)} ({format_bytes(rate)}/s), done.', final=True)

    def abort(self) -> None:
        """End an open terminal line, so that the next message starts on a line of its own."""
        if self.tty and self.line_width:
            self.stream.write('\n')
            self.stream.flush()
            self.line_width = 0


def _fetch(url: str, dest: Any, timeouts: tuple, verbose: bool) -> None:
    """One request: stream the body of `url` into the file object `dest`."""
    import requests  # Imported here so that importing dnnlib stays cheap.

    # 'identity': no compressed transfer, so the byte count can be checked against Content-Length.
    with requests.get(url, stream=True, timeout=timeouts, headers={'Accept-Encoding': 'identity'}) as response:
        response.raise_for_status()
        total = response.headers.get('Content-Length')
        total = int(total) if total is not None and total.isdigit() else None
        if response.headers.get('Content-Encoding', 'identity') != 'identity':
            total = None  # Content-Length counts the encoded bytes; iter_content yields decoded ones.
        progress = _DownloadProgress(total) if verbose else None
        received = 0
        try:
            for chunk in response.iter_content(chunk_size=1 << 16):
                dest.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress.update(received)
            if total is not None and received != total:
                raise _IncompleteDownload(f'the server sent {received} of {total} bytes')
            if received == 0:
                raise _IncompleteDownload('the server sent an empty file')
        except BaseException:
            if progress is not None:
                progress.abort()
            raise
        if progress is not None:
            progress.finish(received)


def _download(
    url:            str,            # http(s) URL.
    dest:           Any,            # Writable, seekable binary file object; rewritten from the start on each try.
    num_attempts:   int,            # Most requests to make; only transient errors are retried.
    retry_delay:    float,          # Seconds before the first retry; doubles on each retry.
    timeout:        float,          # Seconds without data before a transfer counts as stalled.
    connect_timeout: float,         # Seconds to wait for the connection to open.
    verbose:        bool,           # Print the progress and the retries.
) -> None:
    import requests  # Imported here so that importing dnnlib stays cheap.

    for attempt in range(1, num_attempts + 1):
        dest.seek(0)
        dest.truncate()
        try:
            _fetch(url, dest, timeouts=(connect_timeout, timeout), verbose=verbose)
            return
        except (requests.RequestException, _IncompleteDownload) as e:
            reason, transient = classify_download_error(e, url)
            if not transient or attempt == num_attempts:
                raise DownloadError(reason, attempts=attempt, transient=transient) from None
            delay = retry_delay * 2 ** (attempt - 1)
            if verbose:
                print(f'Download of {url} failed: {reason}; retrying in {format_time(delay)} '
                      f'(attempt {attempt + 1} of {num_attempts})', flush=True)
            time.sleep(delay)


def open_url(
    url:            str,                    # Local path, file:// URL or http(s):// URL.
    cache_dir:      Optional[str] = None,   # Download cache; default make_cache_dir_path('downloads').
    num_attempts:   int = 10,               # Most requests for an http(s) download; only transient errors are retried.
    verbose:        bool = True,            # Print the download's progress (bytes, rate) and its retries.
    return_filename: bool = False,          # Return the local file path instead of an open file.
    cache:          bool = True,            # Keep downloads on disk and reuse them.
    retry_delay:    float = 1.0,            # Seconds before the first retry; doubles on each retry.
    timeout:        float = 30.0,           # Seconds without data from the server before a transfer counts as stalled.
    connect_timeout: float = 10.0,          # Seconds to wait for the server to accept the connection.
) -> Any:
    """Open a local file or a URL for binary reading.

    http(s) downloads are kept in the cache under a name derived from a hash of the URL, written to a
    temporary file and renamed into place, so an interrupted download never leaves a truncated copy that
    later runs would trust. A host that cannot be reached (no DNS, connection refused, no route, no answer)
    fails at the first attempt; server errors and transfers broken off midway are retried with exponential
    back-off (see classify_download_error). The error names the exact path where a copy of the file can be
    placed by hand.
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
        print(f'Downloading {url}', flush=True)
    download = dict(num_attempts=num_attempts, retry_delay=retry_delay, timeout=timeout,
                    connect_timeout=connect_timeout, verbose=verbose)
    try:
        if not cache:
            buffer = io.BytesIO()
            _download(url, dest=buffer, **download)
            buffer.seek(0)
            return buffer
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        # The temporary file is renamed over cache_path only after a complete download, and removed otherwise.
        write_atomically(cache_path, lambda f: _download(url, dest=f, **download))
    except DownloadError as e:
        attempts = getattr(e, 'attempts', 1)
        tries = f' (after {attempts} attempts)' if attempts > 1 else ''
        if cache:
            where = (f'If this machine is offline, fetch the file elsewhere and place it at:\n  {cache_path}\n'
                     f'(the cache root can be moved with the DNNLIB_CACHE_DIR environment variable).')
        else:
            where = 'If this machine is offline, fetch the file elsewhere and pass its local path instead of the URL.'
        raise DownloadError(f'Could not download {url}: {e}{tries}.\n{where}', attempts=attempts,
                            transient=getattr(e, 'transient', False)) from None
    return cache_path if return_filename else open(cache_path, 'rb')


# ----------------------------------------------------------------------------
# Small helpers under the names and signatures of the official dnnlib.util, which third-party code imports.


def ask_yes_no(question: str) -> bool:
    """Ask on the terminal until the answer is yes or no (y/n accepted); True for yes."""
    while True:
        answer = input(f'{question} [y/n] ').strip().lower()
        if answer in ('y', 'yes'):
            return True
        if answer in ('n', 'no'):
            return False


def tuple_product(t: Tuple) -> Any:
    """The product of the elements of `t` (1 for an empty tuple)."""
    result = 1
    for value in t:
        result *= value
    return result


# numpy dtype name -> the ctypes type of the same size and kind.
_CTYPES = {'float32': ctypes.c_float, 'float64': ctypes.c_double, 'int8': ctypes.c_int8, 'int16': ctypes.c_int16,
           'int32': ctypes.c_int32, 'int64': ctypes.c_int64, 'uint8': ctypes.c_uint8, 'uint16': ctypes.c_uint16,
           'uint32': ctypes.c_uint32, 'uint64': ctypes.c_uint64}


def get_dtype_and_ctype(type_obj: Any) -> Tuple[Any, Any]:
    """(numpy dtype, ctypes type) of a numpy dtype, a dtype name ('float32') or a ctypes type."""
    import numpy as np  # Here, not at the top: this module stays free of third-party imports for everything else.
    if isinstance(type_obj, type) and issubclass(type_obj, ctypes._SimpleCData):
        matches = [name for name, ctype in _CTYPES.items() if ctype is type_obj]
        if not matches:
            raise ValueError(f'No numpy dtype for the ctypes type {type_obj.__name__}')
        type_obj = matches[0]
    dtype = np.dtype(type_obj)
    if dtype.name not in _CTYPES:
        raise ValueError(f'No ctypes type for the dtype {dtype.name}; supported: {", ".join(_CTYPES)}')
    ctype = _CTYPES[dtype.name]
    assert dtype.itemsize == ctypes.sizeof(ctype)
    return dtype, ctype


def is_pickleable(obj: Any) -> bool:
    """Whether pickle.dumps accepts `obj`."""
    try:
        pickle.dumps(obj)
    except Exception:  # Anything pickling raises (PicklingError, TypeError, AttributeError, ...) means no.
        return False
    return True


def get_module_dir_by_obj_name(obj_name: str) -> str:
    """The directory of the module that a dotted object name (e.g. 'training.networks.Generator') lives in."""
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect_module_file(module))


def inspect_module_file(module: types.ModuleType) -> str:
    """The file of a module (a ValueError for modules without one, such as built-ins)."""
    path = getattr(module, '__file__', None)
    if path is None:
        raise ValueError(f'Module {module.__name__} has no file')
    return path


def is_top_level_function(obj: Any) -> bool:
    """Whether `obj` is a function defined at the top level of its module (so that its name finds it again)."""
    if not callable(obj) or not hasattr(obj, '__name__') or not hasattr(obj, '__module__'):
        return False
    module = sys.modules.get(obj.__module__)
    return module is not None and getattr(module, obj.__name__, None) is obj


def list_dir_recursively_with_ignore(dir_path: str, ignores: List[str] = None,
                                     add_base_to_relative: bool = False) -> List[Tuple[str, str]]:
    """(absolute path, relative path) of every file below `dir_path`, leaving out files and directories whose
    name matches one of the fnmatch patterns `ignores`; with `add_base_to_relative` the relative paths start
    with the name of `dir_path`."""
    ignores = ignores or []
    base = os.path.basename(os.path.normpath(dir_path))
    result = []
    for root, dirs, files in os.walk(dir_path):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, pattern) for pattern in ignores))
        for name in sorted(files):
            if any(fnmatch.fnmatch(name, pattern) for pattern in ignores):
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, dir_path)
            result.append((path, os.path.join(base, relative) if add_base_to_relative else relative))
    return result


def copy_files_and_create_dirs(files: List[Tuple[str, str]]) -> None:
    """Copy each (source, destination) pair, creating the destination's directories first."""
    for source, destination in files:
        folder = os.path.dirname(destination)
        if folder:
            os.makedirs(folder, exist_ok=True)
        shutil.copyfile(source, destination)
