"""dnnlib: EasyDict, crash-safe writes (a full disk included), Logger, cache directory, format_time, objects by
name, open_url."""

import copy
import errno
import http.server
import io
import math
import os
import pickle
import socket
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from dnnlib import util

# ----------------------------------------------------------------------------
# EasyDict


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2}
    assert d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert not hasattr(d, 'missing')


def test_easydict_is_the_pickled_name_official_snapshots_use():
    assert dnnlib.EasyDict is util.EasyDict
    data = pickle.dumps(dnnlib.EasyDict(x=dnnlib.EasyDict(y=[1, 2])))
    assert b'dnnlib.util' in data and b'EasyDict' in data
    restored = pickle.loads(data)
    assert type(restored) is util.EasyDict and restored.x.y == [1, 2]
    clone = copy.deepcopy(restored)
    assert clone == restored and clone.x is not restored.x


# ----------------------------------------------------------------------------
# Crash-safe file writing, a full disk included


class _FullDiskFile(io.FileIO):
    """A real file on a disk with `space` bytes left: a write takes what fits and says so (a short write, as
    the kernel does), and the next one fails with ENOSPC."""

    def __init__(self, path, space):
        super().__init__(path, 'x')
        self.space = space

    def write(self, data):
        if self.space == 0:
            raise OSError(errno.ENOSPC, 'No space left on device')
        data = memoryview(data).cast('B')[:self.space]
        self.space -= len(data)
        return super().write(data)


def disk_full_open(space, name_contains=''):
    """An `open` for dnnlib.util (monkeypatch util.open) under which the files whose names contain
    `name_contains` fill the disk after `space` bytes; other files open as usual."""
    def fake_open(path, mode='r', *args, **kwargs):
        if name_contains not in os.path.basename(path):
            return open(path, mode, *args, **kwargs)
        assert mode == 'xb', 'write_atomically creates its temporary file with mode "xb"'
        return io.BufferedWriter(_FullDiskFile(path, space))
    return fake_open


