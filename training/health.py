"""Divergence detection: decide from one tick's statistics whether a run has diverged.

`DivergenceMonitor.check(stats)` takes one tick's statistics in the form of `Collector.as_dict()`
(`{name: {num, mean, std}}`, where `num` counts the finite samples only) and returns None for a healthy tick or a
`Divergence` that names the rule and its numbers. The rules are conservative on purpose: stopping a run that
would have recovered costs as much as letting a dead one run, so each rule fires only on something that healthy
GAN training does not produce.

1. Non-finite values: a statistic that is reported in every tick (a loss, G's output range, the end-of-tick
   statistics below) has not one finite value in the tick.
2. Non-finite gradients: in more than half of the runs of one phase (Gmain, Greg, Dmain, Dreg, ...) during the
   tick, and in at least `min_bad_steps` (2) of them, some gradient was NaN or Inf. The loop zeroes such
   gradients before the optimizer step (fp16 training overflows now and then, and one bad batch must not stop a
   run), so a single bad step never triggers; a phase whose gradients are always non-finite has stopped
   learning, although its weights stay finite. The loop reports one 0/1 sample per phase run as
   `Health/<phase>/nonfinite_grads` (rank 0 only: the gradients of all ranks are equal after their all-reduce).
3. Ceilings, from the very first tick: the root mean square sqrt(mean^2 + std^2) of a watched statistic's
   values in the tick is above its absolute ceiling (`CEILINGS`, each justified there). A blow-up often happens
   in the first steps (a learning rate far too large), where no history exists that a relative rule could
   compare with; the ceilings need none. The root mean square is used because D's logits can explode to both
   signs at once (a mean near zero), and it is never below |mean|. Besides the losses and logits of the
   training steps, the loop reports the same quantities for the weights at the end of the tick
   (`report_end_of_tick`: G's and G_ema's output range and D's logits on a few fixed latents), so that a tick
   whose last step blew the weights up is a bad tick too and its snapshot is not written.
4. Loss explosion: once a loss has the means of at least `warmup` (3) healthy ticks, a tick mean |m| with
   |m| > `factor` (1000) x the median of the previous `window` (8) healthy tick means AND |m| > `floor` (100).
   This catches a jump long before a ceiling when the losses were small; the median (rather than the last
   tick, or the mean) keeps one odd tick from moving the reference. A tick mean that is itself not finite
   (finite values that overflow float64 when summed) is an explosion whatever the history.

A tick that triggers a rule is not taken into the history; healthy ticks are. `state_dict()` returns the history
as plain lists of floats, which the training state stores (it is read with torch.load(weights_only=True)), so a
resumed run decides exactly as the uninterrupted one. The ceilings are constants, not state.

What the ceilings were checked against (the largest per-tick root mean squares in stats.jsonl; CPU runs: the
cifar config with --cbase=4096 --cmax=64 --batch=16 on a 256-image toy dataset for 3 kimg, train.py's tiny
test network at --glr=--dlr=0.03 (12 times the default) and the tiny loop of the tests with the skip, orig,
resnet and squeeze generators for 60 steps): losses <= 4.8, |D logits| <= 4.9, G's max |pixel| <= 5.5, R1 penalty <= 5.3,
weighted R1 term <= 2.6, so every ceiling is at least 18 times above healthy training. `--gamma=1e30` (D made
flat, G wandering) took G to 36, still healthy by these rules; its weighted R1 term of 1.9e27 is caught in the
first tick. In the first tick, `--glr=1 --dlr=1` reaches |D logits| 2252 (reals) and `--glr=1e4 --dlr=1e4`
1.6e10.
"""

import dataclasses
import math
import re
import statistics
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from torch_utils import training_stats
from training.loss import (
    STAT_D_LOSS,
    STAT_D_REG,
    STAT_G_IMG_ABSMAX,
    STAT_G_LOSS,
    STAT_R1_PENALTY,
    STAT_SCORES_FAKE,
    STAT_SCORES_REAL,
    image_absmax,
)

LOSS_NAMES = (STAT_G_LOSS, STAT_D_LOSS)

