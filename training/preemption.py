"""Stopping a run cleanly on a scheduler's signal (SLURM preemption, a time limit, Ctrl-C).

Schedulers send SIGTERM some time before they kill a job (SLURM: `scancel`, preemption, the end of the time
limit; with `sbatch --signal=USR1@120` a SIGUSR1 two minutes ahead), and a terminal sends SIGINT on Ctrl-C.
Without handlers the process dies at once and everything since the last snapshot is lost. Here the first of
these signals only asks the run to stop: every rank finishes its current step, they agree on the step to stop
at, and the loop writes the training state (and, by default, a network snapshot) before it returns. A second
signal ends the process at once, for when saving takes longer than one can wait.

A launching process (train.py with several spawned ranks) forwards its own signals through a shared value
(`StopRequest.shared`) instead of signalling the children: under a scheduler the children get the signal
themselves too, and a forwarded copy would count as their second.

Schedulers signal every process of the job, so the helpers of a process must outlive the stop signals: a
DataLoader worker that died of SIGTERM would make its loader raise in the training process before anything is
saved. Such helpers start with the stop signals blocked: a child inherits the signal mask of the thread that
starts it, through fork and exec alike, so no signal can reach it before it could protect itself, and nothing
in a DataLoader worker unblocks them (torch's worker sets a SIGTERM handler, which a blocked signal never
reaches). Two ways: the loop starts its loader's workers inside `holding_stop_signals()` (whatever the start
method; on Linux it forks them, also in ranks that torch.multiprocessing spawned), and while `stop_signals` is
active every fork of this process blocks them just for the fork (`_ForkGuard`), which covers other loaders that
fork, such as the metrics' loader (training.dataset.loader_kwargs_on forks the workers of both on Linux, in
spawned ranks too; a loader that spawns its workers needs `holding_stop_signals(spawning=True)` around its
`iter()`). A worker still ends when its loader tells it to, or on its own once its parent is gone.
multiprocessing's resource tracker, which spawned processes need, starts with SIGUSR1 blocked (it ignores the
other two itself).
"""

import contextlib
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker
from typing import Any, Iterator, Optional

import torch

STOP_SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')
# In a multi-process run the ranks agree on a stop every this many steps (a tiny all-reduce, the only host
# synchronization it adds); a single process checks after every step.
AGREE_INTERVAL = 4
# Seconds within which a rank under torchrun takes a repeat of its first signal for the copy the agent forwards.
FORWARD_REPEAT_WINDOW = 5.0


