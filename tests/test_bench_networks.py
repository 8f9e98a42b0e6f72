"""bench/networks.py: one quick run on the tiny config, and its MAC counts against the squeeze block's layer shapes."""

import importlib.util
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def bench():
    # bench/ is a folder of scripts, not a package: load the file as a module of its own name.
    spec = importlib.util.spec_from_file_location('bench_networks', os.path.join(REPO_ROOT, 'bench', 'networks.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_archs(bench):
    assert bench.parse_archs(['skip', 'squeeze'], [4, 8]) == [('skip', None), ('squeeze', 4), ('squeeze', 8)]
    assert bench.parse_archs(['squeeze-r8', 'squeeze-r8', 'orig'], [4]) == [('squeeze', 8), ('orig', None)]
    # One spelling (bench/archs.py, as in run names); the toRGB ablations are compare_archs.py's.
    for name in ['skp', 'squeeze8', 'squeeze-r0', 'squeeze-r8-excite']:
        with pytest.raises(ValueError, match=f'unknown arch "{name}"; use .*skip.*squeeze-r<R>$'):
            bench.parse_archs([name], [8])


def test_tiny_run(bench):
    archs = bench.parse_archs(['skip', 'squeeze'], [8, 16])
    # One thread: on a shared two-core machine, two threads next to another busy process can be 50x slower.
    rows, info = bench.run_benchmark(['tiny'], archs, device='cpu', batch=2, iters=1, warmup=0, mode='both',
                                     threads=1)
    assert info['threads'] == 1
    assert [(row['arch'], row['r']) for row in rows] == archs
    assert info['runs'] == {'tiny': dict(batch=2, iters=1, warmup=0)}
    for row in rows:
        assert row['config'] == 'tiny' and row['fwd_ms'] > 0 and row['train_ms'] > 0
        assert row['measured'] is not None, row['count_error']
        assert sum(row['measured_blocks'].values()) <= row['measured']
    skip = rows[0]
    assert skip['measured_ratio'] == skip['nominal_ratio'] == 1
    r8 = next(row for row in rows if row['r'] == 8)
    assert r8['measured_ratio'] < 1 and r8['nominal_ratio'] < 1
    assert r8['g_params'] < skip['g_params']
    table = bench.summary_table(rows).splitlines()
    assert len(table) == 2 + len(archs)
    assert [line.split()[1] for line in table[2:]] == ['skip', 'squeeze', 'squeeze']
    assert len(bench.block_table(rows).splitlines()) == 2 + len(archs)


def test_paper256_block_macs_follow_layer_shapes(bench):
    """b16 of paper256 (c_in = c = 512): the counts are what the layer shapes of SPEC §1 say.

    Stock block: conv0 (3x3, up) c_in -> c, conv1 (3x3) c -> c, toRGB (1x1) c -> 3. Squeeze block: conv0 as
    stock, squeeze (3x3) c -> q, toRGB q -> 3, excite (3x3) q -> c, blend (1x1) 2c -> c, q = c_in // r.
    Every layer also has an affine w -> (its input channels).
    """
    r, res, c, w = 8, 16, 512, 512
    c_in, q = c, c // r
    pixels = res * res
    counts = {}
    for arch, ratio in (('skip', None), ('squeeze', r)):
        G, _D = bench.build_networks('paper256', arch, ratio)
        counts[arch] = bench.count_macs(G)
        assert counts[arch]['measured'] is not None, counts[arch]['count_error']

    # Nominal (every conv at its output resolution): exactly the sum over the layers above.
    skip_nominal = pixels * (9 * c_in * c + 9 * c * c + 3 * c) + w * (c_in + c + c)
    squeeze_nominal = pixels * (9 * c_in * c + 9 * c * q + 3 * q + 9 * q * c + 2 * c * c) + w * (c_in + c + q + q + 2 * c)
    assert counts['skip']['nominal_blocks']['b16'] == skip_nominal
    assert counts['squeeze']['nominal_blocks']['b16'] == squeeze_nominal
    # (11 + 18/r) c^2 against 18 c^2 per pixel: about 26% fewer multiply-adds at r = 8 (toRGB and affines aside).
    assert squeeze_nominal / skip_nominal == pytest.approx((11 + 18 / r) / 18, abs=1e-3)
    assert 0.25 < 1 - squeeze_nominal / skip_nominal < 0.27

    # Measured: conv0, its FIR filter and the image upsampling are the same in both blocks however they are
    # implemented, so the difference is the full-resolution layers: squeeze + excite + blend + toRGB(q)
    # against conv1 + toRGB(c). The affines' share (w * (c + 2q), well under 0.1%) is within the tolerance.
    skip_measured = counts['skip']['measured_blocks']['b16']
    squeeze_measured = counts['squeeze']['measured_blocks']['b16']
    expected_difference = pixels * (9 * c * q + 9 * q * c + 2 * c * c + 3 * q - 9 * c * c - 3 * c)
    assert squeeze_measured - skip_measured == pytest.approx(expected_difference, abs=1e-3 * skip_measured)
    assert squeeze_measured < skip_measured
    assert counts['squeeze']['measured'] < counts['skip']['measured']
