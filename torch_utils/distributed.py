"""One launcher for every script: how a process learns its place in a group, and how the group forms.

A run has `world_size` processes; each knows its `rank` (0 .. world_size - 1) and its `local_rank` (its index
on its own machine, which picks its CUDA device). Three ways to start them:

- spawned here (`spawn`, `start`): the launching process starts them with torch.multiprocessing and they meet
  through a file in a directory the caller owns, so two runs on one machine never compete for a port;
- torchrun: it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (`torchrun_env`) and the group
  forms through `env://`, which also uses the store torchrun's agent may already serve;
- SLURM `srun` with one task per GPU (`srun_env`): srun sets, for every task of a job step, SLURM_STEP_ID,
  SLURM_STEP_NUM_TASKS (tasks in the step), SLURM_STEP_NODELIST (nodes of the step), SLURM_PROCID (the task's
  rank in the step) and SLURM_LOCALID (its index on its node). These map to WORLD_SIZE = SLURM_STEP_NUM_TASKS,
  RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of SLURM_STEP_NODELIST
  (SLURM_JOB_NODELIST where the step list is missing), where srun's default distributions place task 0, and
  the group forms through `tcp://MASTER_ADDR:MASTER_PORT`.

When SLURM variables count. Only a task of an `srun` step with more than one task is mapped: the rule is
SLURM_STEP_NUM_TASKS > 1. A batch script sees SLURM_NTASKS (the tasks of the *job*), SLURM_JOB_NODELIST and
even SLURM_PROCID=0 and SLURM_LOCALID=0, but no SLURM_STEP_NUM_TASKS, so `python train.py --gpus=8` in an sbatch
script (or an salloc shell, or `srun --ntasks=1 python train.py --gpus=8`) is one process that spawns its 8
ranks as on any machine; SLURM_NTASKS is never read for that reason. torchrun's variables take precedence:
once RANK, WORLD_SIZE or LOCAL_RANK is set, torchrun started this process (it may itself run under srun). One
look-alike remains: a shell that `srun --ntasks=N --pty bash` started carries that step's variables, so a run
started from it is taken for task SLURM_PROCID of N; open such shells with one task.

MASTER_PORT under srun: MASTER_PORT from the environment if set, else SRUN_PORT_BASE + SLURM_JOB_ID modulo
SRUN_PORT_SPAN (20000 .. 29999). Every task of a job computes the same port without talking to the others;
the range lies below Linux's ephemeral ports (32768 and up), so outgoing connections do not take it. Two jobs
whose IDs agree modulo 10000 and share their first node, or two multi-task steps of one job running at once,
would meet at the same port: set MASTER_PORT for them. Host lists are expanded here (`first_host`), without
calling `scontrol`. A variable that is missing or does not fit the others is one LaunchError line.

Every process group has a timeout (PROCESS_GROUP_TIMEOUT): gloo on the CPU, NCCL on CUDA. `get_rank`,
`get_world_size` and `print0` work with and without an initialized group (rank 0 of 1 without).
"""

import datetime
import os
import re
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

import dnnlib

__all__ = ['DEVICES', 'PROCESS_GROUP_TIMEOUT', 'LaunchError', 'torchrun_env', 'srun_env', 'launch_env',
           'first_host', 'srun_port', 'launch_init_method', 'check_request', 'resolve_device',
           'cuda_device_count', 'rank_device', 'init_process_group', 'spawn', 'start', 'exit_without_teardown',
           'get_rank', 'get_world_size', 'print0']

# Where the processes of a run may go: `auto` is CUDA when asked for GPUs, `cpu` runs them all on the CPU.
DEVICES = ('auto', 'cuda', 'cpu')

# A collective that waits longer than this ends the process group (and so the run) instead of hanging.
# It must cover the longest stretch one rank may spend alone: writing a snapshot, a slow data-loader start.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=15)

TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
SRUN_VARS = ('SLURM_STEP_NUM_TASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
# The node lists an srun task may see, best first: the step's own nodes, then the job's.
SRUN_NODELIST_VARS = ('SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_NODELIST')
SRUN_PORT_BASE = 20000
SRUN_PORT_SPAN = 10000

# The file through which spawned ranks meet, inside the directory the caller of spawn()/start() owns.
INIT_FILE_NAME = '.torch_distributed_init'


class LaunchError(ValueError):
    """The environment or the request cannot start a run; the message is one line for the user."""

# ----------------------------------------------------------------------------
# Which launcher started this process.


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f'Environment variable {name}={environ[name]!r} is not an integer') from None


