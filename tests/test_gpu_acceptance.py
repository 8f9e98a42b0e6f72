"""bench/gpu_acceptance.py without running its sections: which rows a machine with and without a GPU gets, that
every bench command it would run uses flags its script has, and the one summary table."""

import importlib.util
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relative_path):
    spec = importlib.util.spec_from_file_location(os.path.basename(relative_path)[:-3].replace('-', '_'),
                                                  os.path.join(REPO_ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def acceptance():
    return _load('bench/gpu_acceptance.py')


def test_without_a_gpu_the_gpu_rows_are_marked_and_the_cpu_parts_run(acceptance):
    rows = acceptance.sections(gpu=False, num_gpus=0, out_dir='/tmp/x', data='/tmp/data')
    not_run = [name for name, cmd, _timeout, _summarize, why in rows if cmd is None]
    assert not_run == ['plugin builds', 'parity probes', 'pytest -m cuda', 'torchrun NCCL']
    assert all(why == acceptance.NO_GPU for name, cmd, _t, _s, why in rows if cmd is None)
    assert any(name.startswith('bench/train.py') for name, cmd, *_ in rows if cmd is not None)


@pytest.mark.parametrize('gpu, num_gpus', [(False, 0), (True, 1), (True, 8)])
def test_every_bench_command_uses_existing_flags(acceptance, gpu, num_gpus):
    rows = acceptance.sections(gpu=gpu, num_gpus=num_gpus, out_dir='/tmp/x', data='/tmp/data')
    names = [name for name, *_ in rows]
    assert ('torchrun NCCL x8' in names) == (num_gpus == 8)
    for _name, cmd, *_ in rows:
        scripts = [arg for arg in (cmd or []) if arg.startswith('bench/') or arg == 'train.py']
        if not scripts:
            continue
        module = _load(scripts[0]) if scripts[0].startswith('bench/') else __import__('train')
        flags = {opt for param in module.main.params for opt in param.opts}
        for arg in cmd[cmd.index(scripts[0]) + 1:]:
            assert arg.split('=')[0] in flags, f'{scripts[0]} has no option {arg}'


def test_summaries_and_the_table(acceptance, capsys):
    output = 'x\nFAILED tests/test_a.py::test_b - AssertionError\n== 3 passed, 1 failed, 2 skipped in 4.0s ==\n'
    assert acceptance._pytest_counts(output) == '3 passed, 1 failed, 2 skipped in 4.0s; failed: tests/test_a.py::test_b'
    acceptance.print_table([acceptance.Row('environment', 'ok', 1.5, 'torch x'),
                            acceptance.Row('plugin builds', acceptance.NO_GPU, 0.0, '')])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['section', 'status', 'seconds', 'result']
    assert lines[2].split()[:3] == ['environment', 'ok', '1.5'] and 'not run (no GPU)' in lines[3]


def test_script_entry_point_is_the_python_file():
    with open(os.path.join(REPO_ROOT, 'bench', 'gpu_acceptance.sh')) as f:
        assert 'python bench/gpu_acceptance.py "$@"' in f.read()
