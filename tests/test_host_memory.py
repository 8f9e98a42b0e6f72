"""The scripts keep large freed blocks in the heap for reuse (runner/host_memory.py; issue 23)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

import calc_metrics
import generate
import projector
import runner.launch
import style_mixing
import train
from runner import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees a 64 MiB tensor, then prints what glibc's mallinfo2 says about the heap (arena:
# bytes obtained with brk; fordblks: free bytes kept in it; hblkhd: bytes in mmap-ed blocks).
_PROBE = textwrap.dedent('''
    import ctypes, json, torch
    from runner import host_memory
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                     'keepcost')]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    applied = host_memory.keep_freed_memory()
    x = torch.empty(16 * 2**20).fill_(1)
    held = libc.mallinfo2()
    del x
    freed = libc.mallinfo2()
    print(json.dumps(dict(applied=applied, mmapped_while_held=held.hblkhd, kept_after_free=freed.fordblks)))
''')


def _probe(choice):
    env = dict(os.environ, STYLEGAN_HOST_MALLOC=choice, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', _PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, 'confstr') or 'glibc' not in (os.confstr('CS_GNU_LIBC_VERSION') or ''),
                    reason='mallopt thresholds are glibc only')
def test_a_freed_large_tensor_stays_in_the_heap_for_the_next_one():
    block = 64 * 2**20
    kept, system = _probe('keep'), _probe('system')
    assert kept['applied'] and not system['applied']
    # keep: the block came from the heap and is still there after free, for the next tensor of that size.
    assert kept['mmapped_while_held'] < block and kept['kept_after_free'] >= block
    # system (glibc's default): a fresh mapping, unmapped on free; the next one is faulted in again.
    assert system['mmapped_while_held'] >= block and system['kept_after_free'] < block


def test_a_bad_choice_is_one_line_before_any_work(tmp_path):
    env = dict(os.environ, STYLEGAN_HOST_MALLOC='lots', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, 'calc_metrics.py', '--network', str(tmp_path / 'missing.pkl')],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: $STYLEGAN_HOST_MALLOC='lots' is not valid; use keep or system"), \
        result.stderr


class _Called(Exception):
    pass


def _record(calls):
    def keep_freed_memory():
        calls.append(True)
        raise _Called()
    return keep_freed_memory


@pytest.mark.parametrize('script, args', [
    (generate.main, ['--network', 'x.pkl', '--seeds', '0', '--outdir', 'out']),
    (style_mixing.main, ['--network', 'x.pkl', '--rows', '0', '--cols', '1', '--outdir', 'out']),
    (projector.main, ['--network', 'x.pkl', '--target', 'x.png', '--outdir', 'out']),
    (calc_metrics.main, ['--network', 'x.pkl']),
    (train.main, ['--outdir', 'out', '--data', 'x.zip']),
], ids=['generate', 'style_mixing', 'projector', 'calc_metrics', 'train'])
def test_every_script_sets_it_first(script, args, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(host_memory, 'keep_freed_memory', _record(calls))
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'x.png').write_bytes(b'')
    result = CliRunner().invoke(script, args)
    assert calls == [True] and isinstance(result.exception, _Called), result.output


def test_every_rank_sets_it(monkeypatch):
    # Spawned and torchrun ranks are fresh interpreters: the setting is made in each rank's entry.
    calls = []
    monkeypatch.setattr(host_memory, 'keep_freed_memory', _record(calls))
    with pytest.raises(_Called):
        runner.launch._run_rank(0, 1, dict(run_dir='unused'), None, 'unused')
    with pytest.raises(_Called):
        calc_metrics._run_rank(0, None, {}, None)
    assert calls == [True, True]
