"""The files the training loop writes into its run directory, and the record of what it has written.

    reals.png, fakes_init.png       the image grid of reals and of G_ema's first fakes (a new run only)
    fakes<tag>.png                  G_ema's fakes at a tick of --snap images (`snapshot_tag`: when)
    network-snapshot-<tag>.pkl      the networks (training/snapshot_io.py's pickle format)
    training-state.pt               what exact resume needs (training/checkpoint.py); one, replaced each time
    last-good.json                  the snapshot and training state of the last tick judged healthy
    stats.jsonl                     one record of statistics per tick (and TensorBoard's event files)

train.py writes training_options.json and log.txt beside them (runner/run_dir.py). Only rank 0 writes; the
other ranks keep the same record of what was written, so that every rank takes the same decisions. Every
file but stats.jsonl (appended) is written atomically by `dnnlib.util.write_atomically`: a crash or a full
disk keeps the previous version whole, which is what the messages of a failed run rely on.
"""

import dataclasses
import errno
import json
import os
import time
from typing import Any, Callable, Optional, Tuple

import numpy as np
import PIL.Image

import dnnlib
from training import checkpoint, snapshot_io

# train.py writes it into every run directory (runner/run_dir.py, which `training` may not import).
OPTIONS_FILE_NAME = 'training_options.json'

# A small JSON file in the run directory that names the newest snapshot and training state written at the end of
# a tick that was judged healthy, see `write_last_good`.
LAST_GOOD_FILE_NAME = 'last-good.json'

STATS_FILE_NAME = 'stats.jsonl'

# A full disk, or a full quota (which network file systems report instead).
_NO_SPACE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, 'EDQUOT', None)) if code is not None)


def is_disk_full(error: OSError) -> bool:
    return error.errno in _NO_SPACE_ERRNOS


def snapshot_tag(cur_nimg: int, kimg_per_tick: float, total_kimg: float) -> str:
    """The part of `fakes<tag>.png` / `network-snapshot-<tag>.pkl` that says when it was written.

    The official `<kimg:06d>` when ticks and the training length are whole kimg: then two maintenance steps
    never fall into the same kimg. Otherwise (`--tick=0.5`, `--kimg=4.5`) the images shown are kept to the
    image, `000004.512`, so that no snapshot overwrites another and the names still sort in training order.
    """
    if float(kimg_per_tick).is_integer() and float(total_kimg).is_integer():
        return f'{cur_nimg // 1000:06d}'
    return f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'

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
# The run directory of one process.


