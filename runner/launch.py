"""Running the processes of a training run: one here, N spawned here, or this process's share of a torchrun or
srun launch; each rank's logging and error handling, and the forwarding of stop signals to spawned ranks.

An error in a rank is one line for the user (`RunFailed`) and a traceback in log.txt. The training loop
(package `training`, below `metrics`) gets the evaluator of the metrics from here, at its one call site.
"""

import contextlib
import inspect
import os
import signal
import tempfile
import time
import traceback
from typing import Any, Iterator, List, Mapping, Optional

import torch

import dnnlib
from metrics import metric_main
from runner import host_memory
from runner.errors import RunFailed, UserError
from runner.run_dir import LOG_FILE_NAME, finish_failed_run, prepare_run_dir
from torch_utils import custom_ops, training_stats
from torch_utils import distributed as launcher  # Not `distributed`: that names the launch-environment argument.
from training import preemption
from training.training_loop import TrainingStopped, one_line

DEFAULT_TRAINING_LOOP = 'training.training_loop.training_loop'
# Seconds the other ranks get to end by themselves after one failed, and again after SIGTERM (launch_training).
FAILED_RUN_GRACE_S = 5

# ----------------------------------------------------------------------------
# One rank.


def _failure_line(error: BaseException) -> str:
    """One line for an error raised by the training loop (TrainingStopped carries its own)."""
    if isinstance(error, TrainingStopped):
        return str(error)
    return f'Training stopped: {one_line(error)} ({type(error).__name__})'


def _log_traceback(run_dir: str, rank: int) -> None:
    """Append the traceback of the exception being handled to log.txt only (the console gets one line)."""
    with open(os.path.join(run_dir, LOG_FILE_NAME), 'a') as f:
        f.write(f'\nTraceback of rank {rank}:\n{traceback.format_exc()}')


def _run_rank(rank: int, world_size: int, args: Mapping[str, Any], device: torch.device, loop: str,
              stop_request: Any = None) -> Optional[str]:
    """One process of a run whose process group (if any) is ready: logging, statistics, the training loop.

    Returns the one-line stop message when a signal stopped the run (rank 0 only), else None. An error ends
    the process with RunFailed (one line) and leaves its traceback in log.txt.
    """
    host_memory.keep_freed_memory()
    logger = None
    if rank == 0:
        logger = dnnlib.util.Logger(file_name=os.path.join(args['run_dir'], LOG_FILE_NAME), file_mode='a',
                                    should_flush=True)
    else:
        custom_ops.verbosity = 'none'  # One message per plugin build is enough.
    try:
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        training_stats.init_multiprocessing(rank=rank, sync_device=device if world_size > 1 else None)
        training_loop = dnnlib.util.get_obj_by_name(loop)
        extra = dict()
        if args.get('metrics'):
            # The loop (package `training`) may not import `metrics`; the evaluator comes from here.
            extra['metric_fn'] = metric_main.run_training_metrics
        if stop_request is not None:
            extra['stop_request'] = stop_request
        state = training_loop(rank=rank, device=device, **args, **extra)
        stop = getattr(state, 'stop', None)  # A stand-in loop (the tests') may return nothing.
        if rank != 0 or stop is None or stop.signal is None:
            return None
        message = preemption.stop_message(stop.signal, state.progress.cur_nimg / 1000, args['run_dir'],
                                          cause=getattr(stop.request, 'cause', None))
        print(message)  # Into log.txt as well.
        return message
    except Exception as e:
        if logger is not None:
            logger.close()
            logger = None
        _log_traceback(args['run_dir'], rank)
        raise RunFailed(_failure_line(e)) from None
    finally:
        if logger is not None:
            logger.close()


