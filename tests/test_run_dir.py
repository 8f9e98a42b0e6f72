"""Run-directory lock and temporary-file sweep: who may write a run directory, and what a crash leaves there."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

import dnnlib
from runner import run_dir as rd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEX = 'ab12cd34ef56ab12cd34ef56ab12cd34'  # 32 lowercase hex digits, like uuid.uuid4().hex.


def _touch(path, data=b'x'):
    with open(path, 'wb') as f:
        f.write(data)


def _open_descriptors():
    return set(os.listdir('/proc/self/fd'))


# ----------------------------------------------------------------------------
# Temporary files.


def test_names_of_temporary_files():
    assert rd.is_temporary_file_name(f'training-state.pt.tmp-{HEX}')
    assert rd.is_temporary_file_name(f'network-snapshot-000040.pkl.tmp-{uuid.uuid4().hex}')
    assert rd.is_temporary_file_name('training_options.json.tmp')
    for name in [f'.tmp-{HEX}', f'x.tmp-{HEX[:-1]}', f'x.tmp-{HEX}0', f'x.tmp-{HEX.upper()}', f'x.tmp-{HEX}.keep',
                 'x.tmp-123', 'notes.tmp', 'training_options.json', 'a.training_options.json.tmp', 'log.txt']:
        assert not rd.is_temporary_file_name(name), name


def test_the_writer_names_its_temporary_files_as_the_sweeper_expects(tmp_path):
    # Look into the directory while write_atomically is writing: the one new file is its temporary file.
    seen = []
    dnnlib.util.write_atomically(str(tmp_path / 'training-state.pt'),
                                 lambda f: (seen.extend(os.listdir(tmp_path)), f.write(b'state')))
    assert len(seen) == 1 and seen[0].startswith('training-state.pt.tmp-')
    assert rd.is_temporary_file_name(seen[0])
    assert os.listdir(tmp_path) == ['training-state.pt']


def test_sweep_removes_exactly_our_leftovers(tmp_path):
    ours = [f'training-state.pt.tmp-{HEX}', f'network-snapshot-000040.pkl.tmp-{uuid.uuid4().hex}',
            'training_options.json.tmp']
    theirs = ['notes.tmp', 'x.tmp-123', f'x.tmp-{HEX}.keep', f'.tmp-{HEX}', f'x.tmp-{HEX.upper()}', 'log.txt',
              'training_options.json', 'training-state.pt', 'network-snapshot-000040.pkl']
    for name in ours + theirs:
        _touch(tmp_path / name)
    # A directory and symlinks named like temporary files stay, and so does what a symlink points at.
    os.mkdir(tmp_path / f'dir.tmp-{HEX}')
    _touch(tmp_path / f'dir.tmp-{HEX}' / f'inner.pt.tmp-{HEX}')
    outside = tmp_path.parent / f'{tmp_path.name}-outside.pt.tmp-{HEX}'
    _touch(outside)
    os.symlink(outside, tmp_path / f'link.pt.tmp-{HEX}')
    os.symlink(tmp_path / 'missing', tmp_path / f'dangling.pt.tmp-{HEX}')
    try:
        assert rd.sweep_temporary_files(str(tmp_path)) == sorted(ours)
        assert sorted(os.listdir(tmp_path)) == sorted(theirs + [f'dir.tmp-{HEX}', f'link.pt.tmp-{HEX}',
                                                                f'dangling.pt.tmp-{HEX}'])
        assert os.listdir(tmp_path / f'dir.tmp-{HEX}') == [f'inner.pt.tmp-{HEX}']
        assert outside.is_file()
        assert rd.sweep_temporary_files(str(tmp_path)) == []
    finally:
        outside.unlink()


# ----------------------------------------------------------------------------
# Lock within one process.


def test_second_lock_in_the_same_process_is_refused_until_released(tmp_path):
    run_dir = str(tmp_path)
    # A dead run's identity, longer than ours, must be replaced whole rather than overwritten in part.
    stale = dict(pid=1, host='old', started='2000-01-01T00:00:00', argv=['train.py'] + ['--long-option'] * 1000)
    (tmp_path / '.run.lock').write_text(json.dumps(stale))
    lock = rd.acquire_run_lock(run_dir)
    assert lock.locked
    identity = json.loads((tmp_path / '.run.lock').read_text())
    assert identity['pid'] == os.getpid() and identity['host'] == socket.gethostname()
    assert identity['argv'] == sys.argv and 'T' in identity['started']

    before = _open_descriptors()
    with pytest.raises(rd.RunDirLocked) as info:
        rd.acquire_run_lock(run_dir)
    message = str(info.value)
    assert '\n' not in message and f'"{run_dir}"' in message
    assert f'PID {os.getpid()} on host {socket.gethostname()} (since {identity["started"]})' in message
    assert _open_descriptors() == before  # The refused attempt closed its descriptor ...
    assert json.loads((tmp_path / '.run.lock').read_text()) == identity  # ... and left the holder's identity.
    assert isinstance(info.value, RuntimeError)

    lock.release()
    lock.release()  # Idempotent.
    assert not lock.locked
    assert (tmp_path / '.run.lock').is_file()  # Kept, so that every process competes for one inode.
    with rd.acquire_run_lock(run_dir) as again:
        assert again.locked
        with pytest.raises(rd.RunDirLocked):
            rd.acquire_run_lock(run_dir)
    assert not again.locked
    rd.acquire_run_lock(run_dir).release()


@pytest.mark.parametrize('content,reason', [
    (b'\x00garbage{', 'it is not JSON'),
    (b'', 'it is empty'),
    (b'[4242]', 'it is not a JSON object'),
    (b'{"host": "node7"}', 'it lacks pid or host'),
])
def test_unreadable_identity_gives_a_clear_message(tmp_path, content, reason):
    # Hold the lock through a second open file description, as a foreign program might, with foreign content.
    path = tmp_path / '.run.lock'
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, content)
        with pytest.raises(rd.RunDirLocked) as info:
            rd.acquire_run_lock(str(tmp_path))
    finally:
        os.close(fd)
    message = str(info.value)
    assert message == (f'Run directory "{tmp_path}" is in use by another process (its lock file "{path}" names no '
                       f'holder: {reason}); stop that run first, or wait for it to end')


# ----------------------------------------------------------------------------
# Lock across processes.


def test_lock_held_by_another_process_dies_with_it(tmp_path):
    run_dir = str(tmp_path)
    code = textwrap.dedent('''
        import sys, time
        from runner.run_dir import acquire_run_lock
        lock = acquire_run_lock(sys.argv[1])
        print('locked', flush=True)
        time.sleep(120)
    ''')
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    child = subprocess.Popen([sys.executable, '-c', code, run_dir], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # The child prints only after it holds the lock and has written its identity, so no timing is involved.
        line = child.stdout.readline()
        assert line == 'locked\n', child.stderr.read() if child.poll() is not None else line
        child_identity = json.loads((tmp_path / '.run.lock').read_text())
        assert child_identity['pid'] == child.pid and child_identity['argv'] == ['-c', run_dir]
        with pytest.raises(rd.RunDirLocked) as info:
            rd.acquire_run_lock(run_dir)
        assert f'in use by PID {child.pid} on host {socket.gethostname()} (since ' in str(info.value)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    # kill -9 gave the child no chance to clean up, yet its lock is gone, and its stale identity is replaced.
    assert json.loads((tmp_path / '.run.lock').read_text()) == child_identity
    with rd.acquire_run_lock(run_dir) as lock:
        assert lock.locked
        identity = json.loads((tmp_path / '.run.lock').read_text())
        assert identity['pid'] == os.getpid() and identity['argv'] == sys.argv


# ----------------------------------------------------------------------------
# File systems without flock.


@pytest.mark.parametrize('code', [errno.ENOLCK, errno.EOPNOTSUPP])
def test_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch, capsys, code):
    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, 'flock', no_flock)
    before = _open_descriptors()
    lock = rd.acquire_run_lock(str(tmp_path))
    assert _open_descriptors() == before
    assert capsys.readouterr().out == (f'warn: cannot lock "{tmp_path}" on this file system ({os.strerror(code)}); '
                                       f'make sure only one run writes to it\n')
    assert not lock.locked
    with lock:
        pass
    lock.release()


def test_other_lock_errors_are_raised(tmp_path, monkeypatch):
    def broken_flock(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(fcntl, 'flock', broken_flock)
    with pytest.raises(OSError) as info:
        rd.acquire_run_lock(str(tmp_path))
    assert info.value.errno == errno.EIO and not isinstance(info.value, rd.RunDirLocked)
