"""The StyleGAN2-ADA training loop: `training_loop(**kwargs)`, called once per process by train.py.

Structure: `_setup` builds a `TrainingState` (data, networks, optimizers, phases, augmentation, logs, and
whatever a resumed run brings back); `_train_step` runs one minibatch through the phases Gmain, Greg, Dmain,
Dreg (lazy regularization), updates G_ema and the ADA probability; `_maintenance` runs once per tick (status
line, divergence check, image grids, snapshots, training state, statistics). What goes into the run directory,
and how, is training/run_files.py's.

Exact resume: every step reseeds the global generators from (random_seed, rank, step), the data stream is a
pure function of the number of images seen (misc.InfiniteSampler), and the training state stores everything
else that evolves (networks, optimizer moments, ADA p and its pending statistics, the path-length mean,
counters). A run resumed from a state therefore continues bitwise like the uninterrupted run on the CPU.
"""

import contextlib
import copy
import dataclasses
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import compiler, misc, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
from training import checkpoint, dataset, health, preemption, run_files, snapshot_io, transfer, weights_only
from training.augment import AdaController
from training.loss import phase_plan

# The class of ADA's controller, built by name like every other component of a run. It is not an option of
# the run (the recorded options and training_options.json stay as they are); the controller's settings are.
ADA_CONTROLLER_CLASS = 'training.augment.AdaController'


class TrainingStopped(RuntimeError):
    """An error ended the run; the message is one line for the user (what, where, what is intact). The cause
    (with its traceback) is chained as __cause__."""


class TrainingDiverged(TrainingStopped):
    """Training diverged: non-finite weights, or a rule of training.health.DivergenceMonitor (non-finite values
    or gradients, a ceiling, a loss explosion) fired at a tick."""

# ----------------------------------------------------------------------------
# The state of a run.


@dataclasses.dataclass
class PhaseRuntime:
    name:       str
    network:    str             # Name of the trained network ('G', 'D'): its optimizer's key in the state.
    module:     torch.nn.Module
    opt:        torch.optim.Optimizer
    interval:   int
    timer:      Any = None      # _PhaseTimer of the phase's last run (reported as Timing/<name>).


class _PhaseTimer:
    """Milliseconds of one phase run, as the official Timing/<phase> statistic: CUDA events on a GPU (read at
    the next tick, so timing never stalls the stream), the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.start_event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.end_event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.start_time = self.end_time = None

    def start(self) -> None:
        if self.cuda:
            self.start_event.record(torch.cuda.current_stream())
        self.start_time = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record(torch.cuda.current_stream())
        self.end_time = time.perf_counter()

    def elapsed_ms(self) -> Optional[float]:
        if self.end_time is None:
            return None
        if self.cuda:
            self.end_event.synchronize()
            return self.start_event.elapsed_time(self.end_event)
        return (self.end_time - self.start_time) * 1000


@dataclasses.dataclass
class Progress:
    """The counters of a run: what the training state stores besides its components' own states."""
    cur_nimg:           int = 0     # Images shown to D so far.
    cur_tick:           int = 0     # Completed ticks.
    batch_idx:          int = 0     # Training steps so far (the per-step seed and the lazy phases use it).
    tick_start_nimg:    int = 0     # cur_nimg at the start of the current tick.
    between_ticks:      bool = False    # Saved by a stop: cur_tick is the tick in progress, not the one just done.

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.cur_nimg = state['cur_nimg']
        self.batch_idx = state['batch_idx']
        if state.get('between_ticks', False):
            # A stop: the resumed run finishes the tick the stopped one was in, at the same boundary.
            self.cur_tick = state['cur_tick']
            self.tick_start_nimg = state['tick_start_nimg']
        else:
            # Saved at a tick, which was complete: the resumed run starts the next one where the saved run stopped.
            self.cur_tick = state['cur_tick'] + 1
            self.tick_start_nimg = state['cur_nimg']
        self.between_ticks = False


@dataclasses.dataclass
class Data:
    """The training data of this process."""
    training_set:   Any
    iterator:       Iterator        # Minibatches of this rank, endless (misc.InfiniteSampler).


@dataclasses.dataclass
class Networks:
    """The networks of a run: what a snapshot holds and the training state's `networks` group."""
    G:              torch.nn.Module
    D:              torch.nn.Module
    G_ema:          torch.nn.Module
    augment_pipe:   Optional[torch.nn.Module]

    def by_name(self) -> Dict[str, Optional[torch.nn.Module]]:
        # Not dataclasses.asdict, which would deep-copy the modules.
        return dict(G=self.G, D=self.D, G_ema=self.G_ema, augment_pipe=self.augment_pipe)


@dataclasses.dataclass
class Optimization:
    """What a training step runs on the networks."""
    loss:           Any                         # training.loss.Loss: gradients of each phase.
    phases:         List[PhaseRuntime]          # Gmain, Greg, Dmain, Dreg (or G/Dboth), with their optimizers.
    ada:            Optional[AdaController]     # Adjusts the augmentation probability; None = fixed p.
    rank_losses:    Optional[list] = None       # Every rank's loss.state_dict() at the last training state.


@dataclasses.dataclass
class Health:
    """The divergence check of every tick (training/health.py)."""
    stats:          Any = dataclasses.field(default_factory=lambda: training_stats.Collector(
                        regex=health.STATS_REGEX, keep_previous=False))     # What the monitor reads.
    monitor:        Any = dataclasses.field(default_factory=health.DivergenceMonitor)   # In the training state.


@dataclasses.dataclass
class Timing:
    """Wall-clock times of this process (time.time()), for the status line and the Timing/ statistics."""
    start:          float = 0.0     # When training began.
    tick_start:     float = 0.0     # When the current tick began.
    maintenance:    float = 0.0     # Seconds the last tick's maintenance took.


@dataclasses.dataclass
class ImageGrid:
    """The fixed latents of the fakes*.png grids (rank 0), which the end-of-tick health probe also uses."""
    size:           Tuple[int, int]     # (columns, rows).
    z:              torch.Tensor
    c:              torch.Tensor


