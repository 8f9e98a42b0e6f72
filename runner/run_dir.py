"""Run-directory housekeeping: one writer per run directory, the leftovers of interrupted writes, and making,
describing and cleaning up the run directories of train.py.

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

train.py does it through `prepare_run_dir`, which also numbers and creates the directory of a new run
(`next_run_dir`) and writes `training_options.json` into it; `finish_failed_run` removes the directory of a new
run that failed before it saved anything, keeping its log in a temporary file.
"""

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from typing import Any, List, Mapping, Optional

import click

import dnnlib
from runner.errors import RunFailed, UserError, sentence
from training.checkpoint import STATE_FILE_NAME

LOCK_FILE_NAME = '.run.lock'
OPTIONS_FILE_NAME = 'training_options.json'
LOG_FILE_NAME = 'log.txt'

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

# ----------------------------------------------------------------------------
# Making, describing and cleaning up a run directory (train.py).


def next_run_dir(outdir: str, run_desc: str) -> str:
    """`<outdir>/<NNNNN>-<run_desc>`, numbered one past the largest numeric prefix already in `outdir`."""
    run_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'^(\d+)', name)
            if match is not None and os.path.isdir(os.path.join(outdir, name)):
                run_ids.append(int(match.group(1)))
    run_id = max(run_ids, default=-1) + 1
    return os.path.join(outdir, f'{run_id:05d}-{run_desc}')


def write_options(args: Mapping[str, Any], run_dir: str) -> str:
    """Write `training_options.json` (atomically, so a crash never leaves half of it)."""
    path = os.path.join(run_dir, OPTIONS_FILE_NAME)
    text = json.dumps(args, indent=2) + '\n'
    dnnlib.util.write_atomically(path, lambda f: f.write(text.encode('utf-8')))
    return path


def directory_problem(path: str) -> Optional[str]:
    """Why the directory `path` could not be made or written into, or None: its nearest existing ancestor must
    be a writable directory (not a regular file, not read-only). train.py's --outdir and the --outdir of the
    generator scripts both ask here, before any work."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f'"{probe}" is a file, not a directory'
    if not os.access(probe, os.W_OK | os.X_OK):
        return f'"{probe}" is not writable'
    return None


def check_outdir(outdir: Optional[str]) -> None:
    """Fail now if the run directory could not be made under `outdir` (directory_problem)."""
    if outdir is None:
        raise UserError('--outdir is required: the directory that receives the run directory')
    problem = directory_problem(outdir)
    if problem is not None:
        raise UserError(f'--outdir: cannot create the run directory under "{outdir}": {problem}')


def prepare_run_dir(args: dnnlib.EasyDict, outdir: Optional[str], run_desc: str) -> RunLock:
    """Create the run directory of a new run (or check that of a resumed state), set args.run_dir, lock it for
    this process's lifetime, sweep what interrupted writes left there, write the options. Returns the
    RunLock, which the caller keeps while the run trains (one writer per run directory)."""
    if args.get('run_dir') is not None:
        if not os.path.isdir(args.run_dir):
            raise UserError(f'The run directory "{args.run_dir}" of the resumed state does not exist')
        check_outdir(args.run_dir)
    else:
        check_outdir(outdir)
        os.makedirs(outdir, exist_ok=True)
        args.run_dir = next_run_dir(outdir, run_desc)
        try:
            os.makedirs(args.run_dir, exist_ok=False)
        except FileExistsError:
            raise UserError(f'The run directory "{args.run_dir}" already exists; refusing to overwrite it') from None
    try:
        lock = acquire_run_lock(args.run_dir)
    except RunDirLocked as e:
        raise UserError(str(e)) from None
    swept = sweep_temporary_files(args.run_dir)
    if swept:
        click.echo(f'Removed {len(swept)} temporary file(s) left by interrupted writes: {", ".join(swept)}')
    write_options(args, args.run_dir)
    return lock


def _has_saved_progress(run_dir: str) -> bool:
    """Whether the run wrote anything worth keeping: a network snapshot or a training state."""
    return any(name.startswith('network-snapshot-') or name == STATE_FILE_NAME for name in os.listdir(run_dir))


def finish_failed_run(error: RunFailed, run_dir: str, is_new_run: bool) -> RunFailed:
    """The error to report for a failed run. A new run that saved nothing (it failed before its first tick) leaves
    no numbered directory behind: its log moves to a temporary file that the message names."""
    log_path = os.path.join(run_dir, LOG_FILE_NAME)
    if not is_new_run or _has_saved_progress(run_dir):
        where = 'The traceback is in' if error.traceback else 'The log is'
        return RunFailed(f'{sentence(error.message)} {where} {log_path}', traceback=error.traceback)
    fd, kept_log = tempfile.mkstemp(prefix=f'{os.path.basename(run_dir)}-', suffix='-log.txt')
    os.close(fd)
    if os.path.isfile(log_path):
        shutil.copyfile(log_path, kept_log)
    shutil.rmtree(run_dir, ignore_errors=True)
    with_traceback = ', with the traceback,' if error.traceback else ''
    return RunFailed(f'{sentence(error.message)} Removed the run directory {run_dir} (nothing had been saved); its log'
                     f'{with_traceback} is {kept_log}', traceback=error.traceback)


def describe(args: Mapping[str, Any], run_dir: str, device_type: str) -> str:
    """The options tree as JSON plus a short summary (what --dry-run prints and a real run logs)."""
    data = args.get('training_set_kwargs') or {}
    synthesis = (args.get('G_kwargs') or {}).get('synthesis_kwargs') or {}
    lines = [
        'Training options:',
        json.dumps(args, indent=2),
        '',
        f'Output directory:   {run_dir}',
        f'Training data:      {data.get("path")}',
        f'Training duration:  {args.get("total_kimg")} kimg',
        f'Processes:          {args.get("num_gpus")} ({device_type})',
        f'Batch:              {args.get("batch_size")} ({args.get("batch_gpu")} per process and round)',
        f'Image resolution:   {data.get("resolution")}',
        f'Conditional model:  {data.get("use_labels")}',
        f'Dataset x-flips:    {data.get("xflip")}',
        f'Synthesis blocks:   {synthesis.get("architecture", "skip")}',
    ]
    if args.get('resume_state'):
        lines.append(f'Resuming state:     {args["resume_state"]}')
    return '\n'.join(lines)
