"""torch_utils.misc: snapshot helpers, sampler, parameter copying, DDP helpers, module summary, seeding."""

import random
import re
import warnings

import numpy as np
import pytest
import torch
from dist_utils import spawn

from torch_utils import misc

# ----------------------------------------------------------------------------
# constant


def test_constant_values_shape_dtype_and_cache():
    misc.clear_constant_cache()
    a = misc.constant([1, 3, 3, 1])
    assert a.dtype == torch.float32 and a.tolist() == [1, 3, 3, 1]
    assert misc.constant([1, 3, 3, 1]) is a  # Same request, same tensor.
    assert misc.constant([1, 3, 3, 1], dtype=torch.float64) is not a
    assert misc.constant(np.float32([1, 3, 3, 1])) is not a  # Different source dtype: its own entry.
    b = misc.constant(0.5, shape=[2, 3])
    assert b.shape == (2, 3) and bool((b == 0.5).all()) and b.is_contiguous()
    c = misc.constant(np.arange(3), shape=[2, 3, 4, 3], memory_format=torch.channels_last)
    assert c.is_contiguous(memory_format=torch.channels_last) and c[1, 2, 3].tolist() == [0, 1, 2]
    misc.clear_constant_cache()
    assert misc.constant([1, 3, 3, 1]) is not a


# ----------------------------------------------------------------------------
# assert_shape, suppress_tracer_warnings


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, 3, 4])
    misc.assert_shape(x, [None, 3, None])
    with pytest.raises(AssertionError, match='dimension 1: got 3, expected 5'):
        misc.assert_shape(x, [2, 5, 4])
    with pytest.raises(AssertionError, match='number of dimensions'):
        misc.assert_shape(x, [2, 3])


def test_assert_shape_while_tracing():
    def fn(x):
        misc.assert_shape(x, [None, 3])
        misc.assert_shape(x, [x.shape[0], 3])
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter('error', category=torch.jit.TracerWarning)
        traced = torch.jit.trace(fn, torch.ones(2, 3))
    assert torch.equal(traced(torch.ones(4, 3)), torch.full([4, 3], 2.0))


def test_suppress_tracer_warnings_only_hides_tracer_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with misc.suppress_tracer_warnings():
            warnings.warn('traced', torch.jit.TracerWarning, stacklevel=1)
            warnings.warn('other', UserWarning, stacklevel=1)
        warnings.warn('traced after', torch.jit.TracerWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ['other', 'traced after']


# ----------------------------------------------------------------------------
# profiled_function


@misc.profiled_function
def _profiled_square(x):
    return x * x


def test_profiled_function_names_a_profiler_range():
    assert _profiled_square.__name__ == '_profiled_square'
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = _profiled_square(torch.full([3], 2.0))
    assert y.tolist() == [4.0, 4.0, 4.0]
    assert any(event.name == '_profiled_square' for event in prof.events())


# ----------------------------------------------------------------------------
# InfiniteSampler


def _take(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def test_infinite_sampler_epochs_are_permutations():
    data = range(10)
    stream = _take(misc.InfiniteSampler(data, seed=1), 30)
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != list(range(10)) and stream[:10] != stream[10:20]
    assert _take(misc.InfiniteSampler(data, seed=1), 30) == stream      # Deterministic...
    assert _take(misc.InfiniteSampler(data, seed=2), 30) != stream      # ...and seeded.
    assert _take(misc.InfiniteSampler(data, shuffle=False), 12) == list(range(10)) + [0, 1]


def test_infinite_sampler_ranks_split_the_global_stream():
    data = range(7)
    stream = _take(misc.InfiniteSampler(data, seed=3), 30)
    per_rank = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=3), 10) for r in range(3)]
    interleaved = [per_rank[i % 3][i // 3] for i in range(30)]
    assert interleaved == stream


def test_infinite_sampler_resumes_where_it_stopped():
    data = range(9)
    for num_replicas in [1, 2]:
        for rank in range(num_replicas):
            full = _take(misc.InfiniteSampler(data, rank=rank, num_replicas=num_replicas, seed=5), 40)
            consumed = 14  # Global count: 7 samples per rank when num_replicas is 2.
            resumed = _take(misc.InfiniteSampler(data, rank=rank, num_replicas=num_replicas, seed=5,
                                                 start_index=consumed), 20)
            assert resumed == full[consumed // num_replicas:][:20]


def test_infinite_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        misc.InfiniteSampler([])
    with pytest.raises(ValueError):
        misc.InfiniteSampler(range(3), rank=2, num_replicas=2)
    with pytest.raises(ValueError, match='start_index'):
        misc.InfiniteSampler(range(3), num_replicas=2, start_index=3)


def test_infinite_sampler_drives_a_dataloader():
    data = torch.arange(5).float()
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=misc.InfiniteSampler(data, seed=0))
    batches = [batch for batch, _ in zip(loader, range(5), strict=False)]
    values = torch.cat(batches).long().tolist()
    assert len(values) == 20 and sorted(values) == sorted(list(range(5)) * 4)


# ----------------------------------------------------------------------------
# Parameters and buffers


class _Small(torch.nn.Module):
    def __init__(self, width=3):
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)
        self.register_buffer('stat', torch.zeros(width))


def test_params_and_buffers_order():
    module = _Small()
    names = [name for name, _ in misc.named_params_and_buffers(module)]
    assert names == ['fc.weight', 'fc.bias', 'stat']
    assert [t.data_ptr() for t in misc.params_and_buffers(module)] == [module.fc.weight.data_ptr(),
                                                                        module.fc.bias.data_ptr(),
                                                                        module.stat.data_ptr()]


def test_copy_params_and_buffers_by_name():
    torch.manual_seed(0)
    src, dst = _Small(), _Small()
    src.stat.fill_(7)
    dst.fc.weight.requires_grad_(False)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.stat, src.stat)
    assert dst.fc.weight.data_ptr() != src.fc.weight.data_ptr()
    assert not dst.fc.weight.requires_grad and dst.fc.bias.requires_grad