# What the loop reports for the weights at the end of a tick (`report_end_of_tick`).
STAT_END_G_IMG_ABSMAX       = 'Health/end/G/img_absmax'       # max |pixel| of each image of G.
STAT_END_G_EMA_IMG_ABSMAX   = 'Health/end/G_ema/img_absmax'   # max |pixel| of each image of G_ema.
STAT_END_D_SCORES           = 'Health/end/D/scores'           # D's logits of G's images.
END_OF_TICK_NAMES = (STAT_END_G_IMG_ABSMAX, STAT_END_G_EMA_IMG_ABSMAX, STAT_END_D_SCORES)

# The statistics reported in every step (the losses, G's output range in Gmain) or every tick (the end-of-tick
# ones), which rule 1 can therefore judge: for these, a tick with no finite value means that every value was NaN
# or Inf. The loss reports non-finite values of the lazy R1 step only as missing samples, and its gradients then
# count for rule 2.
EVERY_TICK_NAMES = LOSS_NAMES + (STAT_G_IMG_ABSMAX,) + END_OF_TICK_NAMES

# The absolute ceilings of rule 3, on the root mean square of a statistic's values in one tick. Each is far
# above anything healthy training produces (the module docstring lists what was measured) and far below what a
# blow-up produces within its first tick.
#
# Losses: the StyleGAN2 losses are softplus values, of order 0.1-10 in healthy runs. softplus(x) is about x for
# large x, so a loss of 1000 means D's logits are about 1000 on the wrong side: D says the odds are e^-1000,
# which no training that still learns produces.
LOSS_CEILING = 1e3
# D's logits: of order 1-100 in healthy runs (an overfitting D on a small dataset reaches tens), so a root mean
# square of 1000 is ten times the most confident healthy D. The softplus losses follow the logits, so both
# ceilings are the same.
SCORES_CEILING = 1e3
# G's output range (max |pixel| of each image): images live in [-1, 1] and healthy StyleGAN2 generators stay
# within a few units of that (the initialization gives about 3). 100 is 30 times that, and below the clamp of
# G's fp16 layers (conv_clamp = 256, so a blown-up G on a GPU saturates there and never exceeds ~1000).
IMG_ABSMAX_CEILING = 1e2
# The unweighted R1 penalty ||grad_x D(x)||^2: at 1e6 the gradient norm is 1000, so changing an image by a
# perturbation of norm 1 (for 256x256 RGB, less than a quarter of one 8-bit level per pixel) would move D's
# logit by 1000, the logit ceiling. Healthy D's are smooth on the reals (R1 makes them so): penalties of order
# 0.001-10.
R1_PENALTY_CEILING = 1e6
# The weighted R1 term gamma / 2 * penalty, which joins D's loss: healthy runs keep it of order 0.001-10, below
# D's main loss (D minimizes it). 1e4 is ten times the loss ceiling, because large gammas (100 or more) are used
# on purpose; `--gamma=1e30` gives 1e27 from the first step.
D_REG_CEILING = 1e4

CEILINGS = {
    STAT_G_LOSS:                LOSS_CEILING,
    STAT_D_LOSS:                LOSS_CEILING,
    STAT_SCORES_FAKE:           SCORES_CEILING,
    STAT_SCORES_REAL:           SCORES_CEILING,
    STAT_G_IMG_ABSMAX:          IMG_ABSMAX_CEILING,
    STAT_R1_PENALTY:            R1_PENALTY_CEILING,
    STAT_D_REG:                 D_REG_CEILING,
    STAT_END_G_IMG_ABSMAX:      IMG_ABSMAX_CEILING,
    STAT_END_G_EMA_IMG_ABSMAX:  IMG_ABSMAX_CEILING,
    STAT_END_D_SCORES:          SCORES_CEILING,
}

# The R1 statistics, for the advice of the stop message: there a smaller gamma helps, not a smaller step.
R1_NAMES = (STAT_R1_PENALTY, STAT_D_REG)

# Everything the monitor reads, for a training_stats.Collector(regex=STATS_REGEX, keep_previous=False).
_GRADIENT_FLAG_PATTERN = r'Health/([^/]+)/nonfinite_grads'
STATS_REGEX = '|'.join([re.escape(name) for name in sorted(set(LOSS_NAMES) | set(CEILINGS))] +
                       [_GRADIENT_FLAG_PATTERN])
