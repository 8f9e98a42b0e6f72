"""dnnlib: EasyDict, Logger, cache directory, format_time, objects by name, open_url."""

import copy
import http.server
import io
import math
import os
import pickle
import socket
import sys
import threading

import pytest

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
    """A tiny HTTP server whose responses the test scripts: a list of (status, body, truncate) per request."""

    def __init__(self):
        self.requests = []
        self.script = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- name fixed by BaseHTTPRequestHandler.
                server.requests.append(self.path)
                status, body, truncate = server.script.pop(0) if server.script else (200, b'payload', False)
                self.send_response(status)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if truncate else body)
                if truncate:
                    self.close_connection = True

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
