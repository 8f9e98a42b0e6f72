"""training.checkpoint.CheckpointIO: a training state assembled from named components, the version-1 layout
the loop writes with it, and the counters split from the runtime state (training_loop.Progress)."""

import pytest
import torch

from training import checkpoint
from training.loss import Loss, StyleGAN2Loss
from training.training_loop import Progress, TrainingState


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


def test_training_state_reads_and_writes_its_progress():
    state = TrainingState(opts=None, device=torch.device('cpu'), rank=0, training_set=None, data_iterator=None,
                          G=None, D=None, G_ema=None, augment_pipe=None, loss=None, phases=[], ada=None)
    state.cur_nimg += 8
    state.batch_idx = 2
    assert state.progress == Progress(cur_nimg=8, batch_idx=2)


def test_losses_carry_their_own_state():
    assert Loss().state_dict() == {}
    loss = StyleGAN2Loss(device='cpu', G_mapping=None, G_synthesis=None, D=None)
    loss.pl_mean.fill_(2.5)
    other = StyleGAN2Loss(device='cpu', G_mapping=None, G_synthesis=None, D=None)
    other.load_state_dict(loss.state_dict())
    assert other.pl_mean.item() == 2.5