@dataclasses.dataclass
class RunFiles:
    """The run directory as one process of a run sees it: what it writes there, and what it has written."""
    run_dir:            str
    is_main:            bool                    # Rank 0: the one process that writes.
    last_snapshot:      Optional[str] = None    # Path of the network snapshot this process wrote last (rank 0).
    last_snapshot_nimg: Optional[int] = None    # cur_nimg of this process's last network snapshot, on every rank.
    last_state_nimg:    int = 0                 # cur_nimg of the last training state written (--state-kimg).
    stats_jsonl:        Any = None              # stats.jsonl, open for appending (rank 0).
    stats_tfevents:     Any = None              # TensorBoard's writer; None on other ranks or without TensorBoard.

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    # Statistics.

    def open_stats(self, resumed_nimg: Optional[int]) -> None:
        """Open stats.jsonl for appending, and TensorBoard's writer where it is installed. A run resumed at
        `resumed_nimg` first drops the records of the ticks it repeats."""
        if resumed_nimg is not None:
            _drop_records_after(resumed_nimg, self.run_dir)
        self.stats_jsonl = open(self.path(STATS_FILE_NAME), 'at')
        try:
            import torch.utils.tensorboard as tensorboard  # Here: optional (requirements-extras.txt) and slow.
            self.stats_tfevents = tensorboard.SummaryWriter(self.run_dir)
        except ImportError as e:
            print(f'Skipping tfevents export: {e}')  # TensorBoard is optional: stats.jsonl has everything.
            self.stats_tfevents = None

    def write_stats(self, stats: dict, cur_nimg: int, start_time: float) -> None:
        """One tick's record: a line of stats.jsonl stamped with the time, the means as TensorBoard scalars."""
        timestamp = time.time()
        self.stats_jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
        self.stats_jsonl.flush()
        if self.stats_tfevents is not None:
            global_step = int(cur_nimg / 1e3)
            walltime = timestamp - start_time
            for name, value in stats.items():
                self.stats_tfevents.add_scalar(name, value.mean, global_step=global_step, walltime=walltime)
            self.stats_tfevents.flush()

    def close_stats(self) -> None:
        self.stats_jsonl.close()
        if self.stats_tfevents is not None:
            self.stats_tfevents.close()

    # Snapshots and the training state.

    def write_image_grid(self, name: str, images, drange, grid_size) -> None:
        """Called on rank 0 only, which alone holds the grid's latents."""
        save_image_grid(images, self.path(name), drange=drange, grid_size=grid_size)

    def write_network_snapshot(self, snapshot: Optional[dict], tag: str, cur_nimg: int) -> str:
        """network-snapshot-<tag>.pkl holding `snapshot` (rank 0's; None on the other ranks); its path."""
        path = self.path(f'network-snapshot-{tag}.pkl')
        if self.is_main:
            snapshot_io.save_network_pkl(snapshot, path)
            self.last_snapshot = path
        self.last_snapshot_nimg = cur_nimg
        return path

    def write_training_state(self, record: Callable[[], dict], cur_nimg: int, cur_tick: int) -> None:
        """Rank 0 writes training-state.pt from `record()`, then names it in last-good.json: the loop writes a
        state only after it judged the tick healthy."""
        if self.is_main:
            checkpoint.save_training_state(self.path(checkpoint.STATE_FILE_NAME), record())
            self._point_to_last_good(cur_nimg, cur_tick)
        self.last_state_nimg = cur_nimg

    def _point_to_last_good(self, cur_nimg: int, cur_tick: int) -> None:
        """Name the snapshot and state just written as the last good ones. Before this process's first snapshot
        (a resumed run, or a state written by --state-kimg), the snapshot of the previous pointer stays the
        last good one."""
        snapshot = self.last_snapshot
        if snapshot is None:
            previous = read_last_good(self.run_dir)
            snapshot = previous['snapshot'] if previous is not None else None
        write_last_good(self.run_dir, snapshot, checkpoint.STATE_FILE_NAME, kimg=cur_nimg / 1000, tick=cur_tick)

    def newest_snapshot(self) -> Optional[str]:
        """The snapshot this process wrote last or, before its first one (a resumed run), the newest
        network-snapshot-*.pkl of the run directory by the training time in its name; None if there is none."""
        if self.last_snapshot is not None:
            return self.last_snapshot
        return checkpoint.newest_snapshot(self.run_dir)

    # What is intact when a run fails.

    def saved_files(self) -> Tuple[bool, bool]:
        """(a network snapshot exists, a training state exists), taken before a tick's writes, so that a snapshot
        written just before the training state failed does not count as a previous one."""
        return self.newest_snapshot() is not None, os.path.isfile(self.path(checkpoint.STATE_FILE_NAME))

    def full_disk_message(self, error: OSError, saved_before: Tuple[bool, bool]) -> str:
        """One line for a full disk while writing a tick's files: the file, and what is intact (the writes are
        atomic, so the files written before are)."""
        kept = {(True, True): 'the previous snapshot and training state are intact',
                (True, False): 'the previous snapshot is intact',
                (False, True): 'the previous training state is intact',
                (False, False): 'nothing had been saved before'}[saved_before]
        if not saved_before[1] and self.newest_snapshot() is not None:
            kept = self._continue_from_snapshot(self.newest_snapshot())
        what = os.path.basename(error.filename) if error.filename else 'the snapshot files'
        return f'{error.strerror or os.strerror(error.errno)} while writing {what}; {kept}'

    def _continue_from_snapshot(self, snapshot: str) -> str:
        """What is left, and how to go on, when the disk filled up before the run's first training state: the
        snapshot (complete, since snapshots are written atomically) is all there is, and `--resume` with it
        starts a new run from its weights (the counters and the optimizer moments start over)."""
        options = self.path(OPTIONS_FILE_NAME)
        recorded = f' ({options})' if os.path.isfile(options) else ''
        return (f'no training state had been saved yet, but the snapshot {snapshot} is complete: free some space '
                f'and continue from its weights with python train.py --resume={snapshot} and the other options of '
                f'this run{recorded}; that starts a new run directory, with the counters and optimizer moments reset')

    def last_good_files(self, advice: str, resume_state: Optional[str]) -> str:
        """What a user can go back to after a divergence, as the end of one line: the snapshot and training state
        of the last healthy tick (last-good.json names them; files of this run directory that are newer, or not
        named there, are not vouched for), and how to continue; `advice` says what to change."""
        good = read_last_good(self.run_dir) if self.is_main else None
        snapshot, state = (good['snapshot'], good['training_state']) if good is not None else (None, None)
        if snapshot is not None or state is not None:
            when = f'{good["kimg"]:.1f} kimg, tick {good["tick"]}'
            if snapshot is not None and state is not None:
                files = f'the last good snapshot {snapshot} and training state {state} ({when})'
            elif snapshot is not None:
                files = f'the last good snapshot {snapshot} ({when})'
            else:
                files = f'the last good training state {state} ({when})'
            how = []
            if state is not None:
                how.append(f'--resume={self.run_dir} continues from that state with the same options')
            if snapshot is not None:
                how.append(f'--resume={snapshot} starts a new run from its weights, e.g. with {advice}')
            return f'{files} are kept; {"; ".join(how)}'
        if resume_state:
            return (f'the training state it resumed from ({resume_state}) is intact; '
                    f'--resume={resume_state} continues from it; or try {advice}')
        return f'no snapshot or training state had been written before it; start again with {advice}'

