"""Divergence and a full disk stop a run with one line, and what was saved before stays intact: the rules of
training.health.DivergenceMonitor as closed cases, then tiny training runs with a forced loss explosion,
non-finite gradients, non-finite weights and an injected ENOSPC."""

import collections
import copy
import errno
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import test_train_e2e
import torch
from test_dnnlib import disk_full_open
from test_training_loop import BATCH, _train, make_image_folder

from dnnlib import util
from torch_utils import training_stats
from training import checkpoint, health, loss, networks, preemption, run_files, snapshot_io
from training.loss import StyleGAN2Loss
from training.training_loop import TrainingDiverged, TrainingStopped

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))

# ----------------------------------------------------------------------------
# The rules.


def _tick(g_loss=0.7, d_loss=1.3, num=8, **grad_flags):
    """One tick's statistics as Collector.as_dict() gives them; grad_flags: phase=(bad runs, runs)."""
    stats = {'Loss/G/loss': dict(num=num, mean=g_loss, std=0.1), 'Loss/D/loss': dict(num=num, mean=d_loss, std=0.1)}
    for phase, (bad, runs) in grad_flags.items():
        stats[health.nonfinite_grads_name(phase)] = dict(num=runs, mean=bad / runs, std=0.0)
    return stats


def _steady_ticks(count, seed=0):
    # Every watched statistic wandering over the range healthy GAN training shows: softplus losses of order
    # 0.1-10, D logits of order 1-100 (an overfitting D), G's output within a few units of [-1, 1], the R1 term
    # of order 0.001-10 (with gammas up to 100).
    rnd = np.random.RandomState(seed)
    ticks = []
    for _ in range(count):
        stats = _tick(g_loss=float(rnd.uniform(0.1, 10)), d_loss=float(rnd.uniform(0.1, 10)), Gmain=(0, 8),
                      Dmain=(0, 8))
        for name in ('Loss/scores/fake', 'Loss/scores/real', 'Health/end/D/scores'):
            stats[name] = dict(num=8, mean=float(rnd.uniform(-100, 100)), std=float(rnd.uniform(0, 50)))
        for name in ('Health/G/img_absmax', 'Health/end/G/img_absmax', 'Health/end/G_ema/img_absmax'):
            stats[name] = dict(num=8, mean=float(rnd.uniform(0.5, 8)), std=float(rnd.uniform(0, 2)))
        stats['Loss/r1_penalty'] = dict(num=8, mean=float(rnd.uniform(0.001, 100)), std=float(rnd.uniform(0, 10)))
        stats['Loss/D/reg'] = dict(num=8, mean=float(rnd.uniform(0.001, 10)), std=float(rnd.uniform(0, 10)))
        ticks.append(stats)
    return ticks


def test_steady_statistics_never_trigger():
    monitor = health.DivergenceMonitor()
    ticks = _steady_ticks(200)
    assert set(ticks[0]) >= set(health.CEILINGS)  # Every ceiling is exercised.
    assert [monitor.check(stats) for stats in ticks] == [None] * 200
    assert len(monitor.history['Loss/G/loss']) == 8  # The window keeps the newest ticks.


def test_the_monitor_watches_every_ceiling_and_the_collector_reads_them():
    # The names the loss and the loop report, as the regex of the monitor's Collector sees them.
    names = ['Loss/G/loss', 'Loss/D/loss', 'Loss/scores/fake', 'Loss/scores/real', 'Loss/r1_penalty', 'Loss/D/reg',
             'Health/G/img_absmax', 'Health/end/G/img_absmax', 'Health/end/G_ema/img_absmax',
             'Health/end/D/scores', 'Health/Dmain/nonfinite_grads']
    assert set(health.CEILINGS) == set(names[:-1])
    assert all(re.fullmatch(health.STATS_REGEX, name) for name in names)
    assert not re.fullmatch(health.STATS_REGEX, 'Loss/signs/real')