def torchrun_env(environ: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The torchrun rendezvous described by `environ`, or None when this process was not started that way.

    Returns dict(rank, world_size, local_rank, master_addr, master_port). MASTER_ADDR / MASTER_PORT alone do
    not count (they are often exported for other reasons); once RANK, WORLD_SIZE or LOCAL_RANK is set, all
    five variables must be present and valid.
    """
    if not any(name in environ for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')):
        return None
    missing = [name for name in TORCHRUN_VARS if not environ.get(name)]
    if missing:
        raise LaunchError(f'Incomplete torchrun environment: {", ".join(missing)} not set (a distributed run '
                          f'needs all of {", ".join(TORCHRUN_VARS)})')
    rank, world_size, local_rank, port = (_int_var(environ, name) for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK',
                                                                               'MASTER_PORT'))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(f'Inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, '
                          f'LOCAL_RANK={local_rank}')
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=environ['MASTER_ADDR'],
                master_port=port)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[003-005,010],cpu1' -> 'gpu003', 'node7' -> 'node7',
    'a-[1-2]' -> 'a-1', 'r[1-2]-n[08-09]' -> 'r1-n08'. Zero padding is kept, as SLURM names the nodes."""
    text = nodelist.strip()
    parts, pos, end = [], 0, len(text)
    # The first entry ends at the first comma outside brackets; each bracket contributes its first number.
    for match in re.finditer(r'\[([^\[\]]*)\]|[\[\],]', text):
        if match.group(0) == ',':
            end = match.start()
            break
        first = re.fullmatch(r'(\d+)(-\d+)?(,\d+(-\d+)?)*', match.group(1) or '')
        if first is None:
            raise LaunchError(f'Cannot read the SLURM host list {nodelist!r}')
        parts += [text[pos:match.start()], first.group(1)]
        pos = match.end()
    host = ''.join(parts) + text[pos:end]
    if not host:
        raise LaunchError(f'Cannot read the SLURM host list {nodelist!r}')
    return host


def srun_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else the port every task of the job derives from SLURM_JOB_ID (module docstring)."""
    if environ.get('MASTER_PORT'):
        port = _int_var(environ, 'MASTER_PORT')
    elif environ.get('SLURM_JOB_ID'):
        port = SRUN_PORT_BASE + _int_var(environ, 'SLURM_JOB_ID') % SRUN_PORT_SPAN
    else:
        raise LaunchError('Incomplete srun environment: neither MASTER_PORT nor SLURM_JOB_ID is set, so the tasks '
                          'cannot agree on a port; set MASTER_PORT')
    if not 0 < port < 65536:
        raise LaunchError(f'MASTER_PORT={port} is not a TCP port')
    return port


def srun_env(environ: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The rendezvous of one task of a multi-task `srun` step, as torchrun_env() returns it, or None when this
    process is not such a task (no SLURM_STEP_NUM_TASKS, or a step of one task). See the module docstring."""
    if not environ.get('SLURM_STEP_NUM_TASKS') or _int_var(environ, 'SLURM_STEP_NUM_TASKS') <= 1:
        return None
    nodelist = next((environ[name] for name in SRUN_NODELIST_VARS if environ.get(name)), None)
    missing = [name for name in SRUN_VARS if not environ.get(name)] + ([] if nodelist else ['SLURM_STEP_NODELIST'])
    if missing:
        raise LaunchError(f'Incomplete srun environment: {", ".join(missing)} not set (a task of an srun step '
                          f'needs all of {", ".join(SRUN_VARS)} and SLURM_STEP_NODELIST or SLURM_JOB_NODELIST)')
    world_size, rank, local_rank = (_int_var(environ, name) for name in SRUN_VARS)
    if not 0 <= rank < world_size or not 0 <= local_rank < world_size:
        raise LaunchError(f'Inconsistent srun environment: SLURM_PROCID={rank}, SLURM_LOCALID={local_rank}, '
                          f'SLURM_STEP_NUM_TASKS={world_size}')
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=first_host(nodelist),
                master_port=srun_port(environ))