@dataclasses.dataclass
class Stop:
    """A stop asked for by a signal (training/preemption.py)."""
    request:        Any = None              # preemption.StopRequest: signals received, shared launcher flag.
    signal:         Optional[str] = None    # Name of the signal that stopped the run ('SIGTERM'), if one did.
    tick_stats:     Optional[dict] = None   # At a stop: the statistics of the tick in progress (_TickStats).


@dataclasses.dataclass
class TrainingState:
    """What one process of a run holds, by component: its options, the runtime objects, the persisted
    progress, and the record of the files it wrote."""
    opts:           dnnlib.EasyDict     # The training_loop kwargs.
    device:         torch.device
    rank:           int
    data:           Data
    nets:           Networks
    optim:          Optional[Optimization] = None   # Built after the weights are final (resumed, broadcast).
    progress:       Progress = dataclasses.field(default_factory=Progress)
    stats:          Any = dataclasses.field(default_factory=lambda: training_stats.Collector(regex='.*'))  # The log's.
    health:         Health = dataclasses.field(default_factory=Health)
    timing:         Timing = dataclasses.field(default_factory=Timing)
    grid:           Optional[ImageGrid] = None      # Rank 0 only.
    files:          Optional[run_files.RunFiles] = None
    stop:           Stop = dataclasses.field(default_factory=Stop)
    metric_fn:      Optional[Callable] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)

# ----------------------------------------------------------------------------
# Setup.


def _step_seed(random_seed: int, rank: int, batch_idx: int, purpose: int = 0) -> int:
    """A seed that depends only on (seed, rank, step): purpose 0 = training steps, 1 = setup."""
    return int(np.random.SeedSequence([random_seed, rank, batch_idx, purpose]).generate_state(1)[0])


