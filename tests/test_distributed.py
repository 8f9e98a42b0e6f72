"""torch_utils/distributed.py: torchrun and srun environments (SLURM by simulation), host lists, ports, the
device resolver, process groups (gloo with the timeout), spawn with a file rendezvous, get_rank / print0; and
train.py under a simulated srun step."""

import contextlib
import datetime
import io
import os
import socket
import subprocess
import sys

import pytest
import torch

import dnnlib
import train
from torch_utils import distributed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCHRUN = dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='node0', MASTER_PORT='29500')

# What srun sets for task 9 of a 16-task step on two of a job's four nodes (the job's own variables included).
SRUN_TASK = dict(SLURM_JOB_ID='123456', SLURM_JOB_NODELIST='gpu[001-004]', SLURM_NTASKS='16', SLURM_NNODES='2',
                 SLURM_STEP_ID='0', SLURM_STEP_NUM_TASKS='16', SLURM_STEP_NODELIST='gpu[003-004]',
                 SLURM_PROCID='9', SLURM_LOCALID='1', SLURM_NODEID='1', SLURMD_NODENAME='gpu004')
SRUN_PLACE = dict(rank=9, world_size=16, local_rank=1, master_addr='gpu003', master_port=20000 + 3456)

# What a batch script sees (sbatch --nodes=1 --ntasks=4): the job's task count and even rank 0, but no step.
BATCH_SCRIPT = dict(SLURM_JOB_ID='200505', SLURM_JOB_NODELIST='gnode[10,20,25,37]', SLURM_NODELIST='gnode10',
                    SLURM_NTASKS='4', SLURM_NPROCS='4', SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NODEID='0',
                    SLURM_TASKS_PER_NODE='1(x4)', SLURM_GTIDS='0')

# ----------------------------------------------------------------------------
# torchrun.


def test_torchrun_env_complete():
    assert distributed.torchrun_env(TORCHRUN) == dict(rank=3, world_size=8, local_rank=1, master_addr='node0',
                                                      master_port=29500)


def test_torchrun_env_absent():
    assert distributed.torchrun_env({}) is None
    # MASTER_ADDR and MASTER_PORT alone are often exported for other reasons.
    assert distributed.torchrun_env({'MASTER_ADDR': 'h', 'MASTER_PORT': '1234'}) is None


@pytest.mark.parametrize('env, message', [
    (dict(RANK='0', WORLD_SIZE='2'), 'Incomplete torchrun environment: LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set'),
    ({**TORCHRUN, 'MASTER_ADDR': ''}, 'Incomplete torchrun environment: MASTER_ADDR not set'),
    ({**TORCHRUN, 'WORLD_SIZE': 'eight'}, "WORLD_SIZE='eight' is not an integer"),
    ({**TORCHRUN, 'RANK': '8'}, 'Inconsistent torchrun environment: RANK=8, WORLD_SIZE=8'),
    ({**TORCHRUN, 'LOCAL_RANK': '-1'}, 'Inconsistent torchrun environment'),
])
def test_torchrun_env_incomplete_or_invalid(env, message):
    with pytest.raises(distributed.LaunchError, match=message) as info:
        distributed.torchrun_env(env)
    assert '\n' not in str(info.value)

# ----------------------------------------------------------------------------
# SLURM srun, by simulation.


def test_srun_task_maps_to_rank_world_size_local_rank_and_first_node():
    assert distributed.srun_env(SRUN_TASK) == SRUN_PLACE
    assert distributed.launch_env(SRUN_TASK) == SRUN_PLACE


def test_batch_script_is_one_process_that_spawns_its_own():
    # SLURM_NTASKS=4 and SLURM_PROCID=0 here describe the job, not this process: no step, no mapping.
    assert distributed.srun_env(BATCH_SCRIPT) is None
    assert distributed.launch_env(BATCH_SCRIPT) is None