_GRADIENT_FLAG_RE = re.compile(_GRADIENT_FLAG_PATTERN)

# How many fixed latents `report_end_of_tick` runs through the networks (at most; fewer if the batch is smaller).
END_OF_TICK_IMAGES = 4


def nonfinite_grads_name(phase_name: str) -> str:
    """The statistic that carries one 0/1 sample per run of `phase_name` (1: some gradient was NaN or Inf)."""
    return f'Health/{phase_name}/nonfinite_grads'


@dataclasses.dataclass(frozen=True)
class Divergence:
    rule:       str     # 'non-finite values', 'non-finite gradients', 'ceiling' or 'loss explosion'.
    message:    str     # What happened, with the numbers, as part of one line for the user.
    name:       Optional[str] = None    # The statistic that triggered the rule, if one did.

    def __str__(self) -> str:
        return self.message


class DivergenceMonitor:
    """The rules of the module docstring over a window of ticks; see there for what each one means."""

    def __init__(self,
        warmup:             int = 3,            # Healthy ticks of a loss before the explosion rule applies to it.
        window:             int = 8,            # The explosion rule compares with the median of this many ticks.
        factor:             float = 1000.0,     # An explosion is a tick mean above factor x that median ...
        floor:              float = 100.0,      # ... and above this absolute value.
        min_bad_steps:      int = 2,            # Fewest runs of a phase with non-finite gradients that stop a run.
        loss_names:         Sequence[str] = LOSS_NAMES,         # Losses whose tick means the explosion rule watches.
        every_tick_names:   Sequence[str] = EVERY_TICK_NAMES,   # Reported every tick: num = 0 means none finite.
        ceilings:           Optional[Mapping[str, float]] = None,   # Statistic -> ceiling of its root mean square
                                                                    # (rule 3); None = CEILINGS.
    ):
        assert 1 <= warmup <= window, 'the history holds `window` ticks, so warmup cannot need more'
        assert factor >= 1 and floor >= 0 and min_bad_steps >= 1
        self.warmup = int(warmup)
        self.window = int(window)
        self.factor = float(factor)
        self.floor = float(floor)
        self.min_bad_steps = int(min_bad_steps)
        self.loss_names = tuple(loss_names)
        self.every_tick_names = tuple(every_tick_names)
        self.ceilings = {name: float(value) for name, value in (CEILINGS if ceilings is None else ceilings).items()}
        self.history: Dict[str, List[float]] = {name: [] for name in self.loss_names}

    def check(self, stats: Mapping[str, Mapping[str, float]]) -> Optional[Divergence]:
        """Decide about one tick; a healthy tick's loss means join the history. `stats` maps names to
        {'num': finite samples, 'mean': their mean, 'std': their standard deviation}; names that are absent were
        not reported and are skipped."""
        divergence = (self._nonfinite_values(stats) or self._nonfinite_gradients(stats) or self._ceilings(stats))
        if divergence is not None:
            return divergence
        means = {}
        for name in self.loss_names:
            if name not in stats or _num(stats[name]) == 0:
                continue
            value = abs(float(stats[name]['mean']))
            if not math.isfinite(value):
                return Divergence('loss explosion', f'{name} exploded: its tick mean overflowed to {value}', name)
            previous = self.history[name]
            if len(previous) >= self.warmup:
                median = statistics.median(previous)
                if value > self.factor * median and value > self.floor:
                    return Divergence('loss explosion', f'{name} exploded: its tick mean {value:.4g} is over '
                                      f'{self.factor:g} times the median {median:.4g} of the previous '
                                      f'{len(previous)} ticks (and over {self.floor:g})', name)
            means[name] = value

        for name, value in means.items():
            self.history[name] = (self.history[name] + [value])[-self.window:]
        return None

    def _nonfinite_values(self, stats) -> Optional[Divergence]:
        # Only statistics reported in every tick: a name that was reported in an earlier tick stays in the
        # Collector with num = 0 for a tick in which it was not reported (the lazy R1 step runs every 16 steps).
        for name in self.every_tick_names:
            if name in stats and _num(stats[name]) == 0:
                return Divergence('non-finite values', f'every {name} value of the tick was NaN or Inf', name)
        return None

    def _nonfinite_gradients(self, stats) -> Optional[Divergence]:
        for name in sorted(stats):
            match = _GRADIENT_FLAG_RE.fullmatch(name)
            if match is None:
                continue
            runs = _num(stats[name])
            bad = int(round(float(stats[name]['mean']) * runs)) if runs > 0 else 0
            if bad >= self.min_bad_steps and 2 * bad > runs:
                return Divergence('non-finite gradients', f'the {match.group(1)} gradients were NaN or Inf in {bad} '
                                  f'of {runs} steps of the tick (more than half)', name)
        return None

    def _ceilings(self, stats) -> Optional[Divergence]:
        for name, ceiling in self.ceilings.items():
            if name not in stats or _num(stats[name]) == 0:
                continue
            level = root_mean_square(stats[name])
            if not level <= ceiling:  # Also true for NaN: a mean that overflowed.
                return Divergence('ceiling', f'{name} is out of range: the root mean square of its '
                                  f'{_num(stats[name])} values in the tick is {level:.4g}, over the ceiling '
                                  f'{ceiling:g} that healthy training stays far below', name)
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


