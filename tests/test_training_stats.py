"""Tests for torch_utils.training_stats, single-process and across two gloo ranks."""

import json
import math
import time

import numpy as np
import pytest
import torch
from dist_utils import spawn

import dnnlib
from torch_utils import training_stats
from torch_utils.training_stats import Collector, report, report0


@pytest.fixture(autouse=True)
def _fresh_stats():
    # Every test starts from, and leaves behind, a freshly reset module.
    training_stats.reset()
    yield
    training_stats.reset()


def _check_moments(collector: Collector, name: str, samples) -> None:
    samples = np.asarray(samples, dtype=np.float64).ravel()
    assert collector.num(name) == samples.size
    assert collector.mean(name) == pytest.approx(samples.mean(), rel=1e-12, abs=1e-12)
    assert collector.std(name) == pytest.approx(samples.std(), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------
# Single process.


def test_moments_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(4, 5)).astype(np.float32)
    b = rng.normal(-1.0, 0.5, size=7)
    report('Loss/a', torch.from_numpy(a))
    report('Loss/a', torch.from_numpy(b))
    c = Collector()
    c.update()
    _check_moments(c, 'Loss/a', np.concatenate([a.astype(np.float64).ravel(), b]))
    assert c['Loss/a'] == c.mean('Loss/a')


def test_scalar_list_ndarray_and_tensor_inputs():
    report('x', 1)
    report('x', 2.5)
    report('x', [3, 4])
    report('x', np.array([[5.0], [6.0]]))
    report('x', torch.tensor(7, dtype=torch.int64))
    report('x', torch.tensor([8.0, 9.0], dtype=torch.float16))
    report('x', torch.ones(2, requires_grad=True) * 10)
    c = Collector()
    c.update()
    _check_moments(c, 'x', [1, 2.5, 3, 4, 5, 6, 7, 8, 9, 10, 10])


def test_report_returns_its_input():
    t = torch.randn(3, requires_grad=True)
    assert report('t', t) is t
    assert report0('t0', t) is t
    lst = [1, 2]
    assert report('l', lst) is lst
    assert report('s', 1.5) == 1.5


def test_nan_and_inf_are_ignored():
    report('v', torch.tensor([1.0, float('nan'), 3.0, float('inf'), -float('inf')]))
    report('only_nan', float('nan'))
    c = Collector()
    c.update()
    _check_moments(c, 'v', [1.0, 3.0])
    assert c.num('only_nan') == 0
    assert math.isnan(c.mean('only_nan')) and math.isnan(c.std('only_nan'))


def test_empty_report_registers_name():
    report('empty', [])
    report('empty_tensor', torch.zeros(0, 3))
    c = Collector()
    c.update()
    assert c.names() == ['empty', 'empty_tensor']
    assert c.num('empty') == 0 and math.isnan(c.mean('empty')) and math.isnan(c.std('empty'))


def test_single_sample_std_is_zero():
    report('one', 4.0)
    c = Collector()
    c.update()
    assert c.num('one') == 1 and c.mean('one') == 4.0 and c.std('one') == 0.0


def test_unknown_name_and_before_first_update():
    report('known', 1.0)
    c = Collector()
    assert c.names() == [] and c.num('known') == 0 and math.isnan(c['known'])
    c.update()
    assert c.num('unknown') == 0
    assert math.isnan(c.mean('unknown')) and math.isnan(c.std('unknown')) and math.isnan(c['unknown'])


def test_regex_filtering_uses_fullmatch():
    for name in ['Loss/G', 'Loss/D', 'Timing/tick', 'MyLoss/x']:
        report(name, 1.0)
    c = Collector(regex='Loss/.*')
    c.update()
    assert c.names() == ['Loss/D', 'Loss/G']
    assert c.num('Timing/tick') == 0 and c.num('MyLoss/x') == 0
    everything = Collector()
    everything.update()
    assert everything.names() == ['Loss/D', 'Loss/G', 'MyLoss/x', 'Timing/tick']