def _png_writer(f):
    pixels = np.random.RandomState(0).randint(0, 256, size=(64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels, 'RGB').save(f, format='PNG')


# Each writes far more than the 1000 bytes the full disk takes: torch.save (which turns the OSError of a write
# larger than the file's buffer into a RuntimeError about an "unexpected pos"), pickle (which lets it through)
# and PIL's PNG writer.
_WRITERS = dict(
    torch_save  = lambda f: torch.save(dict(weight=torch.arange(2.0 ** 18)), f),
    pickle_dump = lambda f: pickle.dump(bytes(2 ** 20), f),
    pil_png     = _png_writer,
)


@pytest.mark.parametrize('writer', list(_WRITERS))
def test_a_full_disk_gives_the_original_error_and_keeps_the_old_file(tmp_path, monkeypatch, writer):
    path = tmp_path / 'snapshot.bin'
    path.write_bytes(b'old contents')
    monkeypatch.setattr(util, 'open', disk_full_open(1000), raising=False)
    with pytest.raises(OSError) as error:
        util.write_atomically(str(path), _WRITERS[writer])
    assert type(error.value) is OSError and error.value.errno == errno.ENOSPC
    assert error.value.strerror == 'No space left on device'
    assert error.value.filename == str(path)  # Which file it was, for the caller's one-line message.
    assert path.read_bytes() == b'old contents'
    assert os.listdir(tmp_path) == ['snapshot.bin']  # The temporary file is gone.


@pytest.mark.parametrize('writer', list(_WRITERS))
def test_writers_work_through_the_error_recording_file(tmp_path, writer):
    path = str(tmp_path / 'out.bin')
    util.write_atomically(path, _WRITERS[writer])
    if writer == 'torch_save':
        assert torch.equal(torch.load(path, weights_only=True)['weight'], torch.arange(2.0 ** 18))
    elif writer == 'pickle_dump':
        with open(path, 'rb') as f:
            assert pickle.load(f) == bytes(2 ** 20)
    else:
        with PIL.Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == 'RGB'
    assert os.listdir(tmp_path) == ['out.bin']


def test_a_writer_that_swallows_a_failed_write_does_not_replace_the_file(tmp_path, monkeypatch):
    path = tmp_path / 'state.pt'
    path.write_bytes(b'old contents')

    def careless_writer(f):
        f.write(b'x' * 10)
        try:
            f.write(b'y' * 2 ** 16)  # More than the file's buffer holds: this write reaches the disk.
        except OSError:
            pass  # The file now lacks data, but the writer returns as if all went well.

    monkeypatch.setattr(util, 'open', disk_full_open(30), raising=False)
    with pytest.raises(OSError) as error:
        util.write_atomically(str(path), careless_writer)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b'old contents' and os.listdir(tmp_path) == ['state.pt']


def test_errors_that_are_not_failed_writes_come_out_unchanged(tmp_path):
    path = tmp_path / 'out.bin'

    def failing_writer(f):
        f.write(b'partial')
        raise OSError('simulated, without an errno')
    with pytest.raises(OSError) as error:
        util.write_atomically(str(path), failing_writer)
    assert str(error.value) == 'simulated, without an errno' and error.value.filename is None
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Logger


def test_logger_tees_and_restores_streams(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    out_before, err_before = sys.stdout, sys.stderr
    logger = util.Logger(str(log_path))
    assert sys.stdout is logger and sys.stderr is logger
    print('hello')
    sys.stderr.write('oops\n')
    logger.write(b'bytes\n')
    logger.close()
    logger.close()  # A second close is harmless.
    assert sys.stdout is out_before and sys.stderr is err_before
    assert log_path.read_text() == 'hello\noops\nbytes\n'
    assert 'hello' in capsys.readouterr().out


def test_logger_append_mode_and_context_manager(tmp_path):
    log_path = tmp_path / 'log.txt'
    log_path.write_text('first\n')
    with util.Logger(str(log_path), file_mode='a'):
        print('second')
    assert log_path.read_text() == 'first\nsecond\n'


def test_logger_without_file_still_restores(capsys):
    out_before = sys.stdout
    with util.Logger():
        print('console only')
    assert sys.stdout is out_before
    assert 'console only' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Cache directory


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert util.make_cache_dir_path('a', 'b') == os.path.join(str(tmp_path / 'env'), 'a', 'b')
    util.set_cache_dir(str(tmp_path / 'explicit'))
    try:
        assert dnnlib.make_cache_dir_path('x') == os.path.join(str(tmp_path / 'explicit'), 'x')
    finally:
        util.set_cache_dir(None)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path('x') == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib', 'x')
    monkeypatch.delenv('HOME')
    monkeypatch.delenv('USERPROFILE', raising=False)
    assert util.make_cache_dir_path().endswith(os.path.join('.cache', 'dnnlib'))


# ----------------------------------------------------------------------------
# format_time


@pytest.mark.parametrize('seconds, expected', [
    (0, '0s'), (59.4, '59s'), (60, '1m 00s'), (187, '3m 07s'), (3599, '59m 59s'), (3600, '1h 00m 00s'),
    (18129, '5h 02m 09s'), (86399, '23h 59m 59s'), (86400, '1d 00h 00m'), (2 * 86400 + 3 * 3600 + 15 * 60, '2d 03h 15m'),
])
def test_format_time(seconds, expected):
    assert util.format_time(seconds) == expected


# ----------------------------------------------------------------------------
# Objects by name


def test_get_obj_by_name_finds_modules_functions_and_nested_attributes():
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is dnnlib.EasyDict
    assert util.get_obj_by_name('dnnlib.util.EasyDict.__getattr__') is dnnlib.EasyDict.__getattr__
    assert util.get_obj_by_name('math') is math


def test_get_obj_by_name_errors_name_the_dotted_string():
    with pytest.raises(ImportError, match='no_such_module_xyz.Thing'):
        util.get_obj_by_name('no_such_module_xyz.Thing')
    with pytest.raises(AttributeError, match='NoSuchThing'):
        util.get_obj_by_name('dnnlib.util.NoSuchThing')
    for bad in ['', 'a..b', None]:
        with pytest.raises(ValueError):
            util.get_obj_by_name(bad)


def test_get_obj_by_name_does_not_hide_a_broken_import(tmp_path, monkeypatch):
    # The module exists but fails on an import of its own: the error must say so, not "not found".
    (tmp_path / 'broken_module_for_test.py').write_text('import missing_dependency_for_test\nVALUE = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match='missing_dependency_for_test') as info:
        util.get_obj_by_name('broken_module_for_test.VALUE')
    assert 'broken_module_for_test' in str(info.value)


def test_call_func_and_construct_class_by_name():
    assert util.call_func_by_name(3, 4, func_name='math.hypot') == 5
    counter = util.construct_class_by_name('aab', class_name='collections.Counter')
    assert counter['a'] == 2
    with pytest.raises(TypeError, match='os.path.sep'):
        util.call_func_by_name(func_name='os.path.sep')
    with pytest.raises(TypeError, match='os.path.join'):
        util.construct_class_by_name(class_name='os.path.join')
    with pytest.raises(ValueError):
        util.construct_class_by_name()
    with pytest.raises(ImportError, match='nowhere.Net'):
        util.construct_class_by_name(class_name='nowhere.Net')


def test_get_top_level_function_name_round_trips():
    name = util.get_top_level_function_name(util.format_time)
    assert name == 'dnnlib.util.format_time'
    assert util.get_obj_by_name(name) is util.format_time


# ----------------------------------------------------------------------------
# open_url: local files


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'some file.bin'
    path.write_bytes(b'abc')
    with util.open_url(str(path)) as f:
        assert f.read() == b'abc'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'abc'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        util.open_url(str(tmp_path / 'missing.pkl'))
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        util.open_url((tmp_path / 'missing.pkl').as_uri())


def test_is_url():
    assert util.is_url('https://example.com/a.pkl')
    assert util.is_url('http://127.0.0.1:8000/a.pkl')
    assert not util.is_url('/tmp/a.pkl')
    assert not util.is_url('file:///tmp/a.pkl')
    assert util.is_url('file:///tmp/a.pkl', allow_file_urls=True)
    assert not util.is_url(None)


# ----------------------------------------------------------------------------
# open_url: http(s) with a server on the loopback interface


class _Server:
    """A tiny HTTP server whose responses the test scripts: a list of (status, body, truncate, stall) per request.
    `truncate` sends half the body and closes the connection; `stall` waits that many seconds after half the
    body before sending the rest."""

    def __init__(self):
        self.requests = []
        self.script = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- name fixed by BaseHTTPRequestHandler.
                server.requests.append(self.path)
                status, body, truncate, stall = (list(server.script.pop(0)) + [0.0])[:4] if server.script else \
                    (200, b'payload', False, 0.0)
                self.send_response(status)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                try:
                    if truncate or stall:
                        self.wfile.write(body[:len(body) // 2])
                        self.wfile.flush()
                    if stall:
                        time.sleep(stall)
                    if truncate:
                        self.close_connection = True
                    else:
                        self.wfile.write(body[len(body) // 2:] if stall else body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # The client gave up on a stalled transfer.

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.stop()


def _unused_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_open_url_downloads_once_into_the_cache(server, tmp_path):
    url = server.url + '/pretrained/net.pkl'
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'payload'
    cached = util.url_cache_path(url, str(tmp_path))
    assert os.path.basename(cached) == util.url_cache_key(url) + '_net.pkl'
    assert open(cached, 'rb').read() == b'payload'
    server.stop()  # A second open must not need the network.
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False) == cached
    assert len(server.requests) == 1
    assert [name for name in os.listdir(tmp_path) if '.tmp-' in name] == []


def test_open_url_default_cache_honours_dnnlib_cache_dir(server, monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    path = util.open_url(server.url + '/x.pt', return_filename=True, verbose=False)
    assert path.startswith(str(tmp_path / 'downloads'))


def test_open_url_retries_server_errors(server, tmp_path):
    server.script = [(500, b'err', False), (503, b'err', False), (200, b'third time', False)]
    with util.open_url(server.url + '/f', cache_dir=str(tmp_path), num_attempts=3, retry_delay=0.01,
                       verbose=False) as f:
        assert f.read() == b'third time'
    assert len(server.requests) == 3


def test_open_url_does_not_retry_not_found(server, tmp_path):
    server.script = [(404, b'nope', False)] * 5
    with pytest.raises(util.DownloadError, match='404'):
        util.open_url(server.url + '/f', cache_dir=str(tmp_path), num_attempts=5, retry_delay=0.01, verbose=False)
    assert len(server.requests) == 1


def test_open_url_truncated_download_leaves_no_cache_file(server, tmp_path):
    server.script = [(200, b'0123456789' * 100, True)] * 2
    url = server.url + '/big.bin'
    with pytest.raises(util.DownloadError):
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, retry_delay=0.01, verbose=False)
    assert not os.path.exists(util.url_cache_path(url, str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_open_url_offline_error_says_where_to_put_the_file(tmp_path):
    url = f'http://127.0.0.1:{_unused_port()}/metrics/inception-2015-12-05.pt'
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, retry_delay=0.01, verbose=False)
    message = str(info.value)
    assert url in message and 'offline' in message
    assert util.url_cache_path(url, str(tmp_path)) in message
    # Placing the file there by hand is enough.
    with open(util.url_cache_path(url, str(tmp_path)), 'wb') as f:
        f.write(b'manual copy')
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'manual copy'


def test_open_url_without_cache(server, tmp_path):
    f = util.open_url(server.url + '/f', cache_dir=str(tmp_path), cache=False, verbose=False)
    assert isinstance(f, io.BytesIO) and f.read() == b'payload'
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        util.open_url(server.url + '/f', cache_dir=str(tmp_path), cache=False, return_filename=True)


def test_open_url_verbose_progress(server, tmp_path, capsys):
    util.open_url(server.url + '/f', cache_dir=str(tmp_path)).close()
    assert 'Downloading' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# open_url: an unreachable host fails at once; only what can be transient is retried; progress.

FAILS_FAST_SECONDS = 20  # "Seconds, not minutes": the old back-off over 10 attempts waited about 8.5 minutes.


def _open_with_defaults(url, tmp_path, monkeypatch):
    """open_url with its default attempts, back-off and verbosity; returns (DownloadError, seconds taken). A
    back-off sleep fails the test at once instead of waiting for it (the defaults would wait minutes)."""
    def no_back_off(seconds):
        raise AssertionError(f'open_url backs off ({seconds} s) for an error that cannot go away')
    monkeypatch.setattr(util.time, 'sleep', no_back_off)
    start = time.monotonic()
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path / 'cache'))
    return info.value, time.monotonic() - start


def test_unresolvable_host_fails_at_once_with_the_message(tmp_path, monkeypatch, capsys):
    url = 'http://nonexistent.invalid/x.pkl'  # .invalid never resolves (RFC 6761).
    error, seconds = _open_with_defaults(url, tmp_path, monkeypatch)
    message = str(error)
    assert seconds < FAILS_FAST_SECONDS
    assert error.attempts == 1 and not error.transient
    assert 'nonexistent.invalid' in message and 'cannot be resolved' in message and 'offline' in message
    assert util.url_cache_path(url, str(tmp_path / 'cache')) in message
    assert 'retrying' not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / 'cache') or os.listdir(tmp_path / 'cache') == []


def test_closed_port_fails_at_once_with_the_message(tmp_path, monkeypatch):
    url = f'http://127.0.0.1:{_unused_port()}/pretrained/ffhq.pkl'
    error, seconds = _open_with_defaults(url, tmp_path, monkeypatch)
    assert seconds < FAILS_FAST_SECONDS
    assert error.attempts == 1 and 'refused' in str(error)
    assert util.url_cache_path(url, str(tmp_path / 'cache')) in str(error)


@pytest.mark.parametrize('socket_error, expected', [
    (OSError(errno.ENETUNREACH, 'Network is unreachable'), 'network is unreachable'),
    (OSError(errno.EHOSTUNREACH, 'No route to host'), 'no route to the host'),
    (socket.timeout('timed out'), 'did not accept a connection'),
])
def test_no_route_and_no_answer_are_not_retried(socket_error, expected, tmp_path, monkeypatch):
    # What connect() raises on a machine without a route, or whose packets are dropped, fed in where urllib3 opens
    # its sockets, so the error travels through urllib3 and requests as a real one does.
    import urllib3.util.connection
    calls = []

    def connect(*args, **kwargs):
        calls.append(args)
        raise socket_error
    monkeypatch.setattr(urllib3.util.connection, 'create_connection', connect)
    error, seconds = _open_with_defaults(f'http://127.0.0.1:{_unused_port()}/f.pkl', tmp_path, monkeypatch)
    assert expected in str(error) and error.attempts == 1 and len(calls) == 1
    assert seconds < FAILS_FAST_SECONDS


def test_server_errors_and_rate_limits_are_retried_with_back_off(server, tmp_path, monkeypatch, capsys):
    delays = []
    monkeypatch.setattr(util.time, 'sleep', delays.append)
    server.script = [(503, b'busy', False), (429, b'slow down', False), (500, b'oops', False), (200, b'done', False)]
    with util.open_url(server.url + '/f', cache_dir=str(tmp_path), retry_delay=0.5) as f:
        assert f.read() == b'done'
    assert delays == [0.5, 1.0, 2.0] and len(server.requests) == 4
    out = capsys.readouterr().out
    assert 'HTTP 503' in out and 'HTTP 429' in out and 'retrying' in out
    # When the attempts run out, the error says how many there were and what the server answered.
    server.script = [(502, b'bad gateway', False)] * 3
    with pytest.raises(util.DownloadError, match='HTTP 502') as info:
        util.open_url(server.url + '/g', cache_dir=str(tmp_path), num_attempts=3, verbose=False)
    assert info.value.attempts == 3 and info.value.transient and 'after 3 attempts' in str(info.value)


def test_a_transfer_broken_off_midway_is_retried(server, tmp_path):
    body = bytes(range(256)) * 40
    server.script = [(200, body, True), (200, body, False)]
    path = util.open_url(server.url + '/net.pkl', cache_dir=str(tmp_path), retry_delay=0.01, return_filename=True,
                         verbose=False)
    assert open(path, 'rb').read() == body and len(server.requests) == 2
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # No temporary file left behind.


def test_a_stalled_transfer_is_retried(server, tmp_path):
    server.script = [(200, b'x' * 1000, False, 3.0), (200, b'y' * 1000, False)]
    with util.open_url(server.url + '/f', cache_dir=str(tmp_path), retry_delay=0.01, timeout=0.3,
                       verbose=False) as f:
        assert f.read() == b'y' * 1000
    assert len(server.requests) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_updating_line_on_a_terminal(server, tmp_path, monkeypatch):
    monkeypatch.setattr(util, 'PROGRESS_INTERVAL_TTY', 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    server.script = [(200, b'z' * 400000, False)]
    url = server.url + '/big.pkl'
    util.open_url(url, cache_dir=str(tmp_path)).close()
    header, progress, rest = terminal.getvalue().split('\n')
    assert header == f'Downloading {url}' and rest == ''
    updates = progress.split('\r')[1:]
    assert len(updates) >= 3  # 400 kB arrive in 64 kB chunks: one rewrite of the line per chunk here.
    assert all('of 400 kB' in update and '/s' in update for update in updates[:-1])
    assert updates[-1].startswith('  400 kB in ') and updates[-1].rstrip().endswith('done.')  # Spaces clear the old text.


def test_progress_in_a_log_is_whole_lines(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(util, 'PROGRESS_INTERVAL_LOG', 0.0)
    server.script = [(200, b'z' * 200000, False)]
    util.open_url(server.url + '/big.pkl', cache_dir=str(tmp_path)).close()
    out = capsys.readouterr().out
    assert '\r' not in out
    lines = out.splitlines()
    assert lines[0].startswith('Downloading ') and lines[-1].endswith('done.')
    assert any('of 200 kB' in line and '/s' in line for line in lines[1:-1])


@pytest.mark.parametrize('num_bytes, expected', [
    (0, '0 B'), (999, '999 B'), (1000, '1.00 kB'), (65536, '65.5 kB'), (400000, '400 kB'), (2.5e6, '2.50 MB'),
    (363e6, '363 MB'), (1.23e9, '1.23 GB'),
])
def test_format_bytes(num_bytes, expected):
    assert util.format_bytes(num_bytes) == expected


def test_installed_package_file():
    # pytest ships its own __init__.py; a missing distribution or file gives None, never an import.
    path = dnnlib.util.installed_package_file('pytest', 'pytest/__init__.py')
    assert path is not None and os.path.isfile(path)
    assert dnnlib.util.installed_package_file('pytest', 'pytest/no-such-file.py') is None
    assert dnnlib.util.installed_package_file('no-such-distribution-xyz', 'x/y.py') is None
