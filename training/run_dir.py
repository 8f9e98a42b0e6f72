"""Run-directory housekeeping: one writer per run directory, and the leftovers of interrupted writes.

A run directory (`<outdir>/<NNNNN>-<desc>/`) is written by exactly one training process. `acquire_run_lock`
makes that true: it takes an exclusive `flock` on `<run_dir>/.run.lock`, which the kernel drops when the
holder exits for any reason (kill -9 included), so a crashed run never leaves a stale lock behind and a
second `train.py --resume=<run dir>` of a run that is still training is refused with a message naming the
process that holds it.

While holding the lock, `sweep_temporary_files` removes the temporary files that atomic writes leave behind
when the process dies between creating and renaming them (each can be gigabytes: a whole training state).

Typical use, at the start of a run or a resume:

    with acquire_run_lock(run_dir):
        sweep_temporary_files(run_dir)
        ...train...
"""

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
from typing import List, Optional

LOCK_FILE_NAME = '.run.lock'

# The names of our temporary files, in one place so that the writers and the sweeper agree.
# `dnnlib.util.write_atomically(path, ...)` writes `f'{path}.tmp-{uuid.uuid4().hex}'` (32 lowercase hex digits)
# beside `path` (train.py's options file included); `training_options.json.tmp` is what earlier versions of
# train.py left when killed while writing the options. A test writes a file
# through `write_atomically` and checks that its temporary name matches, so a change to the writer that this
# pattern does not follow fails there rather than silently leaving gigabytes behind. Nothing looser is swept:
# a user's `notes.tmp` or `x.tmp-123` is not ours to delete.
ATOMIC_TEMP_NAME_RE = re.compile(r'.+\.tmp-[0-9a-f]{32}', re.DOTALL)
OPTIONS_TEMP_FILE_NAME = 'training_options.json.tmp'

# Errors with which file systems that do not implement flock (some NFS setups) answer it.
_NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


class RunDirLocked(RuntimeError):
    """Another process (or another `RunLock` of this process) holds the run directory's lock."""


def is_temporary_file_name(name: str) -> bool:
    """True for the name (not path) of a temporary file that one of our atomic writes may leave behind."""
    return name == OPTIONS_TEMP_FILE_NAME or ATOMIC_TEMP_NAME_RE.fullmatch(name) is not None


def sweep_temporary_files(run_dir: str) -> List[str]:
    """Remove the leftovers of interrupted atomic writes directly in `run_dir`; return their names, sorted.

    Call this only while holding the run's lock (`acquire_run_lock`): a live writer's temporary file has the
    same name as a dead one's, so sweeping beside a running writer would delete its file mid-write. Only plain
    files whose names `is_temporary_file_name` accepts are removed; directories and symlinks are skipped
    whatever their names, so nothing outside `run_dir` is ever touched, and subdirectories are not entered.
    """
    removed = []
    with os.scandir(run_dir) as entries:
        for entry in entries:
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            if not is_temporary_file_name(entry.name):
                continue
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                continue  # Gone already; nothing of ours is left to report.
            removed.append(entry.name)
    return sorted(removed)


class RunLock:
    """The exclusive lock on one run directory, held through an open file descriptor of its lock file.

    `release()` (or leaving the `with` block) drops it; so does the end of the process, however it ends.
    Dropping the last reference does not release it: the descriptor is a plain integer, so a run that forgets
    to release keeps its directory until it exits, which is the safe side. A `RunLock` with `fd=None` holds
    nothing; `acquire_run_lock` returns one on file systems that cannot lock.
    """

    def __init__(self,
        run_dir:    str,            # The run directory this lock guards.
        fd:         Optional[int],  # Open descriptor of `<run_dir>/.run.lock` carrying the flock; None if unlocked.
    ):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE_NAME)
        self._fd = fd

    @property
    def locked(self) -> bool:
        """True while this object holds the lock; False after `release()` or without flock support."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor drops the flock); calling it again does nothing.

        The lock file stays: a process that is waiting to lock it has opened it already, and if we deleted it,
        that process would lock the old, now nameless inode while a third one created and locked a new file of
        the same name, and both would believe they were the only writer. A file that is never deleted keeps one
        inode, so everyone competes for the same lock.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *_exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f'RunLock({self.run_dir!r}, locked={self.locked})'


def _holder_description(path: str) -> str:
    """Describe the process named in a held lock file, for the one-line `RunDirLocked` message."""
    try:
        with open(path, 'rb') as f:
            raw = f.read(65536)
    except OSError as e:
        return f'another process (its lock file "{path}" cannot be read: {e.strerror or e})'
    # The holder truncates and then writes its identity right after locking, so an empty file usually means
    # we looked in between; it is reported like any other unreadable content.
    reason = None
    try:
        holder = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        reason = 'it is empty' if not raw.strip() else 'it is not JSON'
    else:
        if not isinstance(holder, dict):
            reason = 'it is not a JSON object'
        elif not isinstance(holder.get('pid'), int) or not isinstance(holder.get('host'), str):
            reason = 'it lacks pid or host'
    if reason is not None:
        return f'another process (its lock file "{path}" names no holder: {reason})'
    # Collapse whitespace so that odd values cannot break the message over several lines.
    host = ' '.join(holder['host'].split()) or '?'
    since = holder.get('started')
    since = f' (since {" ".join(since.split())})' if isinstance(since, str) and since.strip() else ''
    return f'PID {holder["pid"]} on host {host}{since}'


def acquire_run_lock(run_dir: str) -> RunLock:
    """Take the exclusive lock of `run_dir` without waiting, record who holds it, and return it.

    The lock is a `flock` on `<run_dir>/.run.lock` (created if missing, never deleted; see `RunLock.release`).
    The kernel releases it when the holder's process ends, even by kill -9, so no lock outlives its run. On
    Linux a flock belongs to the open file description, not to the process: two `acquire_run_lock` calls on
    the same directory conflict even within one process, which keeps two trainings in one process apart too.

    The descriptor is opened close-on-exec, so programs the run executes do not inherit it, and
    `torch.multiprocessing.spawn` children (fresh interpreters) do not either. A forked child, such as a
    DataLoader worker, shares the open file description and hence the lock; that is harmless, because such
    children exit with the run, and it only means the lock lasts until the last of them has gone.

    After locking, the file is truncated and receives a small JSON object {pid, host, started, argv} naming
    the holder, which the message of a refused `acquire_run_lock` quotes. Raises `RunDirLocked` when another
    open lock holds the directory. On a file system without flock support (some NFS setups), prints one
    warning line and returns a `RunLock` that holds nothing, since refusing to train there would be worse.
    """
    path = os.path.join(run_dir, LOCK_FILE_NAME)
    # No O_TRUNC: the file may belong to a live holder whose identity a refused caller must not erase.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirLocked(f'Run directory "{run_dir}" is in use by {_holder_description(path)}; '
                           f'stop that run first, or wait for it to end') from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_FLOCK_ERRNOS:
            raise
        print(f'warn: cannot lock "{run_dir}" on this file system ({e.strerror or e}); '
              f'make sure only one run writes to it')
        return RunLock(run_dir, None)

    try:
        identity = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            argv=list(sys.argv),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(identity) + '\n').encode('utf-8'), 0)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(run_dir, fd)