def test_update_reports_deltas_between_updates():
    c = Collector()
    report('x', [1.0, 2.0])
    c.update()
    _check_moments(c, 'x', [1.0, 2.0])
    report('x', [10.0, 20.0, 30.0])
    c.update()
    _check_moments(c, 'x', [10.0, 20.0, 30.0])
    report('y', 5.0)  # A name appearing only later starts from zero.
    c.update()
    assert c.names() == ['x', 'y']
    _check_moments(c, 'y', [5.0])


def test_keep_previous_true_and_false():
    keep, drop = Collector(keep_previous=True), Collector(keep_previous=False)
    report('x', [1.0, 3.0])
    keep.update()
    drop.update()
    keep.update()  # No new samples in this interval.
    drop.update()
    _check_moments(keep, 'x', [1.0, 3.0])
    assert drop.num('x') == 0 and math.isnan(drop.mean('x')) and drop.names() == ['x']
    report('x', 7.0)
    keep.update()
    drop.update()
    _check_moments(keep, 'x', [7.0])
    _check_moments(drop, 'x', [7.0])


def test_moments_are_the_raw_interval_totals_as_a_copy():
    c = Collector(regex='x', keep_previous=False)
    assert c.moments('x') is None  # Before the first update nothing is known.
    report('x', [1.0, -1.0, 3.0, float('nan')])  # The NaN is skipped, as by num/mean/std.
    report('unmatched', 5.0)
    c.update()
    moments = c.moments('x')
    assert moments.dtype == np.float64 and moments.tolist() == [3.0, 3.0, 11.0]
    assert c.moments('unmatched') is None
    moments += 100  # A copy: accumulating into it leaves the collector's numbers alone.
    assert c.moments('x').tolist() == [3.0, 3.0, 11.0] and c.num('x') == 3
    report('x', 2.0)
    c.update()
    assert c.moments('x').tolist() == [1.0, 2.0, 4.0]  # The new interval only.
    c.update()
    assert c.moments('x').tolist() == [0.0, 0.0, 0.0]  # keep_previous=False: an empty interval is zeros.


def test_independent_collectors():
    a, b = Collector(), Collector()
    report('x', 1.0)
    a.update()
    report('x', 2.0)
    a.update()
    b.update()  # b has not updated before, so it sees both samples.
    _check_moments(a, 'x', [2.0])
    _check_moments(b, 'x', [1.0, 2.0])


def test_reset_forgets_everything():
    c = Collector(keep_previous=False)
    report('x', [1.0, 2.0, 3.0])
    c.update()
    training_stats.init_multiprocessing(rank=1, sync_device=torch.device('cpu'))
    training_stats.reset()
    fresh = Collector()
    fresh.update()
    assert fresh.names() == []
    # The reset also restored rank 0, so report0 counts again.
    report0('r0', 2.0)
    report('x', 5.0)
    c.update()  # A collector from before the reset must not produce negative deltas.
    _check_moments(c, 'x', [5.0])
    fresh.update()
    _check_moments(fresh, 'r0', [2.0])


def test_report0_single_process_rank_nonzero():
    training_stats.init_multiprocessing(rank=3, sync_device=None)
    report0('r0', 1.0)
    c = Collector()
    c.update()  # sync_device=None: no torch.distributed calls even with rank 3.
    assert c.names() == ['r0'] and c.num('r0') == 0


def test_as_dict_structure_and_json():
    report('Loss/G', [1.0, 2.0])
    report('Loss/D', [])
    c = Collector()
    c.update()
    d = c.as_dict()
    assert isinstance(d, dnnlib.EasyDict) and isinstance(d['Loss/G'], dnnlib.EasyDict)
    assert sorted(d.keys()) == ['Loss/D', 'Loss/G']
    assert d['Loss/G'] == dict(num=2, mean=1.5, std=0.5)
    assert d['Loss/G'].num == 2 and type(d['Loss/G'].num) is int
    assert type(d['Loss/G'].mean) is float and type(d['Loss/G'].std) is float
    # stats.jsonl stores one such dict per line; json writes the empty stat's nan as NaN.
    line = json.dumps(dict(d, timestamp=time.time()))
    parsed = json.loads(line)
    assert parsed['Loss/G'] == {'num': 2, 'mean': 1.5, 'std': 0.5}
    assert parsed['Loss/D']['num'] == 0 and math.isnan(parsed['Loss/D']['mean'])


