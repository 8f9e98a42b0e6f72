"""The StyleGAN2-ADA training loop: `training_loop(**kwargs)`, called once per process by train.py.

Structure: `_setup` builds a `TrainingState` (data, networks, optimizers, phases, augmentation, logs, and
whatever a resumed run brings back); `_train_step` runs one minibatch through the phases Gmain, Greg, Dmain,
Dreg (lazy regularization), updates G_ema and the ADA probability; `_maintenance` runs once per tick (status
line, image grids, snapshots, training state, statistics, divergence check).

Exact resume: every step reseeds the global generators from (random_seed, rank, step), the data stream is a
pure function of the number of images seen (misc.InfiniteSampler), and the training state stores everything
else that evolves (networks, optimizer moments, ADA p and its pending statistics, the path-length mean,
counters). A run resumed from a state therefore continues bitwise like the uninterrupted run on the CPU.
"""

import contextlib
import copy
import dataclasses
import errno
import json
import os
import re
import time
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import PIL.Image
import psutil
import torch

import dnnlib
from torch_utils import misc, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
from training import checkpoint, dataset, health, legacy, preemption, transfer
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
# Image grids.


def setup_snapshot_image_grid(training_set, random_seed: int = 0, max_size=(32, 32)):
    """(grid_size, images uint8 [N,C,H,W], labels) for reals.png / fakes*.png, as many as fit a 4K canvas.

    Unconditional data: a random selection. Labelled data: one row per label (as far as rows go), so the
    grid shows what the generator makes of each class.
    """
    rnd = np.random.RandomState(random_seed)
    gw = int(np.clip(7680 // training_set.image_shape[2], 7, max_size[0]))
    gh = int(np.clip(4320 // training_set.image_shape[1], 4, max_size[1]))
    if not training_set.has_labels:
        all_indices = list(range(len(training_set)))
        rnd.shuffle(all_indices)
        grid_indices = [all_indices[i % len(all_indices)] for i in range(gw * gh)]
    else:
        by_label = dict()
        for idx in range(len(training_set)):
            key = tuple(training_set.get_details(idx).raw_label.flat[::-1])
            by_label.setdefault(key, []).append(idx)
        keys = sorted(by_label)
        for key in keys:
            rnd.shuffle(by_label[key])
        grid_indices = []
        for y in range(gh):
            indices = by_label[keys[y % len(keys)]]
            grid_indices += [indices[x % len(indices)] for x in range(gw)]
    images, labels = zip(*[training_set[i] for i in grid_indices], strict=True)
    return (gw, gh), np.stack(images), np.stack(labels)


def save_image_grid(img, fname: str, drange, grid_size) -> None:
    """Tile [N, C, H, W] images (N = gw * gh) into one PNG, mapping `drange` to 0..255."""
    lo, hi = drange
    img = np.asarray(img, dtype=np.float32)
    img = np.rint((img - lo) * (255 / (hi - lo))).clip(0, 255).astype(np.uint8)
    gw, gh = grid_size
    _N, C, H, W = img.shape
    img = img.reshape(gh, gw, C, H, W).transpose(0, 3, 1, 4, 2).reshape(gh * H, gw * W, C)
    image = PIL.Image.fromarray(img[:, :, 0], 'L') if C == 1 else PIL.Image.fromarray(img, 'RGB')
    dnnlib.util.write_atomically(fname, lambda f: image.save(f, format='PNG'))

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


def _progress_field(name: str) -> property:
    """state.cur_nimg etc. read and write state.progress, so the loop and its tests keep their short names."""
    return property(lambda self: getattr(self.progress, name),
                    lambda self, value: setattr(self.progress, name, value))


@dataclasses.dataclass
class TrainingState:
    """What one process of a run holds: its options, the runtime objects, and the persisted progress."""
    opts:               dnnlib.EasyDict     # The training_loop kwargs.
    device:             torch.device
    rank:               int
    training_set:       Any
    data_iterator:      Any
    G:                  torch.nn.Module
    D:                  torch.nn.Module
    G_ema:              torch.nn.Module
    augment_pipe:       Optional[torch.nn.Module]
    loss:               Any
    phases:             List[PhaseRuntime]
    ada:                Optional[AdaController]
    progress:           Progress = dataclasses.field(default_factory=Progress)
    grid_size:          Any = None
    grid_z:             Any = None
    grid_c:             Any = None
    start_time:         float = 0.0
    tick_start_time:    float = 0.0
    maintenance_time:   float = 0.0
    stats_collector:    Any = None
    health_stats:       Any = dataclasses.field(default_factory=lambda: training_stats.Collector(
                            regex=health.STATS_REGEX, keep_previous=False))  # What health_monitor reads.
    health_monitor:     Any = dataclasses.field(default_factory=health.DivergenceMonitor)  # In the training state.
    stats_jsonl:        Any = None
    stats_tfevents:     Any = None
    last_snapshot:      Optional[str] = None
    metric_fn:          Optional[Callable] = None
    stop_request:       Any = None              # preemption.StopRequest: signals received, shared launcher flag.
    stopped_by:         Optional[str] = None    # Name of the signal that stopped the run ('SIGTERM'), if one did.
    last_state_nimg:    int = 0                 # cur_nimg of the last training state written (--state-kimg).
    stop_stats:         Optional[dict] = None   # At a stop: the statistics of the tick in progress (_TickStats).
    last_snapshot_nimg: Optional[int] = None    # cur_nimg of this process's last network snapshot, on every rank.

    cur_nimg = _progress_field('cur_nimg')
    cur_tick = _progress_field('cur_tick')
    batch_idx = _progress_field('batch_idx')
    tick_start_nimg = _progress_field('tick_start_nimg')

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
        resume_data = legacy.load_network_pkl(f)
    reports = {}
    for name in ('G', 'D', 'G_ema'):
        if isinstance(resume_data.get(name), torch.nn.Module):
            reports[name] = transfer.transfer_params_and_buffers(resume_data[name], getattr(state, name))
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
    for module in (state.G, state.D, state.G_ema, state.augment_pipe):
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
    G, D, device = state.G, state.D, state.device
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
    state = TrainingState(opts=opts, device=device, rank=rank, training_set=training_set,
                          data_iterator=data_iterator, G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe,
                          loss=None, phases=[], ada=None)
    if rank == 0:
        _print_setup(state)
        _print_module_summaries(state)
    if opts.resume_pkl is not None and resume_record is None and rank == 0:
        _resume_from_pkl(state, opts.resume_pkl)

    _broadcast_weights(state)
    state.loss = dnnlib.util.construct_class_by_name(device=device, G_mapping=G.mapping, G_synthesis=G.synthesis,
                                                     D=D, augment_pipe=augment_pipe, **opts.loss_kwargs)
    state.phases = _build_phases(opts, {name: getattr(state, name) for name in state.loss.trained_networks})
    if opts.ada_target is not None and augment_pipe is not None:
        state.ada = dnnlib.util.construct_class_by_name(class_name=ADA_CONTROLLER_CLASS, augment_pipe=augment_pipe,
                                                        target=opts.ada_target, interval=opts.ada_interval,
                                                        kimg=opts.ada_kimg, batch_size=opts.batch_size)
    state.stats_collector = training_stats.Collector(regex='.*')  # Before the restore, which may fill it.
    if resume_record is not None:
        _restore_state(state, resume_record)
    _setup_logs(state)
    return state


def _print_setup(state: TrainingState) -> None:
    ts = state.training_set
    print(f'Training data: {ts.name}, {len(ts)} images, shape {list(ts.image_shape)}, label dim {ts.label_dim}')
    print(f'Generator: {sum(p.numel() for p in state.G.parameters()):,} parameters, '
          f'num_ws {state.G.num_ws}, architecture {getattr(state.G.synthesis, "architecture", "?")}')
    decoder = getattr(state.D, 'decoder', None)  # GGDR/GLeaD: not run by the module summary's D pass.
    decoder_note = f' (decoder: {sum(p.numel() for p in decoder.parameters()):,})' if decoder is not None else ''
    print(f'Discriminator: {sum(p.numel() for p in state.D.parameters()):,} parameters{decoder_note}')
    print(f'Device: {state.device}, processes: {state.opts.num_gpus}', flush=True)

# ----------------------------------------------------------------------------
# Training state (exact resume).


def _checkpoint_io(state: TrainingState) -> checkpoint.CheckpointIO:
    """The components of the training state (checkpoint.py's docstring has the layout). A network's
    optimizer is stored under the network's name; the loss brings its own state (the path-length mean)."""
    return checkpoint.CheckpointIO(
        progress    = state.progress,
        networks    = dict(G=state.G, D=state.D, G_ema=state.G_ema, augment_pipe=state.augment_pipe),
        optimizers  = {phase.network: phase.opt for phase in state.phases},  # Main and reg phases share one.
        loss        = state.loss,
        ada         = state.ada,
        health      = state.health_monitor,     # States from before it existed start a new warmup.
        tick_stats  = _TickStats(state),        # None except in a state written by a stop.
        rng         = checkpoint.RngState(),    # Last: restoring the others draws no random numbers after it.
    )


class _TickStats:
    """The statistics of the tick in progress, as a checkpoint component: a stop writes them (taken on every
    rank by `_stop`, since taking them is a collective), so that the resumed run's record of that tick holds what
    the uninterrupted run's would (the same names; the same values, except timings and rounding). States written
    at a tick hold None: their tick is complete and recorded."""

    def __init__(self, state: TrainingState):
        self.state = state

    def state_dict(self) -> Optional[dict]:
        return self.state.stop_stats

    def load_state_dict(self, saved: dict) -> None:
        self.state.stats_collector.load_state_dict(saved['log'])
        self.state.health_stats.load_state_dict(saved['health'])


def _state_record(state: TrainingState) -> dict:
    return dict(options=legacy.to_plain(dict(state.opts), 'options'), **_checkpoint_io(state).state_dict())


def _restore_state(state: TrainingState, record: dict) -> None:
    _checkpoint_io(state).load_state_dict(record)
    state.log(f'Resumed the training state at {state.cur_nimg / 1000:.1f} kimg (tick {record["progress"]["cur_tick"]})')

# ----------------------------------------------------------------------------
# Logs and grids.


def _setup_logs(state: TrainingState) -> None:
    opts = state.opts
    if not state.is_main:
        return
    if opts.resume_state is not None:
        _drop_records_after(state.cur_nimg, opts.run_dir)
    state.stats_jsonl = open(os.path.join(opts.run_dir, 'stats.jsonl'), 'at')
    try:
        import torch.utils.tensorboard as tensorboard  # Optional dependency (requirements-extras.txt).
        state.stats_tfevents = tensorboard.SummaryWriter(opts.run_dir)
    except ImportError as e:
        print(f'Skipping tfevents export: {e}')  # TensorBoard is optional: stats.jsonl has everything.
        state.stats_tfevents = None
    grid_size, images, labels = setup_snapshot_image_grid(state.training_set, opts.random_seed,
                                                          max_size=tuple(opts.image_grid_max))
    state.grid_size = grid_size
    state.grid_z = torch.randn([labels.shape[0], state.G.z_dim], device=state.device,
                               generator=torch.Generator(state.device).manual_seed(opts.random_seed))
    state.grid_c = torch.from_numpy(labels).to(state.device)
    if opts.resume_state is None:
        save_image_grid(images, os.path.join(opts.run_dir, 'reals.png'), drange=[0, 255], grid_size=grid_size)
        save_image_grid(_grid_fakes(state), os.path.join(opts.run_dir, 'fakes_init.png'), drange=[-1, 1],
                        grid_size=grid_size)



def _record_nimg(record: dict) -> Optional[float]:
    """When a stats.jsonl / metric-*.jsonl record was written, in images shown; None if it does not say."""
    if isinstance(record.get('Progress/kimg'), dict):
        return record['Progress/kimg'].get('mean', 0) * 1000
    match = checkpoint.SNAPSHOT_NAME_RE.fullmatch(os.path.basename(str(record.get('snapshot_pkl', ''))))
    if match is not None:
        return int(match.group(1)) * 1000 + int(match.group(2) or 0)
    return None


def _drop_records_after(cur_nimg: int, run_dir: str) -> None:
    """Resuming a training state repeats the ticks after it (a run killed at kimg 900 with the last state at
    800 runs 800-900 again), so their records would appear twice: drop those of the abandoned stretch."""
    for name in sorted(os.listdir(run_dir)):
        if not (name == 'stats.jsonl' or (name.startswith('metric-') and name.endswith('.jsonl'))):
            continue
        path = os.path.join(run_dir, name)
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                nimg = _record_nimg(json.loads(line))
            except ValueError:
                continue  # A line cut short by a kill.
            if nimg is None or nimg <= cur_nimg + 0.5:
                kept.append(line if line.endswith('\n') else line + '\n')
        if kept != lines:
            dnnlib.util.write_atomically(path, lambda f, kept=kept: f.write(''.join(kept).encode('utf-8')))


@torch.no_grad()
def _grid_fakes(state: TrainingState) -> np.ndarray:
    batch = max(state.opts.batch_gpu, 1)
    images = [state.G_ema(z=z, c=c, noise_mode='const').cpu()
              for z, c in zip(state.grid_z.split(batch), state.grid_c.split(batch), strict=True)]
    return torch.cat(images).numpy()

# ----------------------------------------------------------------------------
# One training step.


def _fetch_batch(state: TrainingState):
    opts = state.opts
    real_img, real_c = next(state.data_iterator)
    real_img = (real_img.to(state.device).to(torch.float32) / 127.5 - 1).split(opts.batch_gpu)
    real_c = real_c.to(state.device).split(opts.batch_gpu)
    num_phases = len(state.phases)
    gen_z = torch.randn([num_phases * opts.batch_size, state.G.z_dim], device=state.device)
    gen_z = [z.split(opts.batch_gpu) for z in gen_z.split(opts.batch_size)]
    ts = state.training_set
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
    # Each round's loss is a mean over its images; dividing by the number of rounds makes the accumulated
    # gradient the mean over the whole batch, so --batch-gpu changes memory use and not the step (the official
    # loop sums the round means, which only Adam's scale invariance hides).
    gain = phase.interval / num_rounds
    for round_idx, (r_img, r_c, g_z, g_c) in enumerate(rounds):
        state.loss.accumulate_gradients(phase=phase.name, real_img=r_img, real_c=r_c, gen_z=g_z, gen_c=g_c,
                                        sync=(round_idx == num_rounds - 1), gain=gain)
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
    opts = state.opts
    ema_nimg = opts.ema_kimg * 1000
    if opts.ema_rampup is not None:
        ema_nimg = min(ema_nimg, state.cur_nimg * opts.ema_rampup)
    ema_beta = 0.5 ** (opts.batch_size / max(ema_nimg, 1e-8))
    for p_ema, p in zip(state.G_ema.parameters(), state.G.parameters(), strict=True):
        p_ema.copy_(p.lerp(p_ema, ema_beta))
    for b_ema, b in zip(state.G_ema.buffers(), state.G.buffers(), strict=True):
        b_ema.copy_(b)


def _train_step(state: TrainingState) -> None:
    misc.set_random_seed(_step_seed(state.opts.random_seed, state.rank, state.batch_idx))
    with torch.autograd.profiler.record_function('data_fetch'):
        real_img, real_c, all_gen_z, all_gen_c = _fetch_batch(state)
    for phase, gen_z, gen_c in zip(state.phases, all_gen_z, all_gen_c, strict=True):
        if state.batch_idx % phase.interval == 0:
            _run_phase(state, phase, real_img, real_c, gen_z, gen_c)
    _update_ema(state)
    state.cur_nimg += state.opts.batch_size
    state.batch_idx += 1
    if state.ada is not None:
        state.ada.step(state.batch_idx)

# ----------------------------------------------------------------------------
# Maintenance, once per tick.


def _report_progress(state: TrainingState, tick_end_time: float) -> str:
    tick_time = tick_end_time - state.tick_start_time
    tick_kimg = (state.cur_nimg - state.tick_start_nimg) / 1000
    cpu_mem = psutil.Process(os.getpid()).memory_info().rss / 2 ** 30
    gpu_mem = torch.cuda.max_memory_allocated(state.device) / 2 ** 30 if state.device.type == 'cuda' else 0.0
    augment_p = float(state.augment_pipe.p.cpu()) if state.augment_pipe is not None else 0.0
    fields = [
        ('tick', training_stats.report0('Progress/tick', state.cur_tick), '{:<5d}'),
        ('kimg', training_stats.report0('Progress/kimg', state.cur_nimg / 1000), '{:<8.1f}'),
        ('time', dnnlib.util.format_time(training_stats.report0('Timing/total_sec', tick_end_time - state.start_time)), '{:<12s}'),
        ('sec/tick', training_stats.report0('Timing/sec_per_tick', tick_time), '{:<7.1f}'),
        ('sec/kimg', training_stats.report0('Timing/sec_per_kimg', tick_time / max(tick_kimg, 1e-8)), '{:<7.2f}'),
        ('maintenance', training_stats.report0('Timing/maintenance_sec', state.maintenance_time), '{:<6.1f}'),
        ('cpumem', training_stats.report0('Resources/cpu_mem_gb', cpu_mem), '{:<6.2f}'),
        ('gpumem', training_stats.report0('Resources/peak_gpu_mem_gb', gpu_mem), '{:<6.2f}'),
        ('augment', training_stats.report0('Progress/augment', augment_p), '{:.3f}'),
    ]
    gpu_reserved = torch.cuda.max_memory_reserved(state.device) / 2 ** 30 if state.device.type == 'cuda' else 0.0
    training_stats.report0('Resources/peak_gpu_mem_reserved_gb', gpu_reserved)
    training_stats.report0('Timing/total_hours', (tick_end_time - state.start_time) / 3600)
    training_stats.report0('Timing/total_days', (tick_end_time - state.start_time) / (24 * 3600))
    for phase in state.phases:
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
    if state.is_main:
        count = min(health.END_OF_TICK_IMAGES, max(state.opts.batch_gpu, 1), len(state.grid_z))
        health.report_end_of_tick(state.G, state.G_ema, state.D, state.grid_z[:count], state.grid_c[:count])
    else:
        health.report_end_of_tick(state.G, state.G_ema, state.D, None, None)
    state.health_stats.update()  # A collective: every rank takes part before any of them can stop.
    for net_name in ('G', 'D'):
        bad = _first_nonfinite_tensor(getattr(state, net_name))
        if bad is not None:
            raise TrainingDiverged(_divergence_message(state, f'{net_name} has non-finite weights ({bad})'))
    divergence = state.health_monitor.check(state.health_stats.as_dict())
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
    return (f'Training diverged at {state.cur_nimg / 1000:.1f} kimg: {what} (tick {state.cur_tick}). Nothing was '
            f'written for this tick; {_last_good_files(state, advice)}')


def _last_good_files(state: TrainingState, advice: str) -> str:
    """What a user can go back to, as the end of one line: the snapshot and training state of the last healthy
    tick (health.LAST_GOOD_FILE_NAME names them; files of this run directory that are newer, or not named
    there, are not vouched for), and how to continue."""
    run_dir = state.opts.run_dir
    good = health.read_last_good(run_dir) if state.is_main else None
    if good is not None and (good['snapshot'] is not None or good['training_state'] is not None):
        when = f'{good["kimg"]:.1f} kimg, tick {good["tick"]}'
        if good['snapshot'] is not None and good['training_state'] is not None:
            files = f'the last good snapshot {good["snapshot"]} and training state {good["training_state"]} ({when})'
        elif good['snapshot'] is not None:
            files = f'the last good snapshot {good["snapshot"]} ({when})'
        else:
            files = f'the last good training state {good["training_state"]} ({when})'
        how = []
        if good['training_state'] is not None:
            how.append(f'--resume={run_dir} continues from that state with the same options')
        if good['snapshot'] is not None:
            how.append(f'--resume={good["snapshot"]} starts a new run from its weights, e.g. with {advice}')
        return f'{files} are kept; {"; ".join(how)}'
    if state.opts.resume_state:
        return (f'the training state it resumed from ({state.opts.resume_state}) is intact; '
                f'--resume={state.opts.resume_state} continues from it; or try {advice}')
    return f'no snapshot or training state had been written before it; start again with {advice}'


def _newest_snapshot(state: TrainingState) -> Optional[str]:
    """The snapshot this process wrote last or, before its first one (a resumed run), the newest
    network-snapshot-*.pkl of the run directory by the training time in its name; None if there is none."""
    if state.last_snapshot is not None:
        return state.last_snapshot
    return checkpoint.newest_snapshot(state.opts.run_dir)


def snapshot_tag(cur_nimg: int, kimg_per_tick: float, total_kimg: float) -> str:
    """The part of `fakes<tag>.png` / `network-snapshot-<tag>.pkl` that says when it was written.

    The official `<kimg:06d>` when ticks and the training length are whole kimg: then two maintenance steps
    never fall into the same kimg. Otherwise (`--tick=0.5`, `--kimg=4.5`) the images shown are kept to the
    image, `000004.512`, so that no snapshot overwrites another and the names still sort in training order.
    """
    if float(kimg_per_tick).is_integer() and float(total_kimg).is_integer():
        return f'{cur_nimg // 1000:06d}'
    return f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'


def _save_snapshots(state: TrainingState, done: bool) -> None:
    opts = state.opts
    tag = snapshot_tag(state.cur_nimg, opts.kimg_per_tick, opts.total_kimg)
    if state.is_main and opts.image_snapshot_ticks and (done or state.cur_tick % opts.image_snapshot_ticks == 0):
        save_image_grid(_grid_fakes(state), os.path.join(opts.run_dir, f'fakes{tag}.png'), drange=[-1, 1],
                        grid_size=state.grid_size)
    stopping = state.stopped_by is not None  # A stop at the end of a tick: _stop writes the state after it.
    snapshot_due = bool(opts.network_snapshot_ticks) and (done or state.cur_tick % opts.network_snapshot_ticks == 0)
    if not snapshot_due:
        if _state_due(state):
            _write_training_state(state)
        return
    path, snapshot = _write_network_snapshot(state, tag)
    _write_training_state(state)
    if opts.metrics and state.metric_fn is not None and not stopping:  # A stop must not wait for metrics.
        # Rank 0 evaluates the copy it just saved; the others make their own.
        G_ema = snapshot['G_ema'] if state.is_main else _snapshot_copy(state.G_ema)
        _evaluate_metrics(state, G_ema, path)


def _write_network_snapshot(state: TrainingState, tag: str):
    """network-snapshot-<tag>.pkl (rank 0 writes; every rank checks that the ranks agree): (path, what rank 0
    wrote, None on the others)."""
    opts = state.opts
    modules = {name: getattr(state, name) for name in ('G', 'D', 'G_ema', 'augment_pipe')}
    if opts.num_gpus > 1:
        for module in modules.values():
            if module is not None:
                misc.check_ddp_consistency(module, ignore_regex=r'.*\.[^.]+_(avg|ema)')
    path = os.path.join(opts.run_dir, f'network-snapshot-{tag}.pkl')
    snapshot = None
    if state.is_main:
        snapshot = dict(training_set_kwargs=dict(opts.training_set_kwargs))
        snapshot.update({name: _snapshot_copy(module) for name, module in modules.items()})
        legacy.save_network_pkl(snapshot, path)
        state.last_snapshot = path
    state.last_snapshot_nimg = state.cur_nimg
    return path, snapshot


def _stop(state: TrainingState) -> None:
    """After the step at which the ranks agreed to stop (training/preemption.py): the training state and, with
    --stop-snapshot, a network snapshot. A stop is not a tick: no status line, record or image grid, and the
    state keeps the tick in progress (Progress.between_ticks) with its statistics so far (_TickStats), so that
    the resumed run ends that tick at the same image count as the uninterrupted run, with the same record."""
    opts = state.opts
    if state.ada is not None:
        state.ada.flush()  # The pending D signs into the state (counts and sums of +-1: exact in any order).
    if state.cur_nimg != state.tick_start_nimg:
        _check_weights_at_stop(state)  # A stop at a tick's end comes after that tick's _check_health.
    # Collectives, so on every rank; only rank 0 writes them.
    state.stop_stats = dict(log=state.stats_collector.state_dict(), health=state.health_stats.state_dict())
    with _stop_when_disk_full(state):
        tag = snapshot_tag(state.cur_nimg, opts.kimg_per_tick, opts.total_kimg)
        if opts.stop_snapshot and state.last_snapshot_nimg != state.cur_nimg:  # Not if this step's tick wrote one.
            _write_network_snapshot(state, tag)
        state.progress.between_ticks = True
        try:
            _write_training_state(state)
        finally:
            state.progress.between_ticks = False


def _check_weights_at_stop(state: TrainingState) -> None:
    """Before a stop between ticks writes its snapshot and state (which last-good.json will name): the weights
    are finite and the end-of-tick probe is within the ceilings (health.judge_probe); the tick's statistics
    are judged when the resumed run ends the tick. Rank 0 probes, every rank learns the verdict."""
    problem = None
    for net_name in ('G', 'D'):
        bad = _first_nonfinite_tensor(getattr(state, net_name))
        if bad is not None:
            problem = (f'{net_name} has non-finite weights ({bad})', None)
            break
    if problem is None and state.is_main:
        count = min(health.END_OF_TICK_IMAGES, max(state.opts.batch_gpu, 1), len(state.grid_z))
        values = health.weight_probe(state.G, state.G_ema, state.D, state.grid_z[:count], state.grid_c[:count])
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
    return interval is not None and state.cur_nimg >= state.last_state_nimg + interval * 1000


def _write_training_state(state: TrainingState) -> None:
    """Rank 0 writes training-state.pt (atomically: a crash keeps the previous one)."""
    if state.is_main:
        checkpoint.save_training_state(os.path.join(state.opts.run_dir, checkpoint.STATE_FILE_NAME),
                                       _state_record(state))
        _point_to_last_good(state)
    state.last_state_nimg = state.cur_nimg


def _point_to_last_good(state: TrainingState) -> None:
    """Name the snapshot and state just written as the last good ones (_check_health passed this tick before
    they were written). Before this process's first snapshot (a resumed run, or a state written by
    --state-kimg), the snapshot of the previous pointer stays the last good one."""
    run_dir = state.opts.run_dir
    snapshot = state.last_snapshot
    if snapshot is None:
        previous = health.read_last_good(run_dir)
        snapshot = previous['snapshot'] if previous is not None else None
    health.write_last_good(run_dir, snapshot, checkpoint.STATE_FILE_NAME, kimg=state.cur_nimg / 1000,
                           tick=state.cur_tick)


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
    state.stats_collector.update()
    if not state.is_main:
        return
    stats = state.stats_collector.as_dict()
    timestamp = time.time()
    state.stats_jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
    state.stats_jsonl.flush()
    if state.stats_tfevents is not None:
        global_step = int(state.cur_nimg / 1e3)
        walltime = timestamp - state.start_time
        for name, value in stats.items():
            state.stats_tfevents.add_scalar(name, value.mean, global_step=global_step, walltime=walltime)
        state.stats_tfevents.flush()


# A full disk, or a full quota (which network file systems report instead).
_NO_SPACE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, 'EDQUOT', None)) if code is not None)


@contextlib.contextmanager
def _stop_when_disk_full(state: TrainingState) -> Iterator[None]:
    """Turn a full disk while writing a tick's files (image grid, snapshot, training state) into one line that
    names the file and says what is intact: the writes are atomic, so the files of earlier ticks are. What
    existed is looked up before the writes, so a snapshot written just before the training state failed does not
    count as previous. Only rank 0 writes."""
    if not state.is_main:
        yield
        return
    had_snapshot = _newest_snapshot(state) is not None
    had_state = os.path.isfile(os.path.join(state.opts.run_dir, checkpoint.STATE_FILE_NAME))
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_SPACE_ERRNOS:
            raise
        kept = {(True, True): 'the previous snapshot and training state are intact',
                (True, False): 'the previous snapshot is intact',
                (False, True): 'the previous training state is intact',
                (False, False): 'nothing had been saved before'}[(had_snapshot, had_state)]
        if not had_state and _newest_snapshot(state) is not None:
            kept = _continue_from_snapshot(state, _newest_snapshot(state))
        what = os.path.basename(e.filename) if e.filename else 'the snapshot files'
        raise TrainingStopped(f'{e.strerror or os.strerror(e.errno)} while writing {what}; {kept}') from e


def _continue_from_snapshot(state: TrainingState, snapshot: str) -> str:
    """What is left, and how to go on, when the disk filled up before the run's first training state: the
    snapshot (complete, since snapshots are written atomically) is all there is, and `--resume` with it starts
    a new run from its weights (the counters and the optimizer moments start over)."""
    options = os.path.join(state.opts.run_dir, 'training_options.json')  # train.py writes it (run_dir.py).
    recorded = f' ({options})' if os.path.isfile(options) else ''
    return (f'no training state had been saved yet, but the snapshot {snapshot} is complete: free some space and '
            f'continue from its weights with python train.py --resume={snapshot} and the other options of this '
            f'run{recorded}; that starts a new run directory, with the counters and optimizer moments reset')


def _maintenance(state: TrainingState, done: bool) -> None:
    tick_end_time = time.time()
    status = _report_progress(state, tick_end_time)
    state.log(status)
    _check_health(state)
    if state.ada is not None:
        # Move the pending D signs into the ADA controller, so that the training state written below holds
        # them. A collective; every tick, so the flush points of a straight and a resumed run are the same.
        state.ada.flush()
    with _stop_when_disk_full(state):
        _save_snapshots(state, done)
    _write_stats(state)
    state.cur_tick += 1
    state.tick_start_nimg = state.cur_nimg
    state.tick_start_time = time.time()
    state.maintenance_time = state.tick_start_time - tick_end_time

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
            state.stop_request = request
            state.last_state_nimg = state.cur_nimg
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
    where = 'during setup' if state is None else f'at {state.cur_nimg / 1000:.1f} kimg'
    if state is not None and state.last_snapshot is not None:
        kept = (f'the last snapshot {os.path.basename(state.last_snapshot)} and {checkpoint.STATE_FILE_NAME} '
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
    opts = state.opts
    state.log(f'Training for {opts.total_kimg} kimg...')
    state.start_time = state.tick_start_time = time.time()
    if progress_fn is not None:
        progress_fn(state.cur_nimg // 1000, opts.total_kimg)
    while True:
        _train_step(state)
        done = state.cur_nimg >= opts.total_kimg * 1000
        signame = state.stop_request.agreed(state.batch_idx, opts.num_gpus, state.device)
        if signame is not None and not done:
            # Every rank stops after the same step (a run that is done has nothing left to save for).
            state.stopped_by = signame
        if done or state.cur_tick == 0 or state.cur_nimg >= state.tick_start_nimg + opts.kimg_per_tick * 1000:
            # The tick ends here whether or not a stop came with this step, as it would without the stop.
            if abort_fn is not None and abort_fn():
                done = True
                state.log('Aborting...')
            _maintenance(state, done)
            if progress_fn is not None:
                progress_fn(state.cur_nimg // 1000, opts.total_kimg)
        if done:
            state.stopped_by = None
            break
        if state.stopped_by is not None:
            _stop(state)
            break
    if state.is_main:
        state.stats_jsonl.close()
        if state.stats_tfevents is not None:
            state.stats_tfevents.close()
    state.log('Exiting...')