@contextlib.contextmanager
def _torch_settings(opts, device: torch.device) -> Iterator[None]:
    """The global switches training needs, restored afterwards (also on errors), so that a process which
    trains and then does something else (tests, notebooks) is left as it was."""
    saved = (conv2d_gradfix.enabled, grid_sample_gradfix.enabled, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = opts.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = opts.allow_tf32
            torch.backends.cudnn.allow_tf32 = opts.allow_tf32
        # Our conv/grid_sample wrappers: weight gradients can be skipped in the regularization passes.
        conv2d_gradfix.enabled = True
        grid_sample_gradfix.enabled = True
        yield
    finally:
        (conv2d_gradfix.enabled, grid_sample_gradfix.enabled, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


def _load_data(opts, rank: int, start_nimg: int, device: torch.device):
    training_set = dnnlib.util.construct_class_by_name(**opts.training_set_kwargs)
    sampler = misc.InfiniteSampler(dataset=training_set, rank=rank, num_replicas=opts.num_gpus,
                                   seed=opts.random_seed, start_index=start_nimg)
    kwargs = dataset.loader_kwargs_on(opts.data_loader_kwargs, device)  # Forked workers on Linux (see there).
    loader = torch.utils.data.DataLoader(dataset=training_set, sampler=sampler,
                                         batch_size=opts.batch_size // opts.num_gpus, **kwargs)
    # The workers start here, once per run (the sampler never ends an epoch), and must survive the stop signals
    # a scheduler sends to every process of the job: they start with them blocked (training/preemption.py).
    spawning = kwargs.get('num_workers', 0) > 0 and kwargs.get('multiprocessing_context') != 'fork'
    with preemption.holding_stop_signals(spawning=spawning):
        return training_set, iter(loader)


def _build_networks(opts, training_set, device):
    common = dict(c_dim=training_set.label_dim, img_resolution=training_set.resolution,
                  img_channels=training_set.num_channels)
    G = dnnlib.util.construct_class_by_name(**opts.G_kwargs, **common).train().requires_grad_(False).to(device)
    D = dnnlib.util.construct_class_by_name(**opts.D_kwargs, **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = None
    if opts.augment_kwargs is not None:
        augment_pipe = dnnlib.util.construct_class_by_name(**opts.augment_kwargs).train().requires_grad_(False)
        augment_pipe = augment_pipe.to(device)
        augment_pipe.p.copy_(torch.as_tensor(opts.augment_p))
    return G, D, G_ema, augment_pipe


def _resume_from_pkl(state: TrainingState, resume_pkl: str) -> None:
    """Official --resume: a new run from the weights of a snapshot (fine-tuning); counters and optimizers start
    fresh. Tensors are copied where name and shape match, so the snapshot may have another architecture
    (skip -> squeeze, squeeze r=8 -> r=4, unconditional -> conditional); the rest keep their fresh values, and
    a transfer report says which."""
    state.log(f'Resuming from "{resume_pkl}"')
    with dnnlib.util.open_url(resume_pkl) as f:
        resume_data = snapshot_io.load_network_pkl(f)
    reports = {}
    for name in ('G', 'D', 'G_ema'):
        if isinstance(resume_data.get(name), torch.nn.Module):
            reports[name] = transfer.transfer_params_and_buffers(resume_data[name], getattr(state.nets, name))
    for name, report in reports.items():
        if name == 'G_ema' and reports.get('G') == report:
            state.log('G_ema: as G')
        else:
            state.log('\n'.join(transfer.format_report(name, report)))


def _broadcast_weights(state: TrainingState) -> None:
    """Make every rank start from rank 0's weights. Gradients are averaged by `_reduce_gradients`, not by DDP
    wrappers: a parameter that a phase does not use (a decoder outside the phases of its regularizer) then
    simply has no gradient on any rank, with no unused-parameter search and no zero-weighted dummy terms."""
    if state.opts.num_gpus == 1:
        return
    for module in state.nets.by_name().values():
        if module is not None:
            for tensor in misc.params_and_buffers(module):
                torch.distributed.broadcast(tensor, src=0)


def _build_phases(opts, networks: dict) -> List[PhaseRuntime]:
    """The phases of every trained network (the loss names them) and one optimizer per network, with settings
    from `<name>_opt_kwargs` and lazy regularization from `<name>_reg_interval`."""
    phases = []
    for name, module in networks.items():
        if not any(True for _ in module.parameters()):
            raise ValueError(f'The loss trains {name}, which has no parameters')
        plan = phase_plan(name, opts[f'{name}_reg_interval'], opts[f'{name}_opt_kwargs'])
        opt_kwargs = dict(plan[0].opt_kwargs)
        if opt_kwargs.get('class_name') == 'torch.optim.Adam':
            # StyleGAN's betas unless given, as floats: torch's Adam rejects a mix of int and float (SPEC §4).
            opt_kwargs['betas'] = tuple(float(b) for b in opt_kwargs.get('betas', (0.0, 0.99)))
        opt = dnnlib.util.construct_class_by_name(params=module.parameters(), **opt_kwargs)
        phases += [PhaseRuntime(phase.name, name, module, opt, phase.interval) for phase in plan]
    return phases


@torch.no_grad()
def _print_module_summaries(state: TrainingState) -> None:
    """The official per-layer tables of G and D (parameters, buffers, output shapes), one forward pass each.
    They show what a configuration builds, e.g. the squeeze generator's extra layers and its num_ws. Run in
    eval mode, so the summary pass does not move G's w_avg."""
    G, D, device = state.nets.G, state.nets.D, state.device
    n = max(1, min(state.opts.batch_gpu, 4))
    z = torch.zeros([n, G.z_dim], device=device)
    c = torch.zeros([n, G.c_dim], device=device)
    was_training = G.training, D.training
    G.eval()
    D.eval()
    try:
        img = misc.print_module_summary(G, [z, c])
        misc.print_module_summary(D, [img, c])
    finally:
        G.train(was_training[0])
        D.train(was_training[1])


def _setup(opts, rank: int, device: torch.device) -> TrainingState:
    resume_record = checkpoint.load_training_state(opts.resume_state) if opts.resume_state else None
    progress = resume_record['progress'] if resume_record else dict(cur_nimg=0, cur_tick=0, batch_idx=0,
                                                                     tick_start_nimg=0)
    misc.set_random_seed(_step_seed(opts.random_seed, rank, 0, purpose=1))
    training_set, data_iterator = _load_data(opts, rank, start_nimg=progress['cur_nimg'], device=device)
    G, D, G_ema, augment_pipe = _build_networks(opts, training_set, device)
    state = TrainingState(opts=opts, device=device, rank=rank, data=Data(training_set, data_iterator),
                          nets=Networks(G, D, G_ema, augment_pipe),
                          files=run_files.RunFiles(opts.run_dir, is_main=rank == 0))
    if rank == 0:
        _print_setup(state)
        _print_module_summaries(state)
    if opts.resume_pkl is not None and resume_record is None and rank == 0:
        _resume_from_pkl(state, opts.resume_pkl)

    _broadcast_weights(state)
    loss = dnnlib.util.construct_class_by_name(device=device, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                                               augment_pipe=augment_pipe, **opts.loss_kwargs)
    if opts.get('compile'):
        # The loss holds compiled wrappers; G, D and G_ema stay the plain modules that snapshots pickle.
        loss.compile_networks(lambda module: compiler.compile_module(module, device))
    phases = _build_phases(opts, {name: getattr(state.nets, name) for name in loss.trained_networks})
    ada = None
    if opts.ada_target is not None and augment_pipe is not None:
        ada = dnnlib.util.construct_class_by_name(class_name=ADA_CONTROLLER_CLASS, augment_pipe=augment_pipe,
                                                  target=opts.ada_target, interval=opts.ada_interval,
                                                  kimg=opts.ada_kimg, batch_size=opts.batch_size)
    state.optim = Optimization(loss, phases, ada)
    if resume_record is not None:
        _restore_state(state, resume_record)
    _setup_logs(state)
    return state


def _print_setup(state: TrainingState) -> None:
    ts, G, D = state.data.training_set, state.nets.G, state.nets.D
    print(f'Training data: {ts.name}, {len(ts)} images, shape {list(ts.image_shape)}, label dim {ts.label_dim}')
    print(f'Generator: {sum(p.numel() for p in G.parameters()):,} parameters, '
          f'num_ws {G.num_ws}, architecture {getattr(G.synthesis, "architecture", "?")}')
    decoder = getattr(D, 'decoder', None)  # GGDR/GLeaD: not run by the module summary's D pass.
    decoder_note = f' (decoder: {sum(p.numel() for p in decoder.parameters()):,})' if decoder is not None else ''
    print(f'Discriminator: {sum(p.numel() for p in D.parameters()):,} parameters{decoder_note}')
    print(f'Device: {state.device}, processes: {state.opts.num_gpus}', flush=True)

# ----------------------------------------------------------------------------
# Training state (exact resume).


def _checkpoint_io(state: TrainingState) -> checkpoint.CheckpointIO:
    """The components of the training state (checkpoint.py's docstring has the layout). A network's
    optimizer is stored under the network's name; the loss brings its own state (the path-length mean)."""
    return checkpoint.CheckpointIO(
        progress    = state.progress,
        networks    = state.nets.by_name(),
        optimizers  = {phase.network: phase.opt for phase in state.optim.phases},  # Main and reg share one.
        loss        = state.optim.loss,
        loss_ranks  = _RankLosses(state),       # Several processes only; after `loss`, which it refines.
        ada         = state.optim.ada,
        health      = state.health.monitor,     # States from before it existed start a new warmup.
        tick_stats  = _TickStats(state),        # None except in a state written by a stop.
        rng         = checkpoint.RngState(),    # Last: restoring the others draws no random numbers after it.
    )


class _RankLosses:
    """Every rank's running values of the loss (the path-length mean, the D terms' state), as a checkpoint
    component: each rank's path-length mean follows its own images, so a resumed rank must get its own back, not
    rank 0's (which `loss` holds), for the resumed run to be the uninterrupted one with several processes.
    Gathered on every rank before a state is written (a collective); None with one process. A state written by
    another number of processes (or before this existed) leaves every rank with rank 0's values."""

    def __init__(self, state: TrainingState):
        self.state = state

    def state_dict(self) -> Optional[list]:
        return self.state.optim.rank_losses

    def load_state_dict(self, saved: list) -> None:
        if len(saved) == self.state.opts.num_gpus:
            self.state.optim.loss.load_state_dict(saved[self.state.rank])


def _gather_rank_losses(state: TrainingState) -> None:
    if state.opts.num_gpus > 1:
        gathered = [None] * state.opts.num_gpus
        torch.distributed.all_gather_object(gathered, state.optim.loss.state_dict())
        state.optim.rank_losses = gathered


class _TickStats:
    """The statistics of the tick in progress, as a checkpoint component: a stop writes them (taken on every
    rank by `_stop`, since taking them is a collective), so that the resumed run's record of that tick holds what
    the uninterrupted run's would (the same names; the same values, except timings and rounding). States written
    at a tick hold None: their tick is complete and recorded."""

    def __init__(self, state: TrainingState):
        self.state = state

    def state_dict(self) -> Optional[dict]:
        return self.state.stop.tick_stats

    def load_state_dict(self, saved: dict) -> None:
        self.state.stats.load_state_dict(saved['log'])
        self.state.health.stats.load_state_dict(saved['health'])


def _state_record(state: TrainingState) -> dict:
    return dict(options=weights_only.to_plain(dict(state.opts), 'options'), **_checkpoint_io(state).state_dict())


def _restore_state(state: TrainingState, record: dict) -> None:
    _checkpoint_io(state).load_state_dict(record)
    state.log(f'Resumed the training state at {state.progress.cur_nimg / 1000:.1f} kimg '
              f'(tick {record["progress"]["cur_tick"]})')

# ----------------------------------------------------------------------------
# Logs and grids.


def _setup_logs(state: TrainingState) -> None:
    """Rank 0: stats.jsonl, the latents of the image grids and, in a new run, reals.png and fakes_init.png."""
    opts = state.opts
    if not state.is_main:
        return
    state.files.open_stats(resumed_nimg=state.progress.cur_nimg if opts.resume_state is not None else None)
    grid_size, images, labels = run_files.setup_snapshot_image_grid(state.data.training_set, opts.random_seed,
                                                                    max_size=tuple(opts.image_grid_max))
    grid_z = torch.randn([labels.shape[0], state.nets.G.z_dim], device=state.device,
                         generator=torch.Generator(state.device).manual_seed(opts.random_seed))
    state.grid = ImageGrid(size=grid_size, z=grid_z, c=torch.from_numpy(labels).to(state.device))
    if opts.resume_state is None:
        state.files.write_image_grid('reals.png', images, drange=[0, 255], grid_size=grid_size)
        state.files.write_image_grid('fakes_init.png', _grid_fakes(state), drange=[-1, 1], grid_size=grid_size)


@torch.no_grad()
def _grid_fakes(state: TrainingState) -> np.ndarray:
    batch = max(state.opts.batch_gpu, 1)
    images = [state.nets.G_ema(z=z, c=c, noise_mode='const').cpu()
              for z, c in zip(state.grid.z.split(batch), state.grid.c.split(batch), strict=True)]
    return torch.cat(images).numpy()

# ----------------------------------------------------------------------------
# One training step.


def _fetch_batch(state: TrainingState):
    opts = state.opts
    real_img, real_c = next(state.data.iterator)
    real_img = (real_img.to(state.device).to(torch.float32) / 127.5 - 1).split(opts.batch_gpu)
    real_c = real_c.to(state.device).split(opts.batch_gpu)
    num_phases = len(state.optim.phases)
    gen_z = torch.randn([num_phases * opts.batch_size, state.nets.G.z_dim], device=state.device)
    gen_z = [z.split(opts.batch_gpu) for z in gen_z.split(opts.batch_size)]
    ts = state.data.training_set
    gen_c = [ts.get_label(np.random.randint(len(ts))) for _ in range(num_phases * opts.batch_size)]
    gen_c = torch.from_numpy(np.stack(gen_c)).to(state.device)
    gen_c = [c.split(opts.batch_gpu) for c in gen_c.split(opts.batch_size)]
    return real_img, real_c, gen_z, gen_c


def _run_phase(state: TrainingState, phase: PhaseRuntime, real_img, real_c, gen_z, gen_c) -> None:
    opts = state.opts
    num_rounds = opts.batch_size // (opts.batch_gpu * opts.num_gpus)
    if phase.timer is None:
        phase.timer = _PhaseTimer(state.device)
    phase.timer.start()
    phase.opt.zero_grad(set_to_none=True)
    phase.module.requires_grad_(True)
    rounds = zip(real_img, real_c, gen_z, gen_c, strict=False)
    # A phase run every `interval` steps is weighted by `interval`, so that it has its full effect on average.
    # Each round's loss is a mean over its images; dividing by the number of rounds makes the accumulated
    # gradient the mean over the whole batch, so --batch-gpu changes memory use and not the step (the official
    # loop sums the round means, which only Adam's scale invariance hides).
    gain = phase.interval / num_rounds
    for r_img, r_c, g_z, g_c in rounds:
        state.optim.loss.accumulate_gradients(phase=phase.name, real_img=r_img, real_c=r_c, gen_z=g_z, gen_c=g_c,
                                              gain=gain)
    phase.module.requires_grad_(False)
    with torch.autograd.profiler.record_function(phase.name + '_opt'):
        params = [param for param in phase.module.parameters() if param.grad is not None]
        _reduce_gradients(params, opts.num_gpus)
        grads = [param.grad for param in params]
        if grads:
            # One 0/1 device tensor per phase run, read at the tick (health.DivergenceMonitor decides there), so
            # that the check costs no host sync. Rank 0's flag speaks for all: the gradients are averaged by now.
            flag = []
            if state.is_main:
                flag = torch.stack([torch.isfinite(grad).all() for grad in grads]).all().logical_not().float()
            training_stats.report0(health.nonfinite_grads_name(phase.name), flag)
        for grad in grads:
            # One bad batch (an fp16 overflow, say) must not poison the weights: zero NaNs, bound Infs.
            torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)
        phase.opt.step()
    phase.timer.stop()


def _reduce_gradients(params: List[torch.nn.Parameter], num_gpus: int) -> None:
    """Average the gradients over the ranks, in one all-reduce of their concatenation (as StyleGAN3 does).
    Every rank runs the same phases on the same networks, so all ranks hold gradients for the same
    parameters, in the same order."""
    if num_gpus == 1 or not params:
        return
    flat = torch.cat([param.grad.flatten() for param in params])
    torch.distributed.all_reduce(flat)
    flat /= num_gpus
    for param, grad in zip(params, flat.split([param.numel() for param in params]), strict=True):
        param.grad.copy_(grad.reshape(param.shape))


@torch.no_grad()
def _update_ema(state: TrainingState) -> None:
    opts, G, G_ema = state.opts, state.nets.G, state.nets.G_ema
    ema_nimg = opts.ema_kimg * 1000
    if opts.ema_rampup is not None:
        ema_nimg = min(ema_nimg, state.progress.cur_nimg * opts.ema_rampup)
    ema_beta = 0.5 ** (opts.batch_size / max(ema_nimg, 1e-8))
    for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
        p_ema.copy_(p.lerp(p_ema, ema_beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers(), strict=True):
        b_ema.copy_(b)


def _train_step(state: TrainingState) -> None:
    progress = state.progress
    misc.set_random_seed(_step_seed(state.opts.random_seed, state.rank, progress.batch_idx))
    with torch.autograd.profiler.record_function('data_fetch'):
        real_img, real_c, all_gen_z, all_gen_c = _fetch_batch(state)
    for phase, gen_z, gen_c in zip(state.optim.phases, all_gen_z, all_gen_c, strict=True):
        if progress.batch_idx % phase.interval == 0:
            _run_phase(state, phase, real_img, real_c, gen_z, gen_c)
    _update_ema(state)
    progress.cur_nimg += state.opts.batch_size
    progress.batch_idx += 1
    if state.optim.ada is not None:
        state.optim.ada.step(progress.batch_idx)

# ----------------------------------------------------------------------------
# Maintenance, once per tick.


def _report_progress(state: TrainingState, tick_end_time: float) -> str:
    progress, timing, augment_pipe = state.progress, state.timing, state.nets.augment_pipe
    total_sec = tick_end_time - timing.start
    tick_time = tick_end_time - timing.tick_start
    tick_kimg = (progress.cur_nimg - progress.tick_start_nimg) / 1000
    cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2 ** 30
    gpu_mem = torch.cuda.max_memory_allocated(state.device) / 2 ** 30 if state.device.type == 'cuda' else 0.0
    augment_p = float(augment_pipe.p.cpu()) if augment_pipe is not None else 0.0
    fields = [
        ('tick', training_stats.report0('Progress/tick', progress.cur_tick), '{:<5d}'),
        ('kimg', training_stats.report0('Progress/kimg', progress.cur_nimg / 1000), '{:<8.1f}'),
        ('time', dnnlib.util.format_time(training_stats.report0('Timing/total_sec', total_sec)), '{:<12s}'),
        ('sec/tick', training_stats.report0('Timing/sec_per_tick', tick_time), '{:<7.1f}'),
        ('sec/kimg', training_stats.report0('Timing/sec_per_kimg', tick_time / max(tick_kimg, 1e-8)), '{:<7.2f}'),
        ('maintenance', training_stats.report0('Timing/maintenance_sec', timing.maintenance), '{:<6.1f}'),
        ('cpumem', training_stats.report0('Resources/cpu_mem_gb', cpu_mem), '{:<6.2f}'),
        ('gpumem', training_stats.report0('Resources/peak_gpu_mem_gb', gpu_mem), '{:<6.2f}'),
        ('augment', training_stats.report0('Progress/augment', augment_p), '{:.3f}'),
    ]
    gpu_reserved = torch.cuda.max_memory_reserved(state.device) / 2 ** 30 if state.device.type == 'cuda' else 0.0
    training_stats.report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved)
    training_stats.report0('Timing/total_hours', total_sec / 3600)
    training_stats.report0('Timing/total_days', total_sec / (24 * 3600))
    for phase in state.optim.phases:
        elapsed = phase.timer.elapsed_ms() if phase.timer is not None else None
        if elapsed is not None:
            training_stats.report0(f'Timing/{phase.name}', elapsed)
    if state.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(state.device)
    return ' '.join(f'{name} {fmt.format(value)}' for name, value, fmt in fields).rstrip()


def _check_health(state: TrainingState) -> None:
    """Stop the run before anything of this tick is written when it has diverged: non-finite weights (or
    buffers), or a rule of health.DivergenceMonitor over the tick's statistics (non-finite values or gradients,
    the absolute ceilings on the losses, D's logits, G's output range and the R1 term, a loss explosion),
    including those of the weights at the end of the tick (health.report_end_of_tick). Judging the tick before
    its snapshot and training state are written is what makes every written file a good one: the single
    training-state.pt is never replaced by the state of a bad tick. The monitor's history goes into the
    training state, so a resumed run decides the same."""
    nets = state.nets
    if state.is_main:
        count = min(health.END_OF_TICK_IMAGES, max(state.opts.batch_gpu, 1), len(state.grid.z))
        health.report_end_of_tick(nets.G, nets.G_ema, nets.D, state.grid.z[:count], state.grid.c[:count])
    else:
        health.report_end_of_tick(nets.G, nets.G_ema, nets.D, None, None)
    state.health.stats.update()  # A collective: every rank takes part before any of them can stop.
    for net_name in ('G', 'D'):
        bad = _first_nonfinite_tensor(getattr(nets, net_name))
        if bad is not None:
            raise TrainingDiverged(_divergence_message(state, f'{net_name} has non-finite weights ({bad})'))
    divergence = state.health.monitor.check(state.health.stats.as_dict())
    if divergence is not None:
        raise TrainingDiverged(_divergence_message(state, divergence.message, divergence.name))


def _first_nonfinite_tensor(module: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter or buffer of `module` that holds a NaN or Inf, None if there is none.
    One host sync for the whole module; the names are looked up only when something is wrong."""
    tensors = [(name, t) for name, t in misc.named_params_and_buffers(module) if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return None
    return next(name for name, t in tensors if not torch.isfinite(t).all())


def _divergence_message(state: TrainingState, what: str, stat_name: Optional[str] = None) -> str:
    """One line: the bad tick, the rule and its numbers, the last good files and how to go on from them. It ends
    without a period: train.py appends where the log is."""
    if stat_name in health.R1_NAMES:
        advice = 'a smaller --gamma (the R1 weight)'
    else:
        advice = 'lower learning rates (--glr, --dlr), a larger --gamma, or --fp32'
    return (f'Training diverged at {state.progress.cur_nimg / 1000:.1f} kimg: {what} (tick {state.progress.cur_tick}). '
            f'Nothing was written for this tick; {state.files.last_good_files(advice, state.opts.resume_state)}')


def _save_snapshots(state: TrainingState, done: bool) -> None:
    opts, cur_tick = state.opts, state.progress.cur_tick
    tag = run_files.snapshot_tag(state.progress.cur_nimg, opts.kimg_per_tick, opts.total_kimg)
    if state.is_main and opts.image_snapshot_ticks and (done or cur_tick % opts.image_snapshot_ticks == 0):
        state.files.write_image_grid(f'fakes{tag}.png', _grid_fakes(state), drange=[-1, 1], grid_size=state.grid.size)
    stopping = state.stop.signal is not None  # A stop at the end of a tick: _stop writes the state after it.
    snapshot_due = bool(opts.network_snapshot_ticks) and (done or cur_tick % opts.network_snapshot_ticks == 0)
    if not snapshot_due:
        if _state_due(state):
            _write_training_state(state)
        return
    path, snapshot = _write_network_snapshot(state, tag)
    _write_training_state(state)
    if opts.metrics and state.metric_fn is not None and not stopping:  # A stop must not wait for metrics.
        # Rank 0 evaluates the copy it just saved; the others make their own.
        G_ema = snapshot['G_ema'] if state.is_main else _snapshot_copy(state.nets.G_ema)
        _evaluate_metrics(state, G_ema, path)


def _write_network_snapshot(state: TrainingState, tag: str):
    """network-snapshot-<tag>.pkl (rank 0 writes; every rank checks that the ranks agree): (path, what rank 0
    wrote, None on the others)."""
    opts = state.opts
    modules = state.nets.by_name()
    if opts.num_gpus > 1:
        for module in modules.values():
            if module is not None:
                misc.check_ddp_consistency(module, ignore_regex=r'.*\.[^.]+_(avg|ema)')
    snapshot = None
    if state.is_main:
        snapshot = dict(training_set_kwargs=dict(opts.training_set_kwargs))
        snapshot.update({name: _snapshot_copy(module) for name, module in modules.items()})
    return state.files.write_network_snapshot(snapshot, tag, state.progress.cur_nimg), snapshot


def _stop(state: TrainingState) -> None:
    """After the step at which the ranks agreed to stop (training/preemption.py): the training state and, with
    --stop-snapshot, a network snapshot. A stop is not a tick: no status line, record or image grid, and the
    state keeps the tick in progress (Progress.between_ticks) with its statistics so far (_TickStats), so that
    the resumed run ends that tick at the same image count as the uninterrupted run, with the same record."""
    opts, progress = state.opts, state.progress
    if state.optim.ada is not None:
        state.optim.ada.flush()  # The pending D signs into the state (counts and sums of +-1: exact in any order).
    if progress.cur_nimg != progress.tick_start_nimg:
        _check_weights_at_stop(state)  # A stop at a tick's end comes after that tick's _check_health.
    # Collectives, so on every rank; only rank 0 writes them.
    state.stop.tick_stats = dict(log=state.stats.state_dict(), health=state.health.stats.state_dict())
    with _stop_when_disk_full(state):
        tag = run_files.snapshot_tag(progress.cur_nimg, opts.kimg_per_tick, opts.total_kimg)
        if opts.stop_snapshot and state.files.last_snapshot_nimg != progress.cur_nimg:  # Not if the tick wrote one.
            _write_network_snapshot(state, tag)
        progress.between_ticks = True
        try:
            _write_training_state(state)
        finally:
            progress.between_ticks = False


def _check_weights_at_stop(state: TrainingState) -> None:
    """Before a stop between ticks writes its snapshot and state (which last-good.json will name): the weights
    are finite and the end-of-tick probe is within the ceilings (health.judge_probe); the tick's statistics
    are judged when the resumed run ends the tick. Rank 0 probes, every rank learns the verdict."""
    nets, problem = state.nets, None
    for net_name in ('G', 'D'):
        bad = _first_nonfinite_tensor(getattr(nets, net_name))
        if bad is not None:
            problem = (f'{net_name} has non-finite weights ({bad})', None)
            break
    if problem is None and state.is_main:
        count = min(health.END_OF_TICK_IMAGES, max(state.opts.batch_gpu, 1), len(state.grid.z))
        values = health.weight_probe(nets.G, nets.G_ema, nets.D, state.grid.z[:count], state.grid.c[:count])
        divergence = health.judge_probe(values)
        if divergence is not None:
            problem = (f'at the stop, {divergence.message}', divergence.name)
    if state.opts.num_gpus > 1:
        if preemption.max_over_ranks(problem is not None, state.device) and problem is None:
            problem = ('rank 0 found the weights out of range at the stop', None)
    if problem is not None:
        raise TrainingDiverged(_divergence_message(state, *problem))


def _state_due(state: TrainingState) -> bool:
    """Whether `--state-kimg` asks for a training state at this tick (independent of the snapshot interval,
    so that a long --snap does not mean a long window of lost work)."""
    interval = state.opts.state_kimg
    return interval is not None and state.progress.cur_nimg >= state.files.last_state_nimg + interval * 1000


def _write_training_state(state: TrainingState) -> None:
    """training-state.pt, named in last-good.json: _check_health passed this tick before anything was written.
    Every rank calls it (the ranks' loss values are gathered); rank 0 writes."""
    _gather_rank_losses(state)
    state.files.write_training_state(lambda: _state_record(state), state.progress.cur_nimg, state.progress.cur_tick)


def _snapshot_copy(module):
    """What a snapshot holds: an eval-mode copy on the CPU without gradients (None stays None)."""
    return None if module is None else copy.deepcopy(module).eval().requires_grad_(False).cpu()


def _evaluate_metrics(state: TrainingState, G_ema, snapshot_pkl: str) -> None:
    """Every rank takes part (the work is sharded); rank 0 appends metric-<name>.jsonl and the results also go
    into stats.jsonl / TensorBoard as Metrics/<name>."""
    opts = state.opts
    state.log(f'Evaluating metrics {", ".join(opts.metrics)}...')
    results = state.metric_fn(metrics=opts.metrics, G_ema=G_ema.to(state.device),
                              dataset_kwargs=dict(opts.training_set_kwargs), num_gpus=opts.num_gpus, rank=state.rank,
                              device=state.device, run_dir=opts.run_dir, snapshot_pkl=snapshot_pkl,
                              detector_dir=opts.detector_dir)
    for result in results or []:
        for name, value in result['results'].items():
            training_stats.report0(f'Metrics/{name}', value)


def _write_stats(state: TrainingState) -> None:
    state.stats.update()  # A collective.
    if state.is_main:
        state.files.write_stats(state.stats.as_dict(), state.progress.cur_nimg, start_time=state.timing.start)


@contextlib.contextmanager
def _stop_when_disk_full(state: TrainingState) -> Iterator[None]:
    """Turn a full disk while writing a tick's files (image grid, snapshot, training state) into one line that
    names the file and says what is intact (run_files.RunFiles.full_disk_message). Only rank 0 writes."""
    if not state.is_main:
        yield
        return
    saved_before = state.files.saved_files()
    try:
        yield
    except OSError as e:
        if not run_files.is_disk_full(e):
            raise
        raise TrainingStopped(state.files.full_disk_message(e, saved_before)) from e


def _maintenance(state: TrainingState, done: bool) -> None:
    progress, timing = state.progress, state.timing
    tick_end_time = time.time()
    status = _report_progress(state, tick_end_time)
    state.log(status)
    _check_health(state)
    if state.optim.ada is not None:
        # Move the pending D signs into the ADA controller, so that the training state written below holds
        # them. A collective; every tick, so the flush points of a straight and a resumed run are the same.
        state.optim.ada.flush()
    with _stop_when_disk_full(state):
        _save_snapshots(state, done)
    _write_stats(state)
    progress.cur_tick += 1
    progress.tick_start_nimg = progress.cur_nimg
    timing.tick_start = time.time()
    timing.maintenance = timing.tick_start - tick_end_time

# ----------------------------------------------------------------------------


def training_loop(
    run_dir                 = '.',      # Output directory.
    training_set_kwargs     = None,     # Options for the training set.
    data_loader_kwargs      = None,     # Options for torch.utils.data.DataLoader.
    G_kwargs                = None,     # Options for the generator network.
    D_kwargs                = None,     # Options for the discriminator network.
    G_opt_kwargs            = None,     # Options for the generator optimizer.
    D_opt_kwargs            = None,     # Options for the discriminator optimizer.
    augment_kwargs          = None,     # Options for the augmentation pipeline, None = disable.
    loss_kwargs             = None,     # Options for the loss function.
    metrics                 = (),       # Metrics to evaluate at snapshots.
    random_seed             = 0,        # Global random seed.
    num_gpus                = 1,        # Number of processes taking part.
    rank                    = 0,        # Rank of this process in [0, num_gpus).
    batch_size              = 4,        # Total batch size for one training iteration (all processes).
    batch_gpu               = 4,        # Images per process per round (gradient accumulation below batch_size).
    ema_kimg                = 10,       # Half-life of the G_ema weights, in kimg.
    ema_rampup              = None,     # EMA ramp-up: half-life at most cur_nimg * ema_rampup, None = off.
    G_reg_interval          = 4,        # Lazy path-length regularization every N steps, None = with Gmain.
    D_reg_interval          = 16,       # Lazy R1 every N steps, None = with Dmain.
    augment_p               = 0,        # Initial augmentation probability.
    ada_target              = None,     # ADA target for E[sign(D(real))], None = fixed p.
    ada_interval            = 4,        # Adjust p every N steps.
    ada_kimg                = 500,      # p can go from 0 to 1 in this many kimg.
    total_kimg              = 25000,    # Length of the training, in kimg.
    kimg_per_tick           = 4,        # Progress line and maintenance every N kimg.
    image_snapshot_ticks    = 50,       # Image grid every N ticks, None = never.
    network_snapshot_ticks  = 50,       # Network snapshot and training state every N ticks, None = never.
    resume_pkl              = None,     # Network snapshot to copy weights from (new run, fresh counters).
    resume_state            = None,     # Training state to continue exactly (training-state.pt).
    cudnn_benchmark         = True,     # torch.backends.cudnn.benchmark.
    allow_tf32              = False,    # TF32 matmuls and convolutions on Ampere and newer.
    compile                 = False,    # torch.compile G and D in the phases that differentiate once (Gmain,
                                        # Dmain); snapshots and training state are the same either way.
    abort_fn                = None,     # Callable: stop training when it returns True.
    progress_fn             = None,     # Callable(cur_kimg, total_kimg) called once per tick.
    device                  = None,     # torch.device; None = cuda:rank if CUDA is available, else cpu.
    image_grid_max          = (32, 32), # Largest grid of reals.png / fakes*.png (columns, rows).
    metric_fn               = None,     # Callable that evaluates `metrics` at snapshots (see below).
    detector_dir            = None,     # Folder with the metrics' feature networks, None = cache / download.
    state_kimg              = None,     # Training state every N kimg besides those of the network snapshots.
    stop_snapshot           = True,     # On SIGTERM/SIGINT/SIGUSR1: a network snapshot besides the training state.
    stop_request            = None,     # preemption.StopRequest (a launcher's shared flag); None = a new one.
    device_type             = None,     # 'cuda' or 'cpu': where train.py launched the run (recorded, so that
                                        # resuming continues there); `device` decides where this process runs.
) -> 'TrainingState':
    """Train; returns the final state (networks, counters), which tests inspect."""
    # Callables are not options: they are neither recorded in the training state nor in training_options.json.
    opts = dnnlib.EasyDict({k: v for k, v in locals().items()
                            if k not in ('abort_fn', 'progress_fn', 'metric_fn', 'stop_request')})
    for key in ('training_set_kwargs', 'data_loader_kwargs', 'G_kwargs', 'D_kwargs', 'G_opt_kwargs',
                'D_opt_kwargs', 'loss_kwargs'):
        opts[key] = dnnlib.EasyDict(opts[key] or {})
    opts.metrics = list(metrics)
    _check_options(opts)
    if device is None:
        device = torch.device('cuda', rank) if torch.cuda.is_available() else torch.device('cpu')
    opts.device = None  # Not part of the recorded options; a resumed run may use another device.
    _check_metrics(opts, metric_fn)
    device = torch.device(device)
    request = stop_request if stop_request is not None else preemption.StopRequest()
    training_stats.reset_values()  # This run's statistics only, even in a process that trained before.
    with _torch_settings(opts, device), preemption.stop_signals(request):
        state = None
        try:
            state = _setup(opts, rank, device)
            state.metric_fn = metric_fn
            state.stop.request = request
            state.files.last_state_nimg = state.progress.cur_nimg
            _run(state, abort_fn, progress_fn)
        except TrainingStopped:
            raise
        except Exception as e:
            raise TrainingStopped(_stopped_message(opts, state, e)) from e
    return state


def one_line(error: BaseException) -> str:
    """The line of an exception's message that says what went wrong. An error in a DataLoader worker arrives
    re-raised with the worker's whole traceback in its message; its last line is the original error."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if 'Original Traceback' in str(error) else lines[0]
    # A traceback's last line starts with the error's type ('ValueError: ...'), which the callers append in
    # parentheses: drop it here so that no message names the type twice.
    return re.sub(r'^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning): ', '', line) or line


def _stopped_message(opts, state: Optional[TrainingState], error: BaseException) -> str:
    """One line: what stopped the run, when, and what is still intact."""
    where = 'during setup' if state is None else f'at {state.progress.cur_nimg / 1000:.1f} kimg'
    if state is not None and state.files.last_snapshot is not None:
        kept = (f'the last snapshot {os.path.basename(state.files.last_snapshot)} and {checkpoint.STATE_FILE_NAME} '
                f'are intact')
    elif opts.resume_state:
        kept = f'the training state it resumed from ({opts.resume_state}) is intact'
    else:
        kept = 'no snapshot had been written yet'
    return f'Training stopped {where}: {one_line(error)} ({type(error).__name__}); {kept}'


def _check_options(opts) -> None:
    if opts.batch_size % (opts.batch_gpu * opts.num_gpus) != 0:
        raise ValueError(f'batch_size ({opts.batch_size}) must be a multiple of batch_gpu * num_gpus '
                         f'({opts.batch_gpu} * {opts.num_gpus})')


def _check_metrics(opts, metric_fn) -> None:
    # The metrics package sits above `training` in the layer order, so the loop cannot import it: train.py
    # passes `metrics.metric_main.run_training_metrics` in. Without it a request must fail now, not hours in.
    if opts.metrics and metric_fn is None:
        raise ValueError(f'Metrics were requested ({", ".join(opts.metrics)}) but no metric_fn was given; '
                         f'pass metric_fn=metrics.metric_main.run_training_metrics, or metrics=[] (--metrics=none)')


def _run(state: TrainingState, abort_fn: Optional[Callable], progress_fn: Optional[Callable]) -> None:
    opts, progress, stop = state.opts, state.progress, state.stop
    state.log(f'Training for {opts.total_kimg} kimg...')
    state.timing.start = state.timing.tick_start = time.time()
    if progress_fn is not None:
        progress_fn(progress.cur_nimg // 1000, opts.total_kimg)
    while True:
        _train_step(state)
        done = progress.cur_nimg >= opts.total_kimg * 1000
        signame = stop.request.agreed(progress.batch_idx, opts.num_gpus, state.device)
        if signame is not None and not done:
            # Every rank stops after the same step (a run that is done has nothing left to save for).
            stop.signal = signame
        if done or progress.cur_tick == 0 or progress.cur_nimg >= progress.tick_start_nimg + opts.kimg_per_tick * 1000:
            # The tick ends here whether or not a stop came with this step, as it would without the stop.
            if abort_fn is not None and abort_fn():
                done = True
                state.log('Aborting...')
            _maintenance(state, done)
            if progress_fn is not None:
                progress_fn(progress.cur_nimg // 1000, opts.total_kimg)
        if done:
            stop.signal = None
            break
        if stop.signal is not None:
            _stop(state)
            break
    if state.is_main:
        state.files.close_stats()
    state.log('Exiting...')