def _spawned_rank(rank: int, device: torch.device, args: Mapping[str, Any], temp_dir: str, loop: str,
                  stop_value: Any) -> None:
    """A process that launcher.start() spawned, already in the process group. A failure leaves its one-line
    message in `<temp_dir>/rank<r>.error`, a signal stop in `<temp_dir>/stopped`, for the launching process."""
    try:
        stop_request = preemption.StopRequest(shared=stop_value, parent_pid=os.getppid())
        message = _run_rank(rank, args['num_gpus'], args, device, loop, stop_request)
        if message is not None:
            with open(os.path.join(temp_dir, 'stopped'), 'w') as f:
                f.write(message)
    except RunFailed as e:
        # Stamped with the system-wide monotonic clock (file times are too coarse to order the ranks). Written
        # before the launcher takes this rank out of the group, so before any peer can notice that it is gone.
        with open(os.path.join(temp_dir, f'rank{rank}.error'), 'w') as f:
            f.write(f'{time.monotonic_ns()}\n{e.message}')
        raise

def run_rank(rank: int, args: Mapping[str, Any], temp_dir: str, loop: str = DEFAULT_TRAINING_LOOP) -> Optional[str]:
    """Process `rank` of args['num_gpus'] that someone else started (the contract of the official
    subprocess_fn, which train.subprocess_fn keeps): the ranks of a multi-process run meet through a file in
    `temp_dir`; each runs on its own CUDA device, or on the CPU when args['device_type'] says so. args['run_dir']
    must exist. Returns the stop message on rank 0 when a signal stopped the run, else None."""
    world_size = args['num_gpus']
    device = launcher.rank_device(args.get('device_type', 'cuda'), rank)
    if world_size == 1:
        return _run_rank(rank, 1, args, device, loop)
    init_file = os.path.abspath(os.path.join(temp_dir, launcher.INIT_FILE_NAME))
    launcher.init_process_group(rank, world_size, device, f'file://{init_file}')
    try:
        return _run_rank(rank, world_size, args, device, loop)
    finally:
        torch.distributed.destroy_process_group()

# ----------------------------------------------------------------------------
# Launching.


def _first_error(temp_dir: str) -> Optional[str]:
    """The message of the rank that failed first. It wrote it before leaving the process group, so before any
    peer could notice that it was gone: the oldest stamp."""
    errors = []
    for name in os.listdir(temp_dir):
        if name.endswith('.error'):
            with open(os.path.join(temp_dir, name)) as f:
                stamp, message = f.read().split('\n', 1)
            errors.append((int(stamp), message))
    return min(errors)[1] if errors else None


@contextlib.contextmanager
def _forward_stop_signals(stop_value: Any, processes: List[Any]) -> Iterator[None]:
    """While the spawned ranks train, a stop signal to this launching process sets `stop_value` (which the
    ranks poll; see training/preemption.py for why it is not re-sent as a signal); a second one kills them."""
    def handle(signum, _frame):
        if stop_value.value:
            for process in processes:
                process.kill()
            os._exit(128 + signum)
        stop_value.value = signum

    previous = {}
    try:
        for name in preemption.STOP_SIGNALS:
            signum = signal.Signals[name]
            previous[signum] = signal.signal(signum, handle)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _join_takes_grace_period(context: Any) -> bool:
    return 'grace_period' in inspect.signature(context.join).parameters