def test_srun_step_of_one_task_is_not_mapped():
    # `srun --ntasks=1 python train.py --gpus=8`: the one task spawns its 8 ranks itself.
    env = {**SRUN_TASK, 'SLURM_STEP_NUM_TASKS': '1', 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
    assert distributed.launch_env(env) is None


def test_srun_falls_back_to_the_job_node_list():
    env = {name: value for name, value in SRUN_TASK.items() if name != 'SLURM_STEP_NODELIST'}
    assert distributed.srun_env(env)['master_addr'] == 'gpu001'


@pytest.mark.parametrize('nodelist, host', [
    ('gpu[003-005,010],cpu1', 'gpu003'),
    ('node7', 'node7'),
    ('a-[1-2]', 'a-1'),
    ('node7,node8', 'node7'),
    ('gpu[010,003-005]', 'gpu010'),  # The list's own order, not the smallest number.
    ('rack[2-3]-node[08-09],x', 'rack2-node08'),
    ('n[1-3]-ib', 'n1-ib'),
    ('localhost', 'localhost'),
])
def test_first_host_expands_the_host_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


@pytest.mark.parametrize('nodelist', ['', ',node1', 'gpu[', 'gpu]1', 'gpu[]', 'gpu[a-b]', 'gpu[1-]', 'gpu[[1]]'])
def test_first_host_refuses_what_it_cannot_read(nodelist):
    with pytest.raises(distributed.LaunchError, match='Cannot read the SLURM host list'):
        distributed.first_host(nodelist)


def test_port_from_the_environment_or_the_job_id():
    assert distributed.srun_port({'SLURM_JOB_ID': '123456'}) == 23456
    assert distributed.srun_port({'SLURM_JOB_ID': '7'}) == 20007
    # Every task of one job derives the same port, and a port below the ephemeral range.
    ports = {distributed.srun_port({'SLURM_JOB_ID': str(job)}) for job in range(10 ** 6, 10 ** 6 + 20000, 7)}
    assert min(ports) >= 20000 and max(ports) <= 29999
    assert distributed.srun_port({'SLURM_JOB_ID': '123456', 'MASTER_PORT': '31000'}) == 31000
    assert distributed.srun_env({**SRUN_TASK, 'MASTER_PORT': '31000'})['master_port'] == 31000
    with pytest.raises(distributed.LaunchError, match='neither MASTER_PORT nor SLURM_JOB_ID'):
        distributed.srun_port({})
    with pytest.raises(distributed.LaunchError, match='not a TCP port'):
        distributed.srun_port({'MASTER_PORT': '70000'})


@pytest.mark.parametrize('change, message', [
    (dict(SLURM_PROCID=None), 'Incomplete srun environment: SLURM_PROCID not set'),
    (dict(SLURM_LOCALID=None), 'Incomplete srun environment: SLURM_LOCALID not set'),
    (dict(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None), 'SLURM_STEP_NODELIST not set'),
    (dict(SLURM_JOB_ID=None), 'neither MASTER_PORT nor SLURM_JOB_ID'),
    (dict(SLURM_PROCID='16'), 'Inconsistent srun environment: SLURM_PROCID=16, SLURM_LOCALID=1, '
                              'SLURM_STEP_NUM_TASKS=16'),
    (dict(SLURM_LOCALID='-1'), 'Inconsistent srun environment'),
    (dict(SLURM_STEP_NUM_TASKS='many'), "SLURM_STEP_NUM_TASKS='many' is not an integer"),
    (dict(SLURM_STEP_NODELIST='gpu[003'), "Cannot read the SLURM host list 'gpu\\[003'"),
])
def test_srun_env_missing_or_inconsistent_is_one_line(change, message):
    env = {name: value for name, value in {**SRUN_TASK, **change}.items() if value is not None}
    with pytest.raises(distributed.LaunchError, match=message) as info:
        distributed.launch_env(env)
    assert '\n' not in str(info.value)


def test_torchrun_takes_precedence_over_srun():
    # torchrun started inside an srun step: its own variables place the process.
    assert distributed.launch_env({**SRUN_TASK, **TORCHRUN}) == distributed.torchrun_env(TORCHRUN)
    # ... and once torchrun's are there they must be complete, whatever SLURM says.
    with pytest.raises(distributed.LaunchError, match='Incomplete torchrun environment'):
        distributed.launch_env({**SRUN_TASK, 'RANK': '9'})


def test_init_method_env_under_torchrun_tcp_under_srun():
    assert distributed.launch_init_method(distributed.launch_env(TORCHRUN), TORCHRUN) == 'env://'
    assert distributed.launch_init_method(SRUN_PLACE, SRUN_TASK) == 'tcp://gpu003:23456'

# ----------------------------------------------------------------------------
# Devices.


def _outcome(**kwargs):
    try:
        return distributed.resolve_device(**kwargs)
    except distributed.LaunchError as e:
        return str(e)


def test_resolve_device():
    no_cuda, two_gpus = (lambda: 0), (lambda: 2)
    assert _outcome(gpus=0, count_devices=no_cuda) == dict(num_gpus=1, device_type='cpu')
    assert _outcome(gpus=3, device='cpu', count_devices=no_cuda) == dict(num_gpus=3, device_type='cpu')
    assert _outcome(gpus=2, count_devices=two_gpus) == dict(num_gpus=2, device_type='cuda')
    assert _outcome(gpus=4, probe_devices=False, count_devices=no_cuda) == dict(num_gpus=4, device_type='cuda')
    assert _outcome(gpus=1, count_devices=no_cuda, work='compute') == (
        '--gpus=1 asks for CUDA, but PyTorch sees no CUDA device; use --gpus=0 to compute in one CPU process, or '
        '--device=cpu to run 1 process(es) on the CPU')
    assert _outcome(gpus=3, count_devices=two_gpus).startswith('3 CUDA devices needed on this machine, but only 2')
    assert _outcome(gpus=0, device='cuda') == '--gpus=0 means one CPU process, which contradicts --device=cuda'
    assert _outcome(gpus=1, device='tpu') == "--device must be one of auto, cuda, cpu; got 'tpu'"
    assert _outcome(gpus=-1) == '--gpus must be at least 0, got -1'


def test_resolve_device_under_a_launcher():
    # The world size counts the processes of every node; the local rank needs a local GPU.
    assert _outcome(dist=SRUN_PLACE, count_devices=lambda: 2) == dict(num_gpus=16, device_type='cuda')
    assert _outcome(dist=SRUN_PLACE, device='cpu') == dict(num_gpus=16, device_type='cpu')
    assert 'disagrees with torchrun/srun (WORLD_SIZE=16)' in _outcome(gpus=8, dist=SRUN_PLACE)
    # A task that sees only its own GPU cannot use the one its local rank names.
    assert 'each must see all GPUs of its node' in _outcome(dist=SRUN_PLACE, count_devices=lambda: 1)

# ----------------------------------------------------------------------------
# Process groups.


@pytest.fixture
def recorded_group(monkeypatch):
    """torch.distributed.init_process_group / destroy_process_group replaced by recorders."""
    calls = []
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: calls.append(('init', kwargs)))
    monkeypatch.setattr(torch.distributed, 'destroy_process_group', lambda: calls.append(('destroy', None)))
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(('set_device', device)))
    return calls


