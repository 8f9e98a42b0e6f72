"""Everything the GPU path needs checked and measured, in one command, ending with one table.

    bash bench/gpu_acceptance.sh                 # on a GPU node: about 5-8 minutes on one GPU
    python bench/gpu_acceptance.py --out=acc     # the same; section logs go to acc/

Sections (each a subprocess with its own time limit, so one that hangs or crashes does not take the others
with it; its full output is kept in `<out>/<section>.log`):

1. environment: torch, CUDA, the GPU, nvcc;
2. plugin builds: bias_act and upfirdn2d, build time and whether the cache already held them;
3. parity probes: each plugin's self-check against the reference path (fp16 and fp32);
4. `pytest -m cuda`: pass/fail counts and the failures' names;
5. bench/ops.py: reference against kernel for each op and shape, forward and forward+backward, fp16/fp32;
6. bench/networks.py at paper256, batch 32, fp16 and bf16: G forward and G+D step, skip and squeeze r=8;
7. bench/train.py: the real loop at paper256, batch 32, fp16 and bf16: sec/kimg, peak memory and MFU (and
   the squeeze generator with each D regularizer, GGDR and GLeaD, against none);
8. torchrun: a tiny train.py run with `--nproc_per_node=1` over NCCL (and one with every GPU, if more).

Without a GPU the script says so, marks the GPU rows `not run (no GPU)` and runs the CPU parts at tiny sizes
(bench tables on the CPU, the torchrun run over gloo), so the script itself is tested by CI.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple, Optional

import click

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_GPU = 'not run (no GPU)'


class Row(NamedTuple):
    section:    str     # What was checked.
    status:     str     # ok, FAIL, timeout, or not run (why).
    seconds:    float   # Wall time of the section.
    detail:     str     # The numbers that matter, in one line.


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
                PYTHONUNBUFFERED='1')


def run_section(name: str, cmd: List[str], out_dir: str, timeout: float) -> tuple:
    """Run `cmd` in the repository root; (status, seconds, output). The output also goes to <out>/<name>.log."""
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        output, status = result.stdout + result.stderr, 'ok' if result.returncode == 0 else 'FAIL'
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')
        status = f'timeout ({timeout:.0f} s)'
    seconds = time.monotonic() - start
    with open(os.path.join(out_dir, f'{name}.log'), 'w') as f:
        f.write(' '.join(cmd) + '\n\n' + output)
    return status, seconds, output


def _python(*args: str) -> List[str]:
    return [sys.executable, *args]


ENVIRONMENT = r'''
import shutil, subprocess, torch
gpu = torch.cuda.is_available()
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count() if gpu else 0)
if gpu:
    print('GPU', torch.cuda.get_device_name(0), '| capability', torch.cuda.get_device_capability(0))
nvcc = shutil.which('nvcc')
print('nvcc', subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]
      if nvcc else 'not found')
'''

PLUGINS = r'''
import os, time, torch
from torch_utils.ops import bias_act, upfirdn2d
for name, module in (('bias_act', bias_act), ('upfirdn2d', upfirdn2d)):
    plugin = module._plugin
    cached = os.path.isdir(os.path.join(__import__('torch_utils.custom_ops', fromlist=['x']).get_plugin_dir(
        plugin.module_name, plugin.sources, plugin.headers, plugin.source_dir, **plugin.build_kwargs)))
    start = time.time()
    plugin.get()
    print(f'PLUGIN {name} {time.time() - start:.1f} {"hit" if cached else "built"}')
'''

PROBES = r'''
import torch
from torch_utils.ops import bias_act, dispatch, upfirdn2d
verdict = getattr(dispatch, 'kernel_verdict', None)
if verdict is None:
    raise SystemExit('this checkout has no parity probe (torch_utils.ops.dispatch.kernel_verdict)')
for name, module in (('bias_act', bias_act), ('upfirdn2d', upfirdn2d)):
    ok = verdict(module._plugin, torch.device('cuda', 0), strict=False)
    print(f'PROBE {name} {"ok" if ok else "MISMATCH"}')
'''


def _tail_table(output: str, first_word: str) -> str:
    """The lines of a bench table (from its header, which starts with `first_word`, to the end)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(first_word)]
    return '\n'.join(lines[starts[-1]:]) if starts else ''