# ----------------------------------------------------------------------------
# Two processes on gloo. Workers run in fresh interpreters without pytest's assertion
# rewriting, so their asserts carry explicit messages.


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _worker_global_moments(rank: int, world_size: int) -> None:
    training_stats.init_multiprocessing(rank, torch.device('cpu'))
    per_rank = {0: [1.0, 2.0, 3.0], 1: [10.0, float('nan'), 20.0, 30.0, 40.0]}
    report('Loss/x', torch.tensor(per_rank[rank]))
    report0('Progress/p', 0.25 if rank == 0 else 99.0)
    report('Only/empty', [])
    c = Collector(keep_previous=False)
    c.update()

    union = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0])
    assert c.names() == ['Loss/x', 'Only/empty', 'Progress/p'], c.names()
    assert c.num('Loss/x') == 7, c.num('Loss/x')
    assert _close(c.mean('Loss/x'), union.mean()), c.mean('Loss/x')
    assert _close(c.std('Loss/x'), union.std()), c.std('Loss/x')
    assert c.num('Progress/p') == 1 and c.mean('Progress/p') == 0.25, c.as_dict()
    assert c.num('Only/empty') == 0, c.as_dict()

    # The second interval only contains new samples, again summed over both ranks.
    report('Loss/x', float(rank + 1))
    report0('Progress/p', [])
    report('Only/empty', [])
    c.update()
    assert c.num('Loss/x') == 2 and _close(c.mean('Loss/x'), 1.5) and _close(c.std('Loss/x'), 0.5), c.as_dict()
    assert c.num('Progress/p') == 0, c.as_dict()


def test_two_ranks_see_global_moments():
    spawn(_worker_global_moments, 2, timeout=60)


def _worker_mismatched_names(rank: int, world_size: int) -> None:
    training_stats.init_multiprocessing(rank, torch.device('cpu'))
    report('Loss/common', 1.0)
    if rank == 1:
        report('Loss/rank1_only', 2.0)  # Should have been report0-style on every rank.
    c = Collector()
    try:
        c.update()
    except RuntimeError as e:
        msg = str(e)
        assert 'Loss/rank1_only' in msg and 'rank 0' in msg, msg
        assert 'Loss/common' not in msg, msg
    else:
        raise AssertionError(f'rank {rank}: update() accepted mismatched names')

    # A regex that excludes the extra name makes the ranks agree again.
    agreeing = Collector(regex='Loss/common')
    agreeing.update()
    assert agreeing.num('Loss/common') == 2, agreeing.as_dict()


def test_two_ranks_mismatched_names_raise():
    spawn(_worker_mismatched_names, 2, timeout=60)


# ----------------------------------------------------------------------------
# The spawn helper itself: failures and hangs must surface instead of passing or blocking.


def _worker_rank1_fails(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError('deliberate failure on rank 1')


def _worker_rank1_hangs(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)


def test_spawn_propagates_rank_failure():
    with pytest.raises(Exception, match='deliberate failure on rank 1') as info:
        spawn(_worker_rank1_fails, 2, timeout=60)
    assert 'ValueError' in str(info.value)


def test_spawn_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match='still running'):
        spawn(_worker_rank1_hangs, 2, timeout=4)
    assert time.monotonic() - start < 30


def test_reset_values_forgets_values_and_keeps_the_process_setup():
    training_stats.init_multiprocessing(rank=3, sync_device=None)
    training_stats.report('Loss/x', [1.0, 2.0])
    training_stats.reset_values()
    assert training_stats._state.rank == 3  # The launcher's setup stays.
    training_stats.report('Loss/x', [5.0])
    collector = training_stats.Collector()
    collector.update()
    assert collector.num('Loss/x') == 1 and collector.mean('Loss/x') == 5.0  # Not the earlier run's values.
    training_stats.reset()