@pytest.mark.parametrize('name', sorted(health.CEILINGS))
@pytest.mark.parametrize('sign', [1, -1])
def test_each_ceiling_fires_from_the_first_tick_just_above_its_value(name, sign):
    # Closed form: mean 0.6 c and std 0.8 c give a root mean square of exactly c (3-4-5), which is allowed;
    # 0.1 % more std is over. The mean's sign does not matter (D's logits explode to both sides).
    ceiling = health.CEILINGS[name]
    at = _tick()
    at[name] = dict(num=8, mean=sign * 0.6 * ceiling, std=0.8 * ceiling)
    assert health.DivergenceMonitor().check(at) is None
    over = _tick()
    over[name] = dict(num=8, mean=sign * 0.6 * ceiling, std=0.8008 * ceiling)
    divergence = health.DivergenceMonitor().check(over)  # A fresh monitor: no warm-up, no history needed.
    assert (divergence.rule, divergence.name) == ('ceiling', name)
    level = math.hypot(0.6, 0.8008) * ceiling
    assert divergence.message == (f'{name} is out of range: the root mean square of its 8 values in the tick is '
                                  f'{level:.4g}, over the ceiling {ceiling:g} that healthy training stays far below')


def test_root_mean_square_closed_forms():
    assert health.root_mean_square(dict(num=4, mean=-3.0, std=4.0)) == 5.0
    assert health.root_mean_square(dict(num=1, mean=2.0, std=0.0)) == 2.0
    assert health.root_mean_square(dict(num=4, mean=float('inf'), std=float('nan'))) == math.inf
    assert math.isnan(health.root_mean_square(dict(num=0, mean=float('nan'), std=float('nan'))))


def test_an_overflowed_tick_mean_is_over_every_ceiling():
    stats = _tick()
    stats['Loss/scores/real'] = dict(num=8, mean=float('inf'), std=float('nan'))
    assert health.DivergenceMonitor().check(stats).rule == 'ceiling'


def test_image_absmax_counts_a_nonfinite_image_as_the_largest_value():
    img = torch.zeros([3, 3, 4, 4])
    img[0, 1, 2, 3] = -7.5
    img[1, 0, 0, 0] = float('nan')
    img[2, 2, 3, 3] = float('inf')
    largest = torch.finfo(torch.float32).max
    assert loss.image_absmax(img).tolist() == [7.5, largest, largest]

def test_the_end_of_tick_check_reports_the_saved_networks_and_changes_nothing():
    # The tiny networks of the loop tests. G trains (its w_avg would move in a training-mode pass), G_ema not.
    common = dict(c_dim=3, img_resolution=16, img_channels=3)
    G = networks.Generator(z_dim=8, w_dim=8, mapping_kwargs=dict(num_layers=2), **common,
                           synthesis_kwargs=dict(channel_base=128, channel_max=16)).train()
    with torch.no_grad():
        G.mapping.w_avg.fill_(0.5)  # Not the batch mean, so a training-mode pass would move it.
    G_ema = copy.deepcopy(G).eval()
    D = networks.Discriminator(channel_base=128, channel_max=16, **common).train()
    z = torch.randn([4, 8], generator=torch.Generator().manual_seed(0))
    c = torch.eye(3)[[0, 1, 2, 0]]
    def tensors():
        return {f'{net}.{name}': t.clone() for net, module in (('G', G), ('D', D), ('G_ema', G_ema))
                for name, t in module.state_dict().items()}
    before = tensors()
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    training_stats.reset()
    collector = training_stats.Collector(regex=health.STATS_REGEX, keep_previous=False)
    health.report_end_of_tick(G, G_ema, D, z, c)
    assert torch.equal(torch.rand(4), expected_draw)  # No random number was drawn (constant noise).
    assert G.training and D.training and not G_ema.training
    assert [name for name, t in tensors().items() if not torch.equal(before[name], t)] == []  # w_avg included.
    collector.update()
    stats = collector.as_dict()
    G.eval()
    with torch.no_grad():
        img = G(z, c, noise_mode='const')
        logits = D(img, c)
    assert stats['Health/end/G/img_absmax'].num == 4
    assert stats['Health/end/G/img_absmax'].mean == pytest.approx(float(img.abs().amax(dim=[1, 2, 3]).mean()))
    assert stats['Health/end/D/scores'].mean == pytest.approx(float(logits.mean()))
    assert stats['Health/end/G_ema/img_absmax'].num == 4
    training_stats.reset()


# ----------------------------------------------------------------------------
# The relative rule (tested without ceilings, which would catch most of these values first).


def _relative_only():
    return health.DivergenceMonitor(ceilings={})