def _pytest_counts(output: str) -> str:
    summary = [line for line in output.splitlines() if re.search(r'\d+ (passed|failed|skipped|error)', line)]
    failed = sorted(set(re.findall(r'^FAILED (\S+)', output, flags=re.M)))
    text = summary[-1].strip('= ') if summary else 'no summary'
    return text + (f'; failed: {", ".join(failed[:10])}' + (' ...' if len(failed) > 10 else '') if failed else '')


def _make_tiny_dataset(folder: str) -> str:
    sys.path.insert(0, REPO_ROOT)
    import numpy as np
    import PIL.Image
    images = os.path.join(folder, 'images')
    os.makedirs(images)
    rnd = np.random.RandomState(0)
    for i in range(16):
        PIL.Image.fromarray((rnd.rand(16, 16, 3) * 255).astype(np.uint8)).save(os.path.join(images, f'{i}.png'))
    return images


def sections(gpu: bool, num_gpus: int, out_dir: str, data: str) -> List[tuple]:
    """(name, command or None, timeout in seconds, how to summarize the output, why not run) for every row.
    The GPU time limits add up to more than 8 minutes only if sections hang; a healthy run takes about 5."""
    tiny_train = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map-depth=2', '--batch=8', '--metrics=none',
                  '--workers=0', '--kimg=0.016', '--tick=0.008', '--snap=1', '--aug=noaug', f'--data={data}']
    torchrun = _python('-m', 'torch.distributed.run', '--standalone')
    rows = [
        ('environment', _python('-c', ENVIRONMENT), 120, lambda out: ' | '.join(out.strip().splitlines()), None),
        ('plugin builds', _python('-c', PLUGINS) if gpu else None, 600,
         lambda out: ', '.join(' '.join(line.split()[1:2]) + f' {line.split()[2]} s ({line.split()[3]})'
                               for line in out.splitlines() if line.startswith('PLUGIN ')), NO_GPU),
        ('parity probes', _python('-c', PROBES) if gpu else None, 120,
         lambda out: ', '.join(' '.join(line.split()[1:]) for line in out.splitlines() if line.startswith('PROBE ')),
         NO_GPU),
        ('pytest -m cuda', _python('-m', 'pytest', '-m', 'cuda', '-q', '-p', 'no:cacheprovider', '-rf',
                                   'tests') if gpu else None, 900, _pytest_counts, NO_GPU),
    ]
    if gpu:
        rows += [
            ('bench/ops.py', _python('bench/ops.py', '--device=cuda'), 600, lambda out: 'table below', None),
            ('bench/networks.py fp16', _python('bench/networks.py', '--device=cuda', '--configs=paper256',
                                               '--batch=32', '--archs=skip,squeeze', '--squeeze-r=8'),
             600, lambda out: 'table below', None),
            ('bench/networks.py bf16', _python('bench/networks.py', '--device=cuda', '--configs=paper256',
                                               '--batch=32', '--archs=skip,squeeze', '--squeeze-r=8', '--bf16'),
             600, lambda out: 'table below', None),
            ('bench/train.py', _python('bench/train.py', '--device=cuda', '--configs=paper256', '--batch=32',
                                       '--archs=skip,squeeze-r8', '--precisions=fp16,bf16', '--steps=6'),
             900, lambda out: 'table below', None),
            ('bench/train.py regs', _python('bench/train.py', '--device=cuda', '--configs=paper256', '--batch=32',
                                            '--archs=squeeze-r8', '--regs=none,ggdr,glead', '--steps=6'),
             900, lambda out: 'table below', None),
            ('torchrun NCCL x1', [*torchrun, '--nproc_per_node=1', 'train.py', f'--outdir={out_dir}/runs-nccl1',
                                  *tiny_train], 600, lambda out: 'trained, exit 0', None),
        ]
        if num_gpus > 1:
            rows.append((f'torchrun NCCL x{num_gpus}', [*torchrun, f'--nproc_per_node={num_gpus}', 'train.py',
                                                        f'--outdir={out_dir}/runs-nccl{num_gpus}',
                                                        *tiny_train], 600, lambda out: 'trained, exit 0', None))
    else:
        rows += [
            ('bench/ops.py (CPU)', _python('bench/ops.py', '--device=cpu', '--batch=1', '--dtypes=fp32', '--iters=1',
                                           '--warmup=0', '--ops=bias_act'), 600, lambda out: 'table below', None),
            ('bench/networks.py (CPU)', _python('bench/networks.py', '--device=cpu', '--configs=tiny', '--iters=1',
                                                '--warmup=0', '--archs=skip,squeeze', '--squeeze-r=8'), 600,
             lambda out: 'table below', None),
            ('bench/train.py (CPU)', _python('bench/train.py', '--device=cpu', '--configs=tiny', '--steps=2',
                                             '--archs=skip,squeeze-r8', '--regs=none,ggdr,glead'), 600,
             lambda out: 'table below', None),
            ('torchrun gloo x1 (CPU)', [*torchrun, '--nproc_per_node=1', 'train.py', f'--outdir={out_dir}/runs-gloo',
                                        '--device=cpu', *tiny_train], 600, lambda out: 'trained, exit 0', None),
            ('torchrun NCCL', None, 0, None, NO_GPU),
        ]
    return rows