class StopRequest:
    """Whether a stop was asked for, and by which signal (its name, e.g. 'SIGTERM').

    `parent_pid`: the process that launched this rank (train.py's spawning process, torchrun's agent). Its
    death stops the run as well, reported as such (`cause`) under the name SIGHUP (the hang-up of a controlling
    process): torch.multiprocessing has the kernel send its ranks a SIGINT when their parent dies
    (PR_SET_PDEATHSIG), which nobody typed, and torchrun's agent dies of a SIGUSR1 (it handles only SIGTERM,
    SIGINT, SIGHUP and SIGQUIT) without telling its workers, which sit in sessions of their own.

    `repeat_window`: under torchrun, the agent passes each signal it gets on to every rank once, so a rank that
    got the signal itself too (SLURM signals every process of a job step) sees it twice; a repeat of the first
    signal within this many seconds is taken for that copy, not for a second request."""

    def __init__(self, shared: Any = None, parent_pid: Optional[int] = None, repeat_window: float = 0.0):
        self.signame: Optional[str] = None
        self.shared = shared    # A multiprocessing Value('i') holding a signal number set by the launcher, or None.
        self.parent_pid = parent_pid
        self.repeat_window = repeat_window
        self.cause: Optional[str] = None    # What stopped the run when it was not a signal someone sent.
        self.first_time = 0.0

    def handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None:
            if name == self.signame and time.monotonic() - self.first_time < self.repeat_window:
                return
            print(f'\n{name} again: exiting at once (the training state of the last snapshot or stop is intact)',
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.first_time = time.monotonic()
        if signum == signal.SIGINT and self._parent_died():
            return
        self.signame = name
        print(f'\n{name} received: stopping after the current step and saving the training state '
              f'(send it again to exit at once)', file=sys.stderr, flush=True)

    def _parent_died(self) -> bool:
        """Whether the launching process is gone (this process was adopted by another); the first time, say so
        and ask for the stop."""
        if self.parent_pid is None or os.getppid() == self.parent_pid:
            return False
        if self.cause is None:
            self.signame = 'SIGHUP'
            self.cause = f'the launching process (PID {self.parent_pid}) died'
            print(f'\nThe launching process (PID {self.parent_pid}) died: stopping after the current step and '
                  f'saving the training state', file=sys.stderr, flush=True)
        return True

    def local(self) -> int:
        """The signal number this process knows of, 0 for none."""
        if self.signame is None:
            self._parent_died()  # One system call; the agent of torchrun dies without a word to its ranks.
        if self.signame is not None:
            return int(signal.Signals[self.signame])
        if self.shared is not None and self.shared.value:
            return int(self.shared.value)
        return 0

    def agreed(self, batch_idx: int, num_gpus: int, device: torch.device) -> Optional[str]:
        """The signal every rank stops for after step `batch_idx`, or None. A collective when num_gpus > 1:
        all ranks call it after every step, and only every AGREE_INTERVAL steps does it communicate."""
        if num_gpus == 1:
            signum = self.local()
        else:
            if batch_idx % AGREE_INTERVAL != 0:
                return None
            signum = max_over_ranks(self.local(), device)
        return signal.Signals(signum).name if signum else None


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (a collective over the default process group)."""
    backend_device = device if torch.distributed.get_backend() == 'nccl' else torch.device('cpu')
    flag = torch.tensor([int(value)], dtype=torch.int64, device=backend_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def stop_signal_numbers() -> set:
    return {signal.Signals[name] for name in STOP_SIGNALS}


class _ForkGuard:
    """os.register_at_fork hooks that let a forked child start with the stop signals blocked while
    `active` > 0 (stop_signals() blocks nest). Hooks cannot be unregistered, so they are registered once, at
    the first stop_signals() of the process, and do nothing while no block is active."""

    def __init__(self):
        self.active = 0
        self.registered = False
        self.saved_masks = threading.local()

    def register(self) -> None:
        if not self.registered:
            os.register_at_fork(before=self.before, after_in_parent=self.after_in_parent)
            self.registered = True

    def before(self) -> None:
        if self.active:
            # Only the forking thread is copied into the child, with its mask: block there, just for the fork.
            self.saved_masks.mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signal_numbers())

    def after_in_parent(self) -> None:
        mask = getattr(self.saved_masks, 'mask', None)
        if mask is not None:
            # A signal that came during the fork was held, not lost: it is delivered here, to our handler.
            self.saved_masks.mask = None
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


_fork_guard = _ForkGuard()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker, a helper process that spawned processes need, unless it runs.
    It ignores SIGINT and SIGTERM but would die of SIGUSR1, which SLURM's --signal sends to every process of a
    job (it is relaunched with a traceback): started with SIGUSR1 blocked, it inherits the blocked signal. Its
    start unblocks SIGINT and SIGTERM in the calling thread whatever the mask was, so it must not happen inside
    `holding_stop_signals()`: that block starts it first where it is needed."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def holding_stop_signals(spawning: bool = False) -> Iterator[None]:
    """Within this block the calling thread holds the stop signals back (they are delivered when it ends, not
    lost), so that the processes it starts (DataLoader workers, helper processes) inherit them blocked and
    outlive a stop signal sent to the whole process group. `spawning`: processes will be started with the spawn
    or forkserver method, which need the resource tracker (started first; see start_resource_tracker)."""
    if spawning:
        start_resource_tracker()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signal_numbers())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def stop_signals(request: StopRequest) -> Iterator[StopRequest]:
    """Within this block the stop signals go to `request`, and processes forked here (DataLoader workers)
    start with them blocked (module docstring); the previous handlers come back afterwards. Outside the main
    thread (where Python cannot install handlers) the block only watches `request.shared`."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}
    _fork_guard.register()
    _fork_guard.active += 1
    try:
        for name in STOP_SIGNALS:
            signum = signal.Signals[name]
            previous[signum] = signal.signal(signum, request.handle)
        yield request
    finally:
        _fork_guard.active -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_message(signame: str, kimg: float, run_dir: str, cause: Optional[str] = None) -> str:
    """The one line a stopped run ends with; `cause` replaces the signal where it says more (StopRequest.cause)."""
    why = f'because {cause}' if cause else f'by {signame}'
    return f'Stopped {why} at kimg {kimg:.1f}; resume with: python train.py --resume={run_dir}'