def test_a_huge_loss_after_warmup_is_an_explosion():
    monitor = _relative_only()
    for stats in _steady_ticks(3):
        assert monitor.check(stats) is None
    divergence = monitor.check(_tick(g_loss=4e13))
    assert divergence.rule == 'loss explosion'
    assert 'Loss/G/loss exploded: its tick mean 4e+13 is over 1000 times the median' in divergence.message
    assert 'of the previous 3 ticks (and over 100)' in divergence.message
    assert len(monitor.history['Loss/G/loss']) == 3  # The diverged tick is not taken into the history.


def test_a_jump_below_the_ceiling_is_an_explosion_for_the_relative_rule():
    # With the default ceilings: losses of 0.1 that jump to 500 are under the loss ceiling of 1000, but 5000
    # times their median.
    monitor = health.DivergenceMonitor()
    for _ in range(3):
        assert monitor.check(_tick(g_loss=0.1)) is None
    assert monitor.check(_tick(g_loss=500.0)).rule == 'loss explosion'


def test_warmup_is_respected():
    monitor = _relative_only()
    assert monitor.check(_tick()) is None
    assert monitor.check(_tick()) is None
    assert monitor.check(_tick(d_loss=4e13)) is None  # Only two ticks of history: the rule does not apply yet.
    assert monitor.check(_tick(d_loss=4e13 * 1001)).rule == 'loss explosion'  # Three now, 4e13 among them.


def test_an_explosion_needs_both_the_factor_and_the_floor():
    small = _relative_only()
    for _ in range(3):
        small.check(_tick(g_loss=0.01))
    assert small.check(_tick(g_loss=99.0)) is None  # 9900 times the median, but below the floor of 100.
    large = _relative_only()
    for _ in range(3):
        large.check(_tick(g_loss=5.0))
    assert large.check(_tick(g_loss=4999.0)) is None  # Above the floor, but not 1000 times the median 5.
    assert large.check(_tick(g_loss=5001.0)).rule == 'loss explosion'


def test_the_median_ignores_one_odd_tick():
    monitor = _relative_only()
    for g_loss in (1.0, 1.0, 1.0, 500.0):  # One odd (but not exploded) tick in the history.
        assert monitor.check(_tick(g_loss=g_loss)) is None
    assert monitor.check(_tick(g_loss=2000.0)).rule == 'loss explosion'


def test_an_overflowing_tick_mean_is_an_explosion_even_in_warmup():
    assert _relative_only().check(_tick(d_loss=float('inf'))).rule == 'loss explosion'


def test_a_tick_without_one_finite_loss_value_is_caught():
    divergence = health.DivergenceMonitor().check(_tick(num=0, g_loss=float('nan')))
    assert divergence.rule == 'non-finite values'
    assert divergence.message == 'every Loss/G/loss value of the tick was NaN or Inf'


@pytest.mark.parametrize('name', ['Health/G/img_absmax', 'Health/end/D/scores'])
def test_a_tick_without_one_finite_value_of_a_statistic_of_every_tick_is_caught(name):
    stats = _tick()
    stats[name] = dict(num=0, mean=float('nan'), std=float('nan'))
    divergence = health.DivergenceMonitor().check(stats)
    assert (divergence.rule, divergence.message) == ('non-finite values', f'every {name} value of the tick was '
                                                                          f'NaN or Inf')


def test_a_lazy_statistic_absent_from_a_tick_is_not_a_divergence():
    # The R1 step runs every 16 steps: in the ticks between, the Collector lists its names with num = 0.
    stats = _tick()
    stats['Loss/r1_penalty'] = stats['Loss/D/reg'] = dict(num=0, mean=float('nan'), std=float('nan'))
    assert health.DivergenceMonitor().check(stats) is None


def test_a_single_nonfinite_gradient_step_does_not_stop_a_run():
    monitor = health.DivergenceMonitor()
    assert monitor.check(_tick(Gmain=(1, 1), Dmain=(1, 1))) is None  # A one-step tick whose step overflowed.
    assert monitor.check(_tick(Gmain=(1, 8), Dreg=(1, 1))) is None
    assert monitor.check(_tick(Dmain=(4, 8))) is None  # Half is not more than half.