def launch_env(environ: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """dict(rank, world_size, local_rank, master_addr, master_port) when torchrun or an srun step started this
    process (torchrun first), or None for a process that starts its ranks itself."""
    dist = torchrun_env(environ)
    return dist if dist is not None else srun_env(environ)


def launch_init_method(dist: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The init_method of a process that `launch_env(environ)` (= `dist`) placed: `env://` under torchrun,
    whose agent may serve the store at MASTER_PORT itself; the mapped address under srun."""
    if torchrun_env(environ) is not None:
        return 'env://'
    return f'tcp://{dist["master_addr"]}:{dist["master_port"]}'

# ----------------------------------------------------------------------------
# Devices.


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_request(gpus: int, device: str) -> None:
    """The checks of --gpus and --device that need no machine: a valid device name, a count of at least 0."""
    if device not in DEVICES:
        raise LaunchError(f'--device must be one of {", ".join(DEVICES)}; got {device!r}')
    if gpus < 0:
        raise LaunchError(f'--gpus must be at least 0, got {gpus}')


def resolve_device(
    gpus:           Optional[int] = None,               # --gpus: processes; None = 1, 0 = one CPU process.
    device:         Optional[str] = None,               # --device: auto, cuda or cpu; None = auto.
    dist:           Optional[Mapping[str, Any]] = None, # launch_env() of a process torchrun or srun started.
    probe_devices:  bool = True,                        # Check that the CUDA devices exist (False: a dry run).
    count_devices:  Callable[[], int] = cuda_device_count, # CUDA devices this process sees (tests replace it).
    work:           str = 'train',                      # The verb of the messages: "to <work> in one CPU process".
) -> dnnlib.EasyDict:
    """How many processes run and on what: EasyDict(num_gpus, device_type). Raises LaunchError on a mismatch.

    `num_gpus` keeps the official name but counts processes, whatever their device. Under torchrun or srun the
    launcher's world size decides, and each process needs the CUDA device of its local rank. Without
    `probe_devices`, a CUDA request is taken at its word: a login node without GPUs can prepare a GPU job. A
    CUDA request on a machine without CUDA is an error naming the way out; it never falls back to the CPU.
    """
    device = device or 'auto'
    check_request(0 if gpus is None else gpus, device)
    if dist is not None:
        if gpus is not None and gpus != dist['world_size']:
            raise LaunchError(f'--gpus={gpus} disagrees with torchrun/srun (WORLD_SIZE={dist["world_size"]}); leave '
                              f'--gpus out when torchrun or srun starts the processes')
        num_gpus, local_needed = dist['world_size'], dist['local_rank'] + 1
    else:
        gpus = 1 if gpus is None else gpus
        if gpus == 0:
            if device == 'cuda':
                raise LaunchError('--gpus=0 means one CPU process, which contradicts --device=cuda')
            return dnnlib.EasyDict(num_gpus=1, device_type='cpu')
        num_gpus = local_needed = gpus
    if device == 'cpu':
        return dnnlib.EasyDict(num_gpus=num_gpus, device_type='cpu')
    if probe_devices:
        _check_cuda_devices(num_gpus, local_needed, device, dist is not None, count_devices(), work)
    return dnnlib.EasyDict(num_gpus=num_gpus, device_type='cuda')


def _check_cuda_devices(num_gpus: int, local_needed: int, device: str, launched: bool, visible: int,
                        work: str) -> None:
    if visible == 0:
        if device == 'cuda':
            raise LaunchError('--device=cuda, but PyTorch sees no CUDA device')
        request = f'WORLD_SIZE={num_gpus} (torchrun/srun)' if launched else f'--gpus={num_gpus}'
        raise LaunchError(f'{request} asks for CUDA, but PyTorch sees no CUDA device; use --gpus=0 to {work} in one '
                          f'CPU process, or --device=cpu to run {num_gpus} process(es) on the CPU')
    if local_needed > visible:
        # Under a launcher the count is not ours to lower, but a task that sees only its own GPU is the usual cause.
        hint = ('every process of a torchrun/srun launch uses the GPU numbered by its local rank, so each must see '
                'all GPUs of its node') if launched else 'lower --gpus (any count works)'
        raise LaunchError(f'{local_needed} CUDA devices needed on this machine, but only {visible} visible; {hint}')


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device of the process with this local rank: its own GPU, or the CPU it shares with the others."""
    return torch.device('cuda', local_rank) if device_type == 'cuda' else torch.device('cpu')

# ----------------------------------------------------------------------------
# Process groups.


def init_process_group(
    rank:           int,                                # This process's rank.
    world_size:     int,                                # Number of processes in the group.
    device:         torch.device,                       # rank_device() of this process.
    init_method:    str,                                # file://..., env:// or tcp://host:port.
    timeout:        datetime.timedelta = PROCESS_GROUP_TIMEOUT, # A collective waiting longer fails the group.
) -> None:
    """Join the group: NCCL for a CUDA device (made the current one first, so NCCL binds the right GPU), gloo
    on the CPU."""
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo',
                                         init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return torch.distributed.get_rank() if _group_ready() else 0


def get_world_size() -> int:
    """The size of the default group; 1 without one."""
    return torch.distributed.get_world_size() if _group_ready() else 1


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so that N processes do not print every line N times."""
    if get_rank() == 0:
        print(*args, **kwargs)

# ----------------------------------------------------------------------------
# Spawning the ranks here.


def exit_without_teardown(code: int = 0):
    """End this process now with `code`, skipping the interpreter's teardown. Only for a rank whose work is
    done, whose files are closed and whose process group is destroyed: in that teardown gloo's worker threads
    occasionally end the process with std::terminate ("terminate called without an active exception",
    SIGABRT) after a run that finished well, and the launcher (torch.multiprocessing, torchrun) then reports a
    failed rank. Seen on the CPU under load, about once in twenty two-process runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _SpawnedRank:
    """What each spawned process runs: join the group through the file, call `fn(rank, device, *args)`, leave
    the group whatever happens. An object rather than a closure, because the spawn start method pickles it.
    With `exit_when_done` (start() sets it; only in a process of its own) a rank that succeeded ends through
    exit_without_teardown()."""

    def __init__(self, fn: Callable[..., Any], world_size: int, device_type: str, rendezvous_dir: str,
                 exit_when_done: bool = False):
        self.fn = fn
        self.world_size = world_size
        self.device_type = device_type
        self.init_file = os.path.abspath(os.path.join(rendezvous_dir, INIT_FILE_NAME))
        self.exit_when_done = exit_when_done

    def __call__(self, rank: int, *args: Any) -> None:
        device = rank_device(self.device_type, rank)
        if device.type == 'cpu' and not os.environ.get('OMP_NUM_THREADS'):
            # CPU ranks share the cores; each using all of them only slows every one down. An explicit
            # OMP_NUM_THREADS wins, as under torchrun (which sets it to 1), so both launches compute alike.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        init_process_group(rank, self.world_size, device, f'file://{self.init_file}')
        try:
            self.fn(rank, device, *args)
        finally:
            torch.distributed.destroy_process_group()
        if self.exit_when_done:
            exit_without_teardown(0)


def start(
    fn:             Callable[..., Any],                 # Module-level function, called as fn(rank, device, *args).
    args:           Sequence[Any],                      # Its further arguments (pickled to every process).
    nprocs:         int,                                # Processes to start, one per local device.
    device_type:    str,                                # 'cuda' (process r on cuda:r, NCCL) or 'cpu' (gloo).
    rendezvous_dir: str,                                # Fresh directory for the rendezvous file; the caller's.
) -> Any:
    """Start `fn` on `nprocs` new processes in one group without waiting: returns torch.multiprocessing's
    ProcessContext, whose join() the caller loops on (for example while it forwards signals to the ranks).

    The ranks meet through a file in `rendezvous_dir`, not a TCP port, so parallel runs cannot collide; the
    caller owns the directory, which is also where the ranks can leave files for it (results, errors).
    """
    rank_fn = _SpawnedRank(fn, nprocs, device_type, rendezvous_dir, exit_when_done=True)
    return torch.multiprocessing.spawn(fn=rank_fn, args=tuple(args), nprocs=nprocs, join=False)


def spawn(fn: Callable[..., Any], args: Sequence[Any], nprocs: int, device_type: str, rendezvous_dir: str) -> None:
    """start() and wait for all the processes (the arguments are start()'s). If one fails, the others are ended
    and torch.multiprocessing's ProcessRaisedException / ProcessExitedException is raised here."""
    context = start(fn, args, nprocs, device_type, rendezvous_dir)
    while not context.join():
        pass
