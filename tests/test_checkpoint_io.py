"""training.checkpoint.CheckpointIO: a training state assembled from named components, the version-1 layout
the loop writes with it from its state grouped by component, and the counters split from the runtime state
(training_loop.Progress)."""

import pytest
import torch

from training import checkpoint, training_loop
from training.loss import Loss, StyleGAN2Loss
from training.training_loop import Networks, Optimization, PhaseRuntime, Progress, TrainingState


class Counter:
    """A stateful component of the smallest kind: state_dict / load_state_dict."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return dict(value=self.value)

    def load_state_dict(self, state):
        self.value = state['value']


def test_components_round_trip_and_a_new_one_is_one_keyword():
    net = torch.nn.Linear(2, 2)
    saved = checkpoint.CheckpointIO(networks=dict(net=net, absent=None), counter=Counter(5),
                                    extra=Counter(7)).state_dict()
    assert saved['networks']['absent'] is None and saved['counter'] == dict(value=5)
    fresh_net, counter, extra = torch.nn.Linear(2, 2), Counter(), Counter()
    checkpoint.CheckpointIO(networks=dict(net=fresh_net, absent=None), counter=counter,
                            extra=extra).load_state_dict(saved)
    assert torch.equal(fresh_net.weight, net.weight) and counter.value == 5 and extra.value == 7


def test_a_component_the_state_lacks_keeps_its_fresh_value():
    # A state written before a component existed (e.g. the divergence monitor) loads; the component starts fresh.
    counter = Counter(3)
    checkpoint.CheckpointIO(counter=counter, later=Counter(9)).load_state_dict(dict(counter=dict(value=1)))
    assert counter.value == 1


def test_groups_must_match_exactly():
    saved = checkpoint.CheckpointIO(networks=dict(G=torch.nn.Linear(1, 1), augment_pipe=None)).state_dict()
    with pytest.raises(ValueError, match="disagree about networks 'augment_pipe'"):
        checkpoint.CheckpointIO(networks=dict(G=torch.nn.Linear(1, 1),
                                              augment_pipe=torch.nn.Linear(1, 1))).load_state_dict(saved)
    with pytest.raises(RuntimeError):  # A module's state dict is loaded strictly (shapes, keys).
        checkpoint.CheckpointIO(networks=dict(G=torch.nn.Linear(2, 1), augment_pipe=None)).load_state_dict(saved)


def test_progress_resumes_at_the_next_tick():
    progress = Progress(cur_nimg=96, cur_tick=3, batch_idx=12, tick_start_nimg=64)
    assert progress.state_dict() == dict(cur_nimg=96, cur_tick=3, batch_idx=12, tick_start_nimg=64,
                                         between_ticks=False)
    resumed = Progress()
    resumed.load_state_dict(progress.state_dict())
    assert (resumed.cur_nimg, resumed.cur_tick, resumed.batch_idx, resumed.tick_start_nimg) == (96, 4, 12, 96)
    # States written before the flag existed were all written at a tick.
    resumed.load_state_dict(dict(cur_nimg=96, cur_tick=3, batch_idx=12, tick_start_nimg=64))
    assert (resumed.cur_tick, resumed.tick_start_nimg) == (4, 96)


def test_progress_saved_by_a_stop_resumes_in_the_same_tick():
    # A stop after 96 images, in tick 3, which began at 64: the resumed run finishes tick 3.
    resumed = Progress()
    resumed.load_state_dict(Progress(cur_nimg=96, cur_tick=3, batch_idx=12, tick_start_nimg=64,
                                     between_ticks=True).state_dict())
    assert resumed == Progress(cur_nimg=96, cur_tick=3, batch_idx=12, tick_start_nimg=64)


def test_the_state_grouped_by_component_is_saved_in_the_version_1_layout():
    # TrainingState groups the parts of a run (nets, optim, health, ...); the training state file keeps the
    # layout that states written before the grouping have (tests/golden/training-state-v1-squeeze.pt).
    G, D, G_ema = (torch.nn.Linear(2, 2) for _ in range(3))
    opt = {name: torch.optim.Adam(net.parameters()) for name, net in (('G', G), ('D', D))}
    phases = [PhaseRuntime('Gmain', 'G', G, opt['G'], 1), PhaseRuntime('Greg', 'G', G, opt['G'], 4),
              PhaseRuntime('Dboth', 'D', D, opt['D'], 1)]
    state = TrainingState(opts=None, device=torch.device('cpu'), rank=0, data=None,
                          nets=Networks(G, D, G_ema, augment_pipe=None), optim=Optimization(Loss(), phases, ada=None))
    state.progress.cur_nimg += 8
    record = training_loop._checkpoint_io(state).state_dict()
    assert list(record) == ['progress', 'networks', 'optimizers', 'loss', 'loss_ranks', 'ada', 'health', 'tick_stats',
                            'rng']
    assert record['loss_ranks'] is None  # One process: `loss` is its own.
    assert record['progress'] == dict(cur_nimg=8, cur_tick=0, batch_idx=0, tick_start_nimg=0, between_ticks=False)
    assert list(record['networks']) == ['G', 'D', 'G_ema', 'augment_pipe'] and record['networks']['augment_pipe'] is None
    assert record['networks']['G_ema'].keys() == G_ema.state_dict().keys()
    assert list(record['optimizers']) == ['G', 'D']  # One per network, whatever the number of its phases.
    assert record['ada'] is None and record['tick_stats'] is None  # Fixed p; written at a tick, not by a stop.
    assert record['health'] == state.health.monitor.state_dict()


def test_losses_carry_their_own_state():
    assert Loss().state_dict() == {}
    loss = StyleGAN2Loss(device='cpu', G_mapping=None, G_synthesis=None, D=None)
    loss.pl_mean.fill_(2.5)
    other = StyleGAN2Loss(device='cpu', G_mapping=None, G_synthesis=None, D=None)
    other.load_state_dict(loss.state_dict())
    assert other.pl_mean.item() == 2.5