def root_mean_square(entry: Mapping[str, float]) -> float:
    """sqrt(E[x^2]) of one statistic's samples from their mean and (population) standard deviation; inf when the
    mean is not finite (the sum overflowed), NaN for a statistic without samples."""
    mean = float(entry['mean'])
    if not math.isfinite(mean):
        return math.inf if _num(entry) > 0 else math.nan
    std = float(entry.get('std', 0.0))
    std = std if math.isfinite(std) else math.inf
    return math.hypot(mean, std)


def report_end_of_tick(G: torch.nn.Module, G_ema: torch.nn.Module, D: torch.nn.Module, z: Optional[torch.Tensor],
                       c: Optional[torch.Tensor]) -> None:
    """Report the health of the weights at the end of a tick (rule 3): the output range of G and G_ema and D's
    logits of G's images, for the latents `z` and labels `c` (a few fixed ones: the loop passes the first of its
    image grid). Call it on every rank (report0: only rank 0's values count, the others pass z = c = None and
    only register the names), before the tick's statistics are collected.

    Without it a tick whose last step blew the weights up would look healthy (its statistics were computed
    before that step's update) and its snapshot would be written."""
    if z is None:
        for name in END_OF_TICK_NAMES:
            training_stats.report0(name, [])
        return
    for name, values in weight_probe(G, G_ema, D, z, c).items():
        training_stats.report0(name, values)


@torch.no_grad()
def weight_probe(G: torch.nn.Module, G_ema: torch.nn.Module, D: torch.nn.Module, z: torch.Tensor,
                 c: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The values of END_OF_TICK_NAMES for the latents `z` and labels `c`. The networks run in eval mode (G's
    w_avg does not move) with constant noise, so no random number is drawn and training continues bitwise as
    without the probe."""
    modes = [(module, module.training) for module in (G, G_ema, D)]
    try:
        for module, _ in modes:
            module.eval()
        img = G(z=z, c=c, noise_mode='const')
        img_ema = G_ema(z=z, c=c, noise_mode='const')
        logits = D(img, c)
    finally:
        for module, mode in modes:
            module.train(mode)
    return {STAT_END_G_IMG_ABSMAX: image_absmax(img), STAT_END_G_EMA_IMG_ABSMAX: image_absmax(img_ema),
            STAT_END_D_SCORES: logits.float()}


def judge_probe(values: Mapping[str, torch.Tensor], ceilings: Optional[Mapping[str, float]] = None
                ) -> Optional[Divergence]:
    """Rules 1 and 3 over one weight_probe() alone, for a stop between ticks: the tick's statistics are not
    complete there, but the snapshot and training state about to be written must not be those of blown-up
    weights (last-good.json will name them). Touches no history."""
    stats = {}
    for name, value in values.items():
        finite = value.detach().double().flatten()
        finite = finite[torch.isfinite(finite)]
        stats[name] = dict(num=finite.numel(), mean=finite.mean().item() if finite.numel() else math.nan,
                           std=finite.std(unbiased=False).item() if finite.numel() else math.nan)
    monitor = DivergenceMonitor(every_tick_names=tuple(values), ceilings=ceilings)
    return monitor._nonfinite_values(stats) or monitor._ceilings(stats)