def launch_training(args: Mapping[str, Any], device_type: str = 'cuda',
                    loop: str = DEFAULT_TRAINING_LOOP) -> Optional[str]:
    """Run `loop(rank=..., device=..., **args)` on args['num_gpus'] processes; args['run_dir'] must be set.
    Returns the stop message when a signal stopped the run, else None.

    One process runs here; more are spawned, meeting through a file in a fresh temporary directory. If one
    rank fails (an error, or killed), torch.multiprocessing.spawn ends the others and this raises RunFailed
    with one line about the first failure. `loop` is a dotted name (spawned processes import it), so tests can
    substitute a small function.
    """
    assert args.get('run_dir') is not None, 'launch_training() needs args.run_dir'
    world_size = args['num_gpus']
    if world_size == 1:
        return _run_rank(0, 1, args, launcher.rank_device(device_type, 0), loop)
    preemption.start_resource_tracker()
    spawn = torch.multiprocessing.get_context('spawn')
    # Without a lock (one int, written here only): a lock is a named semaphore that the resource tracker would
    # report as leaked if this process were killed with SIGKILL.
    stop_value = spawn.Value('i', 0, lock=False)
    with tempfile.TemporaryDirectory(prefix='stylegan-train-') as temp_dir:
        context = launcher.start(_spawned_rank, (args, temp_dir, loop, stop_value), world_size,
                                 device_type, temp_dir)
        try:
            with _forward_stop_signals(stop_value, context.processes):
                # After a rank fails, the others get that long to end on their own, then SIGTERM, then as long
                # again before SIGKILL (torch's default is 30 s): one that waits in a collective for the failed
                # one would only hold the end of the run up. (PyTorch before 2.3 has no grace period to set.)
                grace = {'grace_period': FAILED_RUN_GRACE_S} if _join_takes_grace_period(context) else {}
                while not context.join(**grace):
                    pass
        except torch.multiprocessing.ProcessRaisedException:
            message = _first_error(temp_dir)
            if message is None:
                raise
            raise RunFailed(message) from None
        except torch.multiprocessing.ProcessExitedException as e:
            # Killed (out of memory, kill -9) or exited without a Python error: no message of its own.
            how = f'was killed by {e.signal_name}' if e.signal_name else f'exited with code {e.exit_code}'
            raise RunFailed(f'Training stopped: rank {e.error_index} (PID {e.error_pid}) {how}; the other ranks '
                            f'were stopped', traceback=False) from None
        stopped = os.path.join(temp_dir, 'stopped')
        if os.path.isfile(stopped):
            with open(stopped) as f:
                return f.read()
        return None


def launch_torchrun(args: dnnlib.EasyDict, outdir: Optional[str], run_desc: str, device_type: str,
                    dist: Mapping[str, Any], loop: str = DEFAULT_TRAINING_LOOP) -> Optional[str]:
    """This process's share of a torchrun or srun launch (`dist` from distributed_env()): rank 0 prepares (and
    locks) the run directory and shares its path. Returns the stop message on rank 0 when a signal stopped the
    run. `loop` as for launch_training()."""
    rank, world_size = dist['rank'], dist['world_size']
    device = launcher.rank_device(device_type, dist['local_rank'])
    is_new_run = args.get('run_dir') is None
    if world_size == 1:
        with prepare_run_dir(args, outdir, run_desc):
            try:
                return _run_rank(0, 1, args, device, loop)
            except RunFailed as e:
                raise finish_failed_run(e, args.run_dir, is_new_run) from None
    launcher.init_process_group(rank, world_size, device, launcher.launch_init_method(dist, os.environ))
    lock = None
    try:
        message = [None, None]  # [run_dir, error]: every rank learns whether rank 0 succeeded.
        if rank == 0:
            try:
                lock = prepare_run_dir(args, outdir, run_desc)
                message[0] = args.run_dir
            except (UserError, OSError) as e:
                message[1] = e.message if isinstance(e, UserError) else str(e)
        torch.distributed.broadcast_object_list(message, src=0)
        if message[1] is not None:
            raise UserError(message[1] if rank == 0 else f'rank 0 could not prepare the run directory: {message[1]}')
        args.run_dir = message[0]
        # The agent of torchrun (or srun's step daemon) launched this process; torchrun forwards signals (see
        # StopRequest for both).
        stop_request = preemption.StopRequest(parent_pid=os.getppid(),
                                              repeat_window=preemption.FORWARD_REPEAT_WINDOW)
        try:
            return _run_rank(rank, world_size, args, device, loop, stop_request)
        except RunFailed as e:
            if rank != 0:
                raise
            raise finish_failed_run(e, args.run_dir, is_new_run) from None
    finally:
        if lock is not None:
            lock.release()
        torch.distributed.destroy_process_group()

