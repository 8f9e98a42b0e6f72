"""bench/compare_archs.py: the arch names become train.py flags that parse, the records of a run are read back
right, and the table's mean and spread are those of the values. (The script's real runs are the README's
comparison; here nothing is trained.)"""

import importlib
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import train
from bench import archs, compare_archs


@pytest.mark.parametrize('name, flags', [
    ('skip', ['--arch=skip']),
    ('resnet', ['--arch=resnet']),
    ('squeeze-r8', ['--arch=squeeze', '--squeeze-r=8']),
    ('squeeze-r16-excite', ['--arch=squeeze', '--squeeze-r=16', '--squeeze-torgb=excite']),
])
def test_arch_names_become_train_flags_that_parse(name, flags):
    assert compare_archs.arch_flags(name) == flags
    default_train_args = compare_archs.main.params[[p.name for p in compare_archs.main.params].index('train_args')]
    args = ['--outdir=out', '--data=data.zip', '--gpus=0', '--seed=1', '--kimg=4', '--metrics=none', *flags,
            *default_train_args.default.split()]
    with train.main.make_context('train.py', args) as context:
        assert context.params['arch'] == flags[0].split('=')[1]


@pytest.mark.parametrize('name', ['squeeze-8', 'squeeze-r8-rgb', 'Skip', ''])
def test_unknown_arch_names_are_refused_before_any_work(name, tmp_path):
    result = CliRunner().invoke(compare_archs.main, [f'--archs=skip,{name}x', '--data', str(tmp_path),
                                                     '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 2 and 'unknown arch' in result.output
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script, name', [('train', 'squeeze8'), ('train', 'squeeze-r8-excite'),
                                          ('networks', 'squeeze-8'), ('compare_archs', 'squeeze-r8-rgb')])
def test_every_bench_script_reads_arch_names_with_the_one_parser(script, name, tmp_path):
    # bench/archs.py: the same names and the same message everywhere, before any work.
    module = importlib.import_module(f'bench.{script}')
    extra = ['--data', str(tmp_path), '--outdir', str(tmp_path / 'out')] if script == 'compare_archs' else []
    result = CliRunner().invoke(module.main, [f'--archs=skip,{name}', *extra])
    assert result.exit_code == 2 and f'unknown arch "{name}"; use orig, skip, resnet, squeeze, squeeze-r<R>' in result.output, result.output
    assert archs.parse_arch('squeeze') == ('squeeze', None, None) and archs.parse_arch('squeeze-r4').r == 4
    assert archs.default_squeeze_r() == 8  # SPEC §1: r = --squeeze-r, default 8.
    assert not (tmp_path / 'out').exists()


def test_missing_data_is_refused(tmp_path):
    result = CliRunner().invoke(compare_archs.main, ['--data', str(tmp_path / 'none.zip'), '--outdir', str(tmp_path)])
    assert result.exit_code == 2 and 'does not exist' in result.output


def test_records_of_a_run_are_read_back(tmp_path):
    run_dir = tmp_path / '00000-run'
    run_dir.mkdir()
    ticks = [dict({'Timing/sec_per_kimg': dict(n=1, mean=100.0)}),  # Tick 0: start-up, excluded.
             dict({'Timing/sec_per_kimg': dict(n=1, mean=10.0), 'Resources/peak_gpu_mem_gb': dict(n=1, mean=3.0)}),
             dict({'Timing/sec_per_kimg': dict(n=1, mean=14.0), 'Resources/peak_gpu_mem_gb': dict(n=1, mean=2.0)})]
    (run_dir / 'stats.jsonl').write_text(''.join(json.dumps(t) + '\n' for t in ticks))
    assert compare_archs._stats(str(run_dir)) == dict(sec_per_kimg=12.0, peak_gpu_mem_gb=3.0)
    for name in ['network-snapshot-000002.pkl', 'network-snapshot-000004.pkl']:
        (run_dir / name).write_bytes(b'')
    snapshot = compare_archs._last_snapshot(str(run_dir))
    assert snapshot == str(run_dir / 'network-snapshot-000004.pkl')
    assert compare_archs._run_dir(str(tmp_path)) == str(run_dir)
    lines = [dict(results=dict(fid2k=50.0), snapshot_pkl='network-snapshot-000004.pkl'),
             dict(results=dict(fid2k=40.0), snapshot_pkl='network-snapshot-000002.pkl')]
    (run_dir / 'metric-fid2k.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    assert compare_archs._metric_value(str(run_dir), 'fid2k', snapshot) == 50.0
    assert compare_archs._metric_value(str(run_dir), 'kid2k', snapshot) is None


def test_table_mean_and_spread(capsys):
    values = dict(skip=[30.0, 34.0, 35.0], sq=[28.0, 29.0])
    records = [dict(arch=arch, seed=i, G_params=1000 + len(arch), sec_per_kimg=2.0 * (i + 1), peak_mem_gb=0.5 + i,
                    memory_kind='CPU RSS', metric='fid2k', value=v)
               for arch, vs in values.items() for i, v in enumerate(vs)]
    rows = compare_archs.summarize(records, ['skip', 'sq'])
    assert rows[0]['mean'] == pytest.approx(33.0) and rows[0]['std'] == pytest.approx(np.std(values['skip'], ddof=1))
    assert rows[1]['sec_per_kimg'] == pytest.approx(3.0) and rows[1]['peak_mem_gb'] == 1.5
    compare_archs.print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ['arch', 'G', 'params'] and set(out[1]) <= {'-', ' '}
    assert out[2].split()[0] == 'skip' and '30.00 / 34.00 / 35.00' in out[2] and '33.00' in out[2]
    assert out[3].split()[0] == 'sq' and '0.71' in out[3]


def test_help_ends_with_examples():
    text = CliRunner().invoke(compare_archs.main, ['--help']).output
    assert text.rstrip().endswith('--metric=fid50k_full') and '\n    python bench/compare_archs.py --data=' in text
    assert os.path.isfile(os.path.join(compare_archs.REPO_ROOT, 'train.py'))