def test_nonfinite_gradients_in_more_than_half_of_the_steps_are_caught():
    divergence = health.DivergenceMonitor().check(_tick(Gmain=(0, 8), Dmain=(5, 8)))
    assert divergence.rule == 'non-finite gradients'
    assert divergence.message == 'the Dmain gradients were NaN or Inf in 5 of 8 steps of the tick (more than half)'
    assert health.DivergenceMonitor().check(_tick(Greg=(2, 2))).rule == 'non-finite gradients'


def test_state_dict_round_trip_gives_identical_decisions(tmp_path):
    ticks = _steady_ticks(5)
    later = [_tick(g_loss=3.0), _tick(g_loss=4e13), _tick(d_loss=2e4), _tick(d_loss=1e5)]
    original = _relative_only()
    for stats in ticks:
        original.check(stats)
    # Through a weights-only torch file, as the training state stores it.
    torch.save(dict(health=original.state_dict()), tmp_path / 'state.pt')
    restored = _relative_only()
    restored.load_state_dict(torch.load(tmp_path / 'state.pt', weights_only=True)['health'])
    assert restored.state_dict() == original.state_dict()
    decisions = [[None if d is None else d.message for d in map(monitor.check, later)]
                 for monitor in (original, restored)]
    assert decisions[0] == decisions[1]
    assert decisions[0][1] is not None and decisions[0][0] is None
    # Not vacuous: without the history a fresh monitor is still in its warmup and decides otherwise.
    fresh = _relative_only()
    assert [fresh.check(stats) for stats in later][1] is None