def test_process_group_gloo_on_the_cpu_with_the_timeout(recorded_group):
    distributed.init_process_group(1, 2, torch.device('cpu'), 'file:///tmp/x')
    assert recorded_group == [('init', dict(backend='gloo', init_method='file:///tmp/x', rank=1, world_size=2,
                                            timeout=datetime.timedelta(minutes=15)))]


def test_process_group_nccl_on_cuda_after_choosing_the_device(recorded_group):
    distributed.init_process_group(0, 8, torch.device('cuda', 3), 'env://')
    assert recorded_group == [('set_device', torch.device('cuda', 3)),
                              ('init', dict(backend='nccl', init_method='env://', rank=0, world_size=8,
                                            timeout=distributed.PROCESS_GROUP_TIMEOUT))]


def _raise(*_args):
    raise RuntimeError('rank fails')


def test_spawned_rank_meets_through_the_file_and_always_leaves(recorded_group, tmp_path):
    threads = torch.get_num_threads()
    called = []
    try:
        distributed._SpawnedRank(lambda *args: called.append(args), 2, 'cpu', str(tmp_path))(1, 'x')
        with pytest.raises(RuntimeError, match='rank fails'):
            distributed._SpawnedRank(_raise, 2, 'cpu', str(tmp_path))(0)
    finally:
        torch.set_num_threads(threads)
    assert called == [(1, torch.device('cpu'), 'x')]
    init_file = os.path.join(str(tmp_path), distributed.INIT_FILE_NAME)
    assert [call[0] for call in recorded_group] == ['init', 'destroy', 'init', 'destroy']
    assert recorded_group[0][1]['init_method'] == f'file://{init_file}'
    assert recorded_group[0][1]['timeout'] == distributed.PROCESS_GROUP_TIMEOUT


def test_rank_and_print0_without_a_group(capsys):
    assert not torch.distributed.is_initialized()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    distributed.print0('only once')
    assert capsys.readouterr().out == 'only once\n'


