"""Run a test function in several processes that form a gloo process group.

Usage from a test module (the worker must be a module-level function)::

    from dist_utils import spawn

    def _worker(rank, world_size, arg):
        ...  # torch.distributed is initialized here; plain asserts work

    def test_something():
        spawn(_worker, 2, arg)

Each rank runs in a fresh interpreter (the 'spawn' start method), so workers see no state
left behind by the parent test process. Rendezvous goes through a file in a new temporary
directory rather than a TCP port, so parallel test runs cannot collide. A failing rank makes
`spawn()` raise with that rank's traceback, and a stuck rank makes it raise TimeoutError
instead of hanging the test session.
"""

import datetime
import importlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed
import torch.multiprocessing

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)


def _resolve(module_name: str, qualname: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split('.'):
        obj = getattr(obj, part)
    return obj


def _child_main(
    rank: int, module_name: str, qualname: str, world_size: int, init_file: str, timeout: float, args: tuple
) -> None:
    # The worker is shipped by name and imported only after these paths are in place: under
    # pytest's importlib import mode neither tests/ nor the repo root is guaranteed to be on the
    # child's sys.path, and unpickling the function object itself would fail before we could fix it.
    for path in (_REPO_ROOT, _TESTS_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    fn = _resolve(module_name, qualname)

    # Several ranks share few cores; letting each use every core only slows them all down.
    torch.set_num_threads(1)
    # The group timeout makes a collective give up if a peer vanished, rather than blocking for
    # the 30-minute default until the parent kills us.
    torch.distributed.init_process_group(
        backend='gloo',
        init_method=f'file://{init_file}',
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()
    # As the launcher's ranks do (torch_utils.distributed.exit_without_teardown): a rank that succeeded skips
    # the interpreter teardown, in which gloo's threads occasionally abort a finished process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; raise if any rank fails.

    `fn` must be a module-level function of an importable module (test modules under tests/
    qualify) and `args` must be picklable. An exception in any rank is re-raised here as
    torch.multiprocessing.ProcessRaisedException whose message contains that rank's traceback
    (ProcessExitedException for a crash without a Python exception); the other ranks are
    terminated. If the ranks have not all finished after `timeout` seconds they are killed and
    TimeoutError is raised.
    """
    module_name, qualname = fn.__module__, fn.__qualname__
    if module_name == '__main__' or '<locals>' in qualname:
        raise ValueError(f'spawn() needs a module-level function of an importable module: {module_name}.{qualname}')

    temp_dir = tempfile.mkdtemp(prefix='dist_utils_')
    init_file = os.path.join(temp_dir, 'rendezvous')
    context = None
    try:
        context = torch.multiprocessing.start_processes(
            _child_main,
            args=(module_name, qualname, world_size, init_file, timeout, args),
            nprocs=world_size,
            join=False,
            start_method='spawn',
        )
        deadline = time.monotonic() + timeout
        # join() returns False while some ranks are still running and raises as soon as one fails
        # (after terminating the rest); a short grace period lets survivors exit on their own.
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0), grace_period=2.0):
            if time.monotonic() >= deadline:
                running = [rank for rank, proc in enumerate(context.processes) if proc.is_alive()]
                raise TimeoutError(
                    f'spawn(): ranks {running} of {module_name}.{qualname} still running after {timeout} s'
                )
    finally:
        # Whatever happened (timeout, failure, KeyboardInterrupt), leave no orphan processes.
        if context is not None:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            # torch leaves a file behind for each rank that raised; the traceback is already read.
            for error_file in context.error_files:
                if os.path.exists(error_file):
                    os.remove(error_file)
        shutil.rmtree(temp_dir, ignore_errors=True)
