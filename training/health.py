"""Divergence detection: decide from one tick's statistics whether a run has diverged.

`DivergenceMonitor.check(stats)` takes one tick's statistics in the form of `Collector.as_dict()`
(`{name: {num, mean, std}}`, where `num` counts the finite samples only) and returns None for a healthy tick or a
`Divergence` that names the rule and its numbers. The rules are conservative on purpose: stopping a run that
would have recovered costs as much as letting a dead one run, so each rule fires only on something that healthy
GAN training does not produce.

1. Non-finite loss: a loss (Loss/G/loss, Loss/D/loss) was reported during the tick, but not one of its values
   was finite.
2. Non-finite gradients: in more than half of the runs of one phase (Gmain, Greg, Dmain, Dreg, ...) during the
   tick, and in at least `min_bad_steps` (2) of them, some gradient was NaN or Inf. The loop zeroes such
   gradients before the optimizer step (fp16 training overflows now and then, and one bad batch must not stop a
   run), so a single bad step never triggers; a phase whose gradients are always non-finite has stopped
   learning, although its weights stay finite. The loop reports one 0/1 sample per phase run as
   `Health/<phase>/nonfinite_grads` (rank 0 only: the gradients of all ranks are equal after their all-reduce).
3. Loss explosion: once a loss has the means of at least `warmup` (3) healthy ticks, a tick mean |m| with
   |m| > `factor` (1000) x the median of the previous `window` (8) healthy tick means AND |m| > `floor` (100).
   The StyleGAN2 losses are softplus values of order 1-10, and D's logits would have to reach about a thousand
   for the floor alone to be crossed; the median (rather than the last tick, or the mean) keeps one odd tick from
   moving the reference. A tick mean that is itself not finite (finite values that overflow float64 when summed)
   is an explosion whatever the history.

A tick that triggers a rule is not taken into the history; healthy ticks are. `state_dict()` returns the history
as plain lists of floats, which the training state stores (it is read with torch.load(weights_only=True)), so a
resumed run decides exactly as the uninterrupted one.
"""

import dataclasses
import math
import re
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

from training.loss import STAT_D_LOSS, STAT_G_LOSS

LOSS_NAMES = (STAT_G_LOSS, STAT_D_LOSS)

# Everything the monitor reads, for a training_stats.Collector(regex=STATS_REGEX, keep_previous=False).
_GRADIENT_FLAG_PATTERN = r'Health/([^/]+)/nonfinite_grads'
STATS_REGEX = '|'.join([re.escape(name) for name in LOSS_NAMES] + [_GRADIENT_FLAG_PATTERN])
_GRADIENT_FLAG_RE = re.compile(_GRADIENT_FLAG_PATTERN)


def nonfinite_grads_name(phase_name: str) -> str:
    """The statistic that carries one 0/1 sample per run of `phase_name` (1: some gradient was NaN or Inf)."""
    return f'Health/{phase_name}/nonfinite_grads'


@dataclasses.dataclass(frozen=True)
class Divergence:
    rule:       str     # 'non-finite loss', 'non-finite gradients' or 'loss explosion'.
    message:    str     # What happened, with the numbers, as part of one line for the user.

    def __str__(self) -> str:
        return self.message


class DivergenceMonitor:
    """The rules of the module docstring over a window of ticks; see there for what each one means."""

    def __init__(self,
        warmup:         int = 3,            # Healthy ticks of a loss before the explosion rule applies to it.
        window:         int = 8,            # The explosion rule compares with the median of this many ticks.
        factor:         float = 1000.0,     # An explosion is a tick mean above factor x that median ...
        floor:          float = 100.0,      # ... and above this absolute value.
        min_bad_steps:  int = 2,            # Fewest runs of a phase with non-finite gradients that stop a run.
        loss_names:     Sequence[str] = LOSS_NAMES,   # The losses whose values the rules watch.
    ):
        assert 1 <= warmup <= window, 'the history holds `window` ticks, so warmup cannot need more'
        assert factor >= 1 and floor >= 0 and min_bad_steps >= 1
        self.warmup = int(warmup)
        self.window = int(window)
        self.factor = float(factor)
        self.floor = float(floor)
        self.min_bad_steps = int(min_bad_steps)
        self.loss_names = tuple(loss_names)
        self.history: Dict[str, List[float]] = {name: [] for name in self.loss_names}

    def check(self, stats: Mapping[str, Mapping[str, float]]) -> Optional[Divergence]:
        """Decide about one tick; a healthy tick's loss means join the history. `stats` maps names to
        {'num': finite samples, 'mean': their mean}; names that are absent were not reported and are skipped."""
        for name in self.loss_names:
            if name in stats and _num(stats[name]) == 0:
                return Divergence('non-finite loss', f'every {name} value of the tick was NaN or Inf')

        for name in sorted(stats):
            match = _GRADIENT_FLAG_RE.fullmatch(name)
            if match is None:
                continue
            runs = _num(stats[name])
            bad = int(round(float(stats[name]['mean']) * runs)) if runs > 0 else 0
            if bad >= self.min_bad_steps and 2 * bad > runs:
                return Divergence('non-finite gradients', f'the {match.group(1)} gradients were NaN or Inf in {bad} '
                                  f'of {runs} steps of the tick (more than half)')

        means = {}
        for name in self.loss_names:
            if name not in stats or _num(stats[name]) == 0:
                continue
            value = abs(float(stats[name]['mean']))
            if not math.isfinite(value):
                return Divergence('loss explosion', f'{name} exploded: its tick mean overflowed to {value}')
            previous = self.history[name]
            if len(previous) >= self.warmup:
                median = statistics.median(previous)
                if value > self.factor * median and value > self.floor:
                    return Divergence('loss explosion', f'{name} exploded: its tick mean {value:.4g} is over '
                                      f'{self.factor:g} times the median {median:.4g} of the previous '
                                      f'{len(previous)} ticks (and over {self.floor:g})')
            means[name] = value

        for name, value in means.items():
            self.history[name] = (self.history[name] + [value])[-self.window:]
        return None

    def state_dict(self) -> dict:
        """The history as plain lists of floats (what a weights-only training state can hold)."""
        return dict(history={name: [float(v) for v in values] for name, values in self.history.items()})

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s result. Losses this monitor does not watch are ignored, and a history
        longer than this monitor's window keeps its newest ticks."""
        history = state['history']
        assert isinstance(history, dict), 'a DivergenceMonitor state holds {"history": {name: [floats]}}'
        self.history = {name: [float(v) for v in history.get(name, [])][-self.window:] for name in self.loss_names}


def _num(entry: Mapping[str, float]) -> int:
    return int(round(float(entry['num'])))
