"""bench/vs_official.py: two worker processes, each importing its own code base, alternated on the same shapes.
On CI the 'official' tree is this repository itself (its API is the official one), which checks the mechanism
and gives ratios near 1; with the official export at hand (the fetched mirror) it runs against it too."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'bench', 'vs_official.py')
OFFICIAL_MIRROR = '/work/.mirror/NVlabs+stylegan2-ada-pytorch/repo'


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)


def _check_rows(result, out, archs):
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [(row['arch'], row['case']) for row in rows] == [(arch, case) for arch in archs for case in ('G_eval', 'D')]
    for row in rows:
        assert row['ours_ms'] > 0 and row['official_ms'] > 0
        assert math.isclose(row['ratio'], row['ours_ms'] / row['official_ms'], rel_tol=1e-9)
    assert 'ours/official' in result.stdout and 'squeeze vs skip' in result.stdout


def test_two_workers_alternate_and_print_the_ratios(tmp_path):
    out = tmp_path / 'rows.json'
    result = _run([f'--official={REPO_ROOT}', '--configs=tiny', '--cases=G_eval,D', '--archs=skip,squeeze',
                   '--rounds=2', '--iters=1', '--warmup=0', '--threads=1', f'--json={out}'], tmp_path)
    _check_rows(result, out, ['skip', 'squeeze'])


@pytest.mark.skipif(not os.path.isdir(OFFICIAL_MIRROR), reason='needs the fetched NVlabs/stylegan2-ada-pytorch')
def test_against_the_official_export(tmp_path):
    export = tmp_path / 'official'
    export.mkdir()
    archive = subprocess.run(['git', f'--git-dir={OFFICIAL_MIRROR}', 'archive', 'HEAD'], capture_output=True,
                             check=True)
    subprocess.run(['tar', '-x', '-C', str(export)], input=archive.stdout, check=True)
    out = tmp_path / 'rows.json'
    result = _run([f'--official={export}', '--configs=tiny', '--cases=G_eval,D', '--archs=skip,squeeze',
                   '--rounds=1', '--iters=1', '--warmup=0', '--threads=1', f'--json={out}'], tmp_path)
    _check_rows(result, out, ['skip', 'squeeze'])


@pytest.mark.parametrize('args, message', [
    ([], '--official is required'),
    (['--official=/nonexistent'], 'holds no training/networks.py'),
    ([f'--official={REPO_ROOT}', '--cases=G_evil'], 'G_evil; valid choices'),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    result = _run(args, tmp_path)
    assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr, result.stderr