def test_load_state_dict_keeps_the_newest_ticks_of_a_longer_history():
    monitor = health.DivergenceMonitor(window=4)
    monitor.load_state_dict(dict(history={'Loss/G/loss': [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 'Other/loss': [1.0]}))
    assert monitor.history == {'Loss/G/loss': [3.0, 4.0, 5.0, 6.0], 'Loss/D/loss': []}

# ----------------------------------------------------------------------------
# Diverging tiny runs. Steps are counted from the loss's side: one Gmain call per round, two rounds per step.

ROUNDS = BATCH // 4


class _StepCountingLoss(StyleGAN2Loss):
    rounds = collections.Counter()  # Calls of each phase so far.

    def accumulate_gradients(self, phase, **kwargs):
        _StepCountingLoss.rounds[phase] += 1
        super().accumulate_gradients(phase=phase, **kwargs)

    @staticmethod
    def step() -> int:
        """The index of the training step in progress (0 = the first step of this process)."""
        return (_StepCountingLoss.rounds['Gmain'] - 1) // ROUNDS

    @staticmethod
    def last_round(phase: str) -> bool:
        """Whether the call of `phase` in progress is the last round of its run (every run has ROUNDS)."""
        return _StepCountingLoss.rounds[phase] % ROUNDS == 0


class ExplodingLoss(_StepCountingLoss):
    """D's logits are a million times larger from step `first_step` on: finite, but an exploded loss."""

    first_step = 5

    def run_D(self, img, c):
        logits = super().run_D(img, c)
        return logits * 1e6 if self.step() >= ExplodingLoss.first_step else logits


class _NaNGradient(torch.autograd.Function):
    """The identity, whose gradient is NaN (and stays differentiable, for R1)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float('nan')


class NaNGradientLoss(_StepCountingLoss):
    """From step `first_step` on, every gradient that flows back through D's logits is NaN; the losses stay
    finite."""

    first_step = 1

    def run_D(self, img, c):
        logits = super().run_D(img, c)
        return _NaNGradient.apply(logits) if self.step() >= NaNGradientLoss.first_step else logits


class NaNWeightLoss(_StepCountingLoss):
    """At step `first_step` a NaN lands in one of D's weights (as from a broken optimizer)."""

    first_step = 1

    def run_D(self, img, c):
        if self.step() == NaNWeightLoss.first_step:
            with torch.no_grad():
                self.D.b16.conv0.weight[0, 0, 0, 0] = float('nan')
        return super().run_D(img, c)


def _diverge(run_dir, data_dir, loss_class, first_step, **kwargs):
    loss_class.first_step = first_step
    _StepCountingLoss.rounds.clear()
    loss_kwargs = dict(class_name=f'test_health.{loss_class.__name__}', r1_gamma=1.0)
    with pytest.raises(TrainingDiverged) as error:
        _train(run_dir, data_dir, loss_kwargs=loss_kwargs, **kwargs)
    training_stats.reset()
    assert '\n' not in str(error.value)
    return str(error.value)


def _progress_nimg(run_dir):
    return checkpoint.load_training_state(str(run_dir / checkpoint.STATE_FILE_NAME))['progress']['cur_nimg']


def _last_good(run_dir):
    with open(run_dir / run_files.LAST_GOOD_FILE_NAME) as f:
        return json.load(f)


def _kept(run_dir, snapshot_name, kimg, tick):
    """The part of the stop message that names the last good files and how to continue."""
    snapshot = run_dir / snapshot_name
    return (f'the last good snapshot {snapshot} and training state {run_dir / "training-state.pt"} ({kimg:.1f} kimg, '
            f'tick {tick}) are kept; --resume={run_dir} continues from that state with the same options; '
            f'--resume={snapshot} starts a new run from its weights, e.g. with ')


def _max_abs_output(G):
    z = torch.randn([4, G.z_dim], generator=torch.Generator().manual_seed(1))
    c = torch.eye(max(G.c_dim, 1))[torch.arange(4) % max(G.c_dim, 1), :G.c_dim]  # One-hot labels, or [4, 0].
    return float(G(z, c, noise_mode='const').abs().max())


def test_an_exploding_d_is_caught_in_its_first_tick_and_the_last_good_files_are_named(tmp_path, data_dir):
    # Tick 0 is step 0 (nimg 8), tick 1 steps 1-2 (nimg 24). D's logits are a million times larger from step 1
    # on: the first bad tick is tick 1, where the relative rule would still be in its warm-up (it needs 3 ticks
    # of history); the ceiling on D's logits needs none.
    run_dir = tmp_path / 'run'
    message = _diverge(run_dir, data_dir, ExplodingLoss, first_step=1, steps=10)
    assert message.startswith('Training diverged at 0.0 kimg: Loss/')
    assert ' is out of range: the root mean square of its ' in message and 'over the ceiling 1000' in message
    assert ('(tick 1). Nothing was written for this tick; ' + _kept(run_dir, 'network-snapshot-000000.008.pkl', 0.008, 0)
            + 'lower learning rates (--glr, --dlr), a larger --gamma, or --fp32') in message
    assert not message.endswith('.')  # train.py appends '. The log is ...'.
    assert _last_good(run_dir) == dict(snapshot='network-snapshot-000000.008.pkl', training_state='training-state.pt',
                                       kimg=0.008, tick=0)
    assert not os.path.exists(run_dir / 'network-snapshot-000000.024.pkl')
    assert not os.path.exists(run_dir / 'fakes000000.024.png')
    with open(run_dir / 'stats.jsonl') as f:
        assert len(f.readlines()) == 1
    assert _progress_nimg(run_dir) == BATCH


class LastStepBlowUpLoss(_StepCountingLoss):
    """In the last round of the lazy R1 phase of step `first_step`, the last thing a step does with G in use
    nowhere after it, G's toRGB weights are multiplied by 1e4. Every statistic of that tick was computed
    before; only the weights at its end show the blow-up."""

    first_step = 4

    def accumulate_gradients(self, phase, **kwargs):
        super().accumulate_gradients(phase=phase, **kwargs)
        if phase == 'Dreg' and self.last_round(phase) and self.step() == LastStepBlowUpLoss.first_step:
            with torch.no_grad():
                for name, param in self.G_synthesis.named_parameters():
                    if 'torgb' in name:
                        param.mul_(1e4)


def test_a_blow_up_in_the_last_step_of_a_tick_keeps_that_ticks_files_out_and_resume_works(tmp_path, data_dir):
    # Step 4 ends tick 2 (steps 3-4, nimg 40). Judged by its statistics alone, tick 2 would pass and its snapshot
    # and state (with the blown-up G) would become the "last good" ones; the end-of-tick check of the weights
    # about to be saved stops the run in tick 2, and the files of tick 1 (nimg 24) are named.
    run_dir = tmp_path / 'run'
    message = _diverge(run_dir, data_dir, LastStepBlowUpLoss, first_step=4, steps=10)
    assert message.startswith('Training diverged at 0.0 kimg: Health/end/G/img_absmax is out of range')
    assert '(tick 2). Nothing was written for this tick; ' + _kept(run_dir, 'network-snapshot-000000.024.pkl',
                                                                   0.024, 1) in message
    good = _last_good(run_dir)
    assert good == dict(snapshot='network-snapshot-000000.024.pkl', training_state='training-state.pt', kimg=0.024,
                        tick=1)
    assert not os.path.exists(run_dir / 'network-snapshot-000000.040.pkl')
    # The named files load, hold healthy networks, and were written at tick 1.
    snapshot = snapshot_io.load_network_pkl(open(run_dir / good['snapshot'], 'rb'))
    assert max(_max_abs_output(snapshot[name]) for name in ('G', 'G_ema')) < health.IMG_ABSMAX_CEILING
    assert _progress_nimg(run_dir) == 3 * BATCH
    # Resuming the diverged run from its last good state works (here with the cause removed): it trains on and
    # the pointer moves with the new healthy ticks.
    _train(run_dir, data_dir, steps=6, resume_state=str(run_dir / good['training_state']))
    assert _last_good(run_dir) == dict(snapshot='network-snapshot-000000.048.pkl',
                                       training_state='training-state.pt', kimg=0.048, tick=3)
    assert _progress_nimg(run_dir) == 6 * BATCH


class AfterDmainBlowUpLoss(_StepCountingLoss):
    """In the last round of D's main phase of step `first_step` (a step without the lazy R1 phase, so G is used
    nowhere after it), G's toRGB weights are multiplied by 1e4."""

    first_step = 1

    def accumulate_gradients(self, phase, **kwargs):
        super().accumulate_gradients(phase=phase, **kwargs)
        if phase == 'Dmain' and self.last_round(phase) and self.step() == AfterDmainBlowUpLoss.first_step:
            with torch.no_grad():
                for name, param in self.G_synthesis.named_parameters():
                    if 'torgb' in name:
                        param.mul_(1e4)


def test_a_stop_between_ticks_does_not_save_blown_up_weights_as_last_good(tmp_path, data_dir):
    # Tick 0 is step 0 (nimg 8); a stop asked for at its end comes after step 1, half way through tick 1, and
    # step 1 blew G up. The tick's statistics are not complete at a stop, but the weights about to be saved are
    # probed: the run ends as diverged, writes nothing, and names tick 0's files.
    run_dir = tmp_path / 'run'
    request = preemption.StopRequest()

    def progress(cur_kimg, total_kimg):
        if request.signame is None and any(name.startswith('fakes0') for name in os.listdir(run_dir)):
            request.signame = 'SIGTERM'  # What the handler does on the first signal; after tick 0's end.
    message = _diverge(run_dir, data_dir, AfterDmainBlowUpLoss, first_step=1, steps=10, stop_request=request,
                       progress_fn=progress)
    assert message.startswith('Training diverged at 0.0 kimg: at the stop, Health/end/G/img_absmax is out of range')
    assert _kept(run_dir, 'network-snapshot-000000.008.pkl', 0.008, 0) in message
    assert _last_good(run_dir) == dict(snapshot='network-snapshot-000000.008.pkl', training_state='training-state.pt',
                                       kimg=0.008, tick=0)
    assert not os.path.exists(run_dir / 'network-snapshot-000000.016.pkl')
    assert _progress_nimg(run_dir) == BATCH
    # The same stop without the blow-up saves its snapshot and state, and the pointer names them.
    run_dir, request = tmp_path / 'healthy', preemption.StopRequest()
    state = _train(run_dir, data_dir, steps=10, stop_request=request, progress_fn=progress)
    assert state.stop.signal == 'SIGTERM' and state.progress.cur_nimg == 2 * BATCH
    assert _last_good(run_dir) == dict(snapshot='network-snapshot-000000.016.pkl',
                                       training_state='training-state.pt', kimg=0.016, tick=1)


def test_nonfinite_gradients_in_every_step_stop_the_run(tmp_path, data_dir):
    # NaN gradients from the second step on: the second tick (steps 2 and 3) has them in every step. The loop
    # zeroes them, so the weights stay finite and, without the check, training would go on without learning.
    run_dir = tmp_path / 'run'
    message = _diverge(run_dir, data_dir, NaNGradientLoss, first_step=1, steps=6)
    assert message.startswith('Training diverged at 0.0 kimg: the Dmain gradients were NaN or Inf in 2 of 2 '
                              'steps of the tick (more than half) (tick 1).')
    assert _kept(run_dir, 'network-snapshot-000000.008.pkl', 0.008, 0) in message
    assert _progress_nimg(run_dir) == BATCH


def test_nonfinite_weights_stop_the_run(tmp_path, data_dir):
    run_dir = tmp_path / 'run'
    message = _diverge(run_dir, data_dir, NaNWeightLoss, first_step=1, steps=6)
    assert message.startswith('Training diverged at 0.0 kimg: D has non-finite weights (b16.conv0.weight) (tick 1).')
    assert _progress_nimg(run_dir) == BATCH


def test_divergence_before_the_first_snapshot_says_so(tmp_path, data_dir):
    message = _diverge(tmp_path / 'run', data_dir, NaNWeightLoss, first_step=0, steps=6)
    assert message.endswith('(tick 0). Nothing was written for this tick; no snapshot or training state had been '
                            'written before it; start again with lower learning rates (--glr, --dlr), a larger '
                            '--gamma, or --fp32')
    assert not os.path.exists(tmp_path / 'run' / checkpoint.STATE_FILE_NAME)
    assert not os.path.exists(tmp_path / 'run' / run_files.LAST_GOOD_FILE_NAME)


def test_a_resumed_run_names_the_last_good_files_of_the_run_it_continues(tmp_path, data_dir):
    run_dir = tmp_path / 'run'
    _train(run_dir, data_dir, steps=3)  # Snapshots after steps 1 and 3.
    state_file = str(run_dir / checkpoint.STATE_FILE_NAME)
    message = _diverge(run_dir, data_dir, NaNGradientLoss, first_step=0, steps=8, resume_state=state_file)
    assert 'the Dmain gradients were NaN or Inf' in message
    assert _kept(run_dir, 'network-snapshot-000000.024.pkl', 0.024, 1) in message
    assert _progress_nimg(run_dir) == 3 * BATCH

# ----------------------------------------------------------------------------
# A full disk.


@pytest.mark.parametrize('name_contains, written', [
    ('network-snapshot', 'network-snapshot-000000.024.pkl'),
    ('training-state', 'training-state.pt'),
    ('fakes', 'fakes000000.024.png'),
])
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_files(tmp_path, data_dir, monkeypatch,
                                                                            name_contains, written):
    run_dir = tmp_path / 'run'
    _train(run_dir, data_dir, steps=1)
    saved = {name: (run_dir / name).read_bytes() for name in ('network-snapshot-000000.008.pkl', 'training-state.pt')}
    monkeypatch.setattr(util, 'open', disk_full_open(1000, name_contains), raising=False)
    with pytest.raises(TrainingStopped) as error:
        _train(run_dir, data_dir, steps=3, resume_state=str(run_dir / checkpoint.STATE_FILE_NAME))
    assert str(error.value) == (f'No space left on device while writing {written}; the previous snapshot and '
                                f'training state are intact')
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved
    assert [name for name in os.listdir(run_dir) if '.tmp-' in name] == []
    if written not in saved:
        assert not os.path.exists(run_dir / written)


def test_a_full_disk_at_the_first_snapshot_says_nothing_had_been_saved(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(util, 'open', disk_full_open(1000, 'network-snapshot'), raising=False)
    with pytest.raises(TrainingStopped) as error:
        _train(tmp_path / 'run', data_dir, steps=1)
    assert str(error.value) == ('No space left on device while writing network-snapshot-000000.008.pkl; nothing '
                                'had been saved before')


def test_a_full_quota_is_reported_as_such(tmp_path, data_dir, monkeypatch):
    # Network file systems report a full quota (EDQUOT) where a local disk reports ENOSPC.
    def quota_open(path, mode='r', *args, **kwargs):
        if 'network-snapshot' not in os.path.basename(path):
            return open(path, mode, *args, **kwargs)
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), path)
    monkeypatch.setattr(util, 'open', quota_open, raising=False)
    with pytest.raises(TrainingStopped) as error:
        _train(tmp_path / 'run', data_dir, steps=1)
    assert str(error.value) == (f'{os.strerror(errno.EDQUOT)} while writing network-snapshot-000000.008.pkl; '
                                f'nothing had been saved before')