def print_table(rows: List[Row]) -> None:
    table = [('section', 'status', 'seconds', 'result')] + [
        (row.section, row.status, f'{row.seconds:.1f}' if row.seconds else '-', row.detail) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    for i, line in enumerate(table):
        print('  '.join(cell.ljust(w) for cell, w in zip(line[:3], widths, strict=True)) + '  ' + line[3])
        if i == 0:
            print('  '.join('-' * w for w in widths) + '  ' + '-' * 6)


@click.command()
@click.option('--out', 'out_dir', default=None, help='Folder for the section logs  [default: $OUT, else a temp dir]')
@click.option('--json', 'json_path', default=None, help='Also write the rows as JSON here')
def main(out_dir: Optional[str], json_path: Optional[str]) -> None:
    """Build, check and measure the GPU path; print one table (GPU rows marked when there is no GPU)."""
    import torch
    out_dir = out_dir or os.environ.get('OUT') or tempfile.mkdtemp(prefix='gpu-acceptance-')
    os.makedirs(out_dir, exist_ok=True)
    gpu = torch.cuda.is_available()
    num_gpus = torch.cuda.device_count() if gpu else 0
    print(f'GPU acceptance: {"%d GPU(s)" % num_gpus if gpu else "no GPU on this machine: GPU rows are not run, the CPU parts run at tiny sizes"}; logs in {out_dir}', flush=True)
    data_dir = tempfile.mkdtemp(prefix='gpu-acceptance-data-')
    rows: List[Row] = []
    tables = []
    try:
        data = _make_tiny_dataset(data_dir)
        for name, cmd, timeout, summarize, why_not in sections(gpu, num_gpus, out_dir, data):
            if cmd is None:
                rows.append(Row(name, why_not, 0.0, ''))
                continue
            print(f'... {name}', file=sys.stderr, flush=True)
            status, seconds, output = run_section(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-'), cmd, out_dir,
                                                  timeout)
            detail = _summarize(summarize, output) if status == 'ok' else _last_line(output)
            rows.append(Row(name, status, seconds, detail))
            if name.startswith('bench/') and status == 'ok':
                tables.append((name, _tail_table(output, 'config') or _tail_table(output, 'op') or output[-3000:]))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    for name, table in tables:
        print(f'\n{name}\n{table}')
    print()
    print_table(rows)
    if json_path:
        with open(json_path, 'w') as f:
            json.dump([row._asdict() for row in rows], f, indent=2)
    if any(row.status not in ('ok', NO_GPU) for row in rows):
        raise SystemExit(1)


def _summarize(summarize: Callable[[str], str], output: str) -> str:
    try:
        return summarize(output)
    except (IndexError, ValueError) as e:
        return f'(could not read the output: {e})'


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else '(no output)'


if __name__ == '__main__':
    main()