def test_copy_params_and_buffers_partial_and_errors():
    src = torch.nn.Module()
    src.fc = torch.nn.Linear(3, 2)
    dst = _Small()
    before = dst.stat.clone()
    misc.copy_params_and_buffers(src, dst)  # 'stat' is missing from the source: kept.
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.stat, before)
    with pytest.raises(ValueError, match='stat'):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    with pytest.raises(ValueError, match='fc.weight'):
        misc.copy_params_and_buffers(_Small(width=4), _Small(width=3))


# ----------------------------------------------------------------------------
# DDP helpers, on two gloo ranks


def _ddp_sync_worker(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1, bias=False))
    x = torch.full([1, 2], float(rank + 1))
    with misc.ddp_sync(model, sync=False):
        model(x).sum().backward()
    assert model.module.weight.grad.tolist() == [[rank + 1.0, rank + 1.0]]  # Local gradient only.
    model.zero_grad()
    with misc.ddp_sync(model, sync=True):
        model(x).sum().backward()
    assert model.module.weight.grad.tolist() == [[1.5, 1.5]]  # Averaged over ranks: (1 + 2) / 2.


def test_ddp_sync():
    plain = torch.nn.Linear(1, 1)
    with misc.ddp_sync(plain, sync=False):  # Not DDP: a no-op.
        plain(torch.ones(1, 1)).sum().backward()
    spawn(_ddp_sync_worker, 2)


def _consistency_worker(rank, world_size):
    torch.manual_seed(0)
    module = _Small()
    misc.check_ddp_consistency(module)
    module.stat.fill_(float('nan'))  # NaN on every rank is consistent.
    misc.check_ddp_consistency(module)
    if rank == 1:
        with torch.no_grad():
            module.fc.bias.add_(1)
    # Every rank raises, and the rank that differs names the tensor.
    with pytest.raises(AssertionError, match=r'rank\(s\) \[1\]') as info:
        misc.check_ddp_consistency(module)
    assert ('_Small.fc.bias' in str(info.value)) == (rank == 1)
    assert '_Small.fc.weight' not in str(info.value)
    misc.check_ddp_consistency(module, ignore_regex=r'.*\.fc\.bias')


def test_check_ddp_consistency():
    misc.check_ddp_consistency(_Small())  # Without a process group: nothing to compare.
    spawn(_consistency_worker, 2)


# ----------------------------------------------------------------------------
# print_module_summary


def _table_rows(text):
    """Rows of the printed table keyed by their first cell; cells are separated by two or more spaces."""
    cells = [re.split(r'\s{2,}', line.strip()) for line in text.splitlines() if line.strip()]
    return {row[0]: row for row in cells}


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        self.register_buffer('scale', torch.ones(2))

    def forward(self, x):
        return self.body(x) * self.scale, x.sum()


def test_print_module_summary_table(capsys):
    module = _Nested()
    x = torch.randn(5, 4)
    outputs = misc.print_module_summary(module, [x])
    assert torch.equal(outputs[0], module(x)[0])
    text = capsys.readouterr().out
    rows = _table_rows(text)
    assert rows['body.0'][1:] == ['40', '-', '[5, 8]', 'float32']
    assert rows['body.2'][1:] == ['18', '-', '[5, 2]', 'float32']
    assert 'body.1' in rows                                   # ReLU makes a new tensor.
    assert 'body' not in rows                                 # Sequential only passes body.2's output on.
    assert rows['<top-level>'][1:] == ['-', '2', '[5, 2]', 'float32']
    assert rows['<top-level>:1'][1:] == ['[]', 'float32']
    assert rows['Total'][1:] == ['58', '2']


def test_print_module_summary_nesting_limit(capsys):
    misc.print_module_summary(_Nested(), [torch.randn(1, 4)], max_nesting=1)
    text = capsys.readouterr().out
    assert 'body.0' not in text and 'Total' in text
    rows = _table_rows(text)
    assert rows['Total'][1:] == ['58', '2']  # Folded rows still count toward the total.


# ----------------------------------------------------------------------------
# set_random_seed


def test_set_random_seed_reproduces_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand([]))
    misc.set_random_seed(123)
    first = draw()
    misc.set_random_seed(123)
    assert draw() == first
    misc.set_random_seed(124)
    assert draw() != first