# ----------------------------------------------------------------------------
# train.py as users run it.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dataset_zip = test_train_e2e.dataset_zip  # The fixture: the 16 images train.py is tested on.


def _start_train_py(*flags):
    """train.py in its own process: the tiny network of tests/test_train_e2e.py, one step (8 images) per tick,
    a snapshot every tick."""
    command = [sys.executable, os.path.join(REPO_ROOT, 'train.py'), '--cfg=cifar', '--cbase=256', '--cmax=16',
               '--map=2', '--batch=8', '--gpus=0', '--metrics=none', '--workers=0', '--kimg=0.08', '--tick=0.008',
               '--snap=1', '--aug=ada', '--augpipe=bgc', *flags]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process):
    output, _ = process.communicate(timeout=1200)
    assert 'Traceback' not in output, output
    errors = [line for line in output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1, output
    return process.returncode, errors[0]


_DIVERGED_RE = re.compile(r'Error: Training diverged at [0-9.]+ kimg: (\S+) is out of range: the root mean square of '
                          r'its \d+ values in the tick is [0-9.e+]+, over the ceiling [0-9e+]+ that healthy training '
                          r'stays far below \(tick (\d+)\)\. Nothing was written for this tick; (.*)')


def test_train_py_with_huge_learning_rates_stops_at_the_first_bad_tick_naming_files_that_load(tmp_path, dataset_zip):
    # Two real runs side by side: --glr=--dlr=1e4 blows up in its first step; 0.3 (120 times the cifar default)
    # gets through the first tick and blows up within the next ones.
    huge = _start_train_py(f'--outdir={tmp_path / "huge"}', f'--data={dataset_zip}', '--glr=1e4', '--dlr=1e4')
    large = _start_train_py(f'--outdir={tmp_path / "large"}', f'--data={dataset_zip}', '--glr=0.3', '--dlr=0.3')

    returncode, line = _finish(huge)
    match = _DIVERGED_RE.fullmatch(line)
    assert returncode == 1 and match is not None, line
    assert match.group(2) == '0'  # The very first tick.
    assert match.group(3).startswith('no snapshot or training state had been written before it; start again with '
                                     'lower learning rates (--glr, --dlr), a larger --gamma, or --fp32. Removed the '
                                     'run directory ')
    assert os.listdir(tmp_path / 'huge') == []  # Nothing had been saved, so the new run's directory is gone.

    returncode, line = _finish(large)
    match = _DIVERGED_RE.fullmatch(line)
    assert returncode == 1 and match is not None, line
    (run_dir,) = (tmp_path / 'large').iterdir()
    bad_tick = int(match.group(2))
    good = _last_good(run_dir)
    snapshot, state_file = run_dir / good['snapshot'], run_dir / good['training_state']
    assert 1 <= bad_tick and good['tick'] == bad_tick - 1  # The tick just before the first bad one.
    assert match.group(3).startswith(f'the last good snapshot {snapshot} and training state {state_file} '
                                     f'({good["kimg"]:.1f} kimg, tick {good["tick"]}) are kept; --resume={run_dir} '
                                     f'continues from that state with the same options; --resume={snapshot} starts a '
                                     f'new run from its weights')
    # Nothing of the bad tick or after it: the named snapshot is the newest, stats.jsonl ends at the good tick.
    assert max(name for name in os.listdir(run_dir) if name.startswith('network-snapshot-')) == good['snapshot']
    assert len((run_dir / 'stats.jsonl').read_text().splitlines()) == good['tick'] + 1
    # The named files load, and hold networks within the ceilings.
    with open(snapshot, 'rb') as f:
        networks = snapshot_io.load_network_pkl(f)
    assert max(_max_abs_output(networks[name]) for name in ('G', 'G_ema')) < health.IMG_ABSMAX_CEILING
    record = checkpoint.load_training_state(str(state_file))
    assert record['progress']['cur_nimg'] == round(good['kimg'] * 1000)

    # The README's resume continues the diverged run from its last good state, exactly: the same options give
    # the same divergence at the same tick, and the directory of the resumed run stays.
    returncode, again = _finish(_start_train_py(f'--resume={run_dir}'))
    assert returncode == 1
    assert again.split('. The log is')[0] == line.split('. The log is')[0]
    assert _last_good(run_dir) == good