# ----------------------------------------------------------------------------
# The last good files of a run (last-good.json).


def write_last_good(run_dir: str, snapshot: Optional[str], training_state: str, kimg: float, tick: int) -> None:
    """Record (atomically) that `snapshot` and `training_state` (file names in `run_dir`, or None for no
    snapshot) were written at the end of tick `tick` at `kimg`, after that tick was judged healthy.

    The loop judges a tick before it writes anything of it, so every file it writes is good; this file says
    which ones are the newest, so that the stop message of a later divergence names them and not whatever else
    lies in the directory (older runs, copies, snapshots of code without these checks). Snapshots are never
    deleted or overwritten (each has its own name), and the training state is replaced only by the state of a
    later healthy tick, which then moves this pointer too."""
    record = dict(snapshot=None if snapshot is None else os.path.basename(snapshot),
                  training_state=os.path.basename(training_state), kimg=float(kimg), tick=int(tick))
    text = json.dumps(record, indent=2) + '\n'
    dnnlib.util.write_atomically(os.path.join(run_dir, LAST_GOOD_FILE_NAME), lambda f: f.write(text.encode('utf-8')))


def read_last_good(run_dir: str) -> Optional[dict]:
    """The record of `write_last_good` with full paths, the entries whose files are missing set to None; None
    if there is no readable record."""
    try:
        with open(os.path.join(run_dir, LAST_GOOD_FILE_NAME), encoding='utf-8') as f:
            record = json.load(f)
        result = dict(kimg=float(record['kimg']), tick=int(record['tick']))
        for key in ('snapshot', 'training_state'):
            name = record.get(key)
            path = os.path.join(run_dir, os.path.basename(str(name))) if name else None
            result[key] = path if path is not None and os.path.isfile(path) else None
        return result
    except (OSError, ValueError, KeyError, TypeError):
        return None  # No pointer (a run of older code) or a damaged one: the caller says what it knows.

# ----------------------------------------------------------------------------
# Records of a resumed run.


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
        if not (name == STATS_FILE_NAME or (name.startswith('metric-') and name.endswith('.jsonl'))):
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