def _gloo_worker(rank, device, out_dir):
    """Runs in each spawned process: the group is formed, print0 prints on rank 0 only."""
    assert device == torch.device('cpu')
    assert distributed.get_rank() == rank and distributed.get_world_size() == 2
    assert torch.distributed.get_backend() == 'gloo'
    total = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(total)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distributed.print0(f'sum {total.item():g}')
    with open(os.path.join(out_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(printed.getvalue())


def _failing_worker(rank, _device):
    if rank == 1:
        raise RuntimeError('rank 1 fails on purpose')
    torch.distributed.barrier()  # Rank 0 would wait here forever if spawn() did not end it.


@pytest.mark.usefixtures('one_thread')
def test_spawn_two_gloo_processes_through_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    rendezvous = [tmp_path / 'rendezvous0', tmp_path / 'rendezvous1']
    for folder in rendezvous:
        folder.mkdir()
    distributed.spawn(_gloo_worker, (str(tmp_path),), 2, 'cpu', str(rendezvous[0]))
    assert (tmp_path / 'rank0.txt').read_text() == 'sum 3\n'
    assert (tmp_path / 'rank1.txt').read_text() == ''
    # The failure ends both ranks instead of leaving rank 0 at the barrier. Which traceback comes back is a race:
    # rank 1's own error, or rank 0's barrier failing once rank 1 left the group.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match='in _failing_worker'):
        distributed.spawn(_failing_worker, (), 2, 'cpu', str(rendezvous[1]))

# ----------------------------------------------------------------------------
# train.py under a simulated srun step.


def _set_env(monkeypatch, env):
    for name in list(os.environ):
        if name.startswith('SLURM_') or name in distributed.TORCHRUN_VARS:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_train_dry_run_in_an_srun_step_uses_the_step(monkeypatch, tmp_path):
    from test_train_options import cli, stand_ins

    _set_env(monkeypatch, {**SRUN_TASK, 'SLURM_STEP_NUM_TASKS': '4', 'SLURM_PROCID': '0'})
    with stand_ins():
        result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run'])
        assert result.exit_code == 0, result.output
        assert '00000-fakedata-auto4' in result.output and '"num_gpus": 4' in result.output
        monkeypatch.setenv('SLURM_PROCID', '2')
        result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run'])
        assert result.exit_code == 0 and result.output == ''  # Only rank 0 prints.
        result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run', '--gpus=8'])
        assert result.exit_code != 0 and 'disagrees with torchrun/srun (WORLD_SIZE=4)' in result.output
        monkeypatch.delenv('SLURM_PROCID')
        result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run'])
        assert result.exit_code != 0
        assert result.output.strip().splitlines()[-1].startswith('Error: Incomplete srun environment: SLURM_PROCID')


def test_train_dry_run_in_a_batch_script_spawns_its_own(monkeypatch, tmp_path):
    from test_train_options import cli, stand_ins

    _set_env(monkeypatch, BATCH_SCRIPT)
    with stand_ins():
        result = cli(['--outdir', str(tmp_path), '--data=fakedata', '--device=cpu', '--dry-run', '--gpus=8'])
    assert result.exit_code == 0, result.output
    assert '00000-fakedata-auto8' in result.output and '"num_gpus": 8' in result.output


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _srun_task(procid, port, outdir):
    """What srun would start for task `procid` of a two-task step on this machine: SLURM variables only (no
    torchrun ones), then train.py's path for launched processes, with a stand-in training loop."""
    from test_train_options import _record_loop

    for name in distributed.TORCHRUN_VARS:
        os.environ.pop(name, None)
    os.environ.update(SLURM_JOB_ID='4242', SLURM_STEP_ID='0', SLURM_STEP_NUM_TASKS='2', SLURM_NTASKS='2',
                      SLURM_STEP_NODELIST='localhost', SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid),
                      MASTER_PORT=str(port))
    dist = train.distributed_env(os.environ)
    assert dist == dict(rank=procid, world_size=2, local_rank=procid, master_addr='localhost', master_port=port)
    args = dnnlib.EasyDict(num_gpus=2, random_seed=0)
    train.launch_torchrun(args, outdir, 'tiny', 'cpu', dist, loop=f'{_record_loop.__module__}._record_loop')


@pytest.mark.usefixtures('one_thread')
def test_srun_tasks_train_together(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    outdir = tmp_path / 'runs'
    torch.multiprocessing.spawn(_srun_task, args=(_free_port(), str(outdir)), nprocs=2)
    assert os.listdir(outdir) == ['00000-tiny']
    assert {'rank0.txt', 'rank1.txt', 'training_options.json'} <= set(os.listdir(outdir / '00000-tiny'))


def test_exit_without_teardown_keeps_the_output_and_the_status(tmp_path):
    # The output printed before it is flushed, the status is the one given, and nothing after it runs.
    code = ('import sys; from torch_utils import distributed; print("done", end=""); '
            'sys.stderr.write("err"); distributed.exit_without_teardown(75); print("never")')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT, env={**os.environ, 'PYTHONPATH': REPO_ROOT})
    assert (result.returncode, result.stdout, result.stderr) == (75, 'done', 'err')
