"""training.training_loop on tiny CPU runs: the files of a run, exact resume, two gloo processes staying in
sync, crash-safe snapshots and the divergence stop."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from dist_utils import spawn

from metrics import metric_main
from torch_utils import misc, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
from training import checkpoint, snapshot_io
from training.loss import StyleGAN2Loss
from training.training_loop import AdaController, TrainingDiverged, TrainingStopped, training_loop

pytestmark = pytest.mark.usefixtures('one_thread')

BATCH = 8


def make_image_folder(root, num_images=24, resolution=16, num_classes=3):
    """Random RGB images with class labels in dataset.json."""
    os.makedirs(root, exist_ok=True)
    rnd = np.random.RandomState(0)
    labels = []
    for i in range(num_images):
        PIL.Image.fromarray((rnd.rand(resolution, resolution, 3) * 255).astype(np.uint8)).save(
            os.path.join(root, f'img{i:03d}.png'))
        labels.append([f'img{i:03d}.png', i % num_classes])
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    return str(root)


def tiny_options(run_dir, data, architecture='skip', steps=4, steps_per_tick=2, **overrides):
    synthesis_kwargs = dict(channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=256,
                            architecture=architecture)
    if architecture == 'squeeze':
        synthesis_kwargs['squeeze_r'] = 4
    opts = dict(
        run_dir                 = str(run_dir),
        training_set_kwargs     = dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                                       max_size=None, xflip=True, resolution=16, random_seed=0),
        data_loader_kwargs      = dict(pin_memory=False, num_workers=0),
        G_kwargs                = dict(class_name='training.networks.Generator', z_dim=8, w_dim=8,
                                       mapping_kwargs=dict(num_layers=2), synthesis_kwargs=synthesis_kwargs),
        D_kwargs                = dict(class_name='training.networks.Discriminator', channel_base=128, channel_max=16,
                                       epilogue_kwargs=dict(mbstd_group_size=4)),
        G_opt_kwargs            = dict(class_name='torch.optim.Adam', lr=0.0025, betas=(0.0, 0.99), eps=1e-8),
        D_opt_kwargs            = dict(class_name='torch.optim.Adam', lr=0.0025, betas=(0.0, 0.99), eps=1e-8),
        augment_kwargs          = dict(class_name='training.augment.AugmentPipe', xflip=1, rotate90=1, xint=1,
                                       brightness=1, contrast=1, saturation=1),
        loss_kwargs             = dict(class_name='training.loss.StyleGAN2Loss', r1_gamma=1.0),
        batch_size              = BATCH,
        batch_gpu               = 4,    # Two accumulation rounds per step.
        ema_kimg                = 0.01,
        ema_rampup              = 0.05,
        G_reg_interval          = 2,
        D_reg_interval          = 2,
        ada_target              = 0.6,
        ada_interval            = 2,
        ada_kimg                = 0.1,  # Large p steps, so that ADA visibly acts within a few steps.
        total_kimg              = steps * BATCH / 1000,
        kimg_per_tick           = steps_per_tick * BATCH / 1000,
        image_snapshot_ticks    = 1,
        network_snapshot_ticks  = 1,
        image_grid_max          = (4, 2),
    )
    opts.update(overrides)
    return opts


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def _train(run_dir, data_dir, **kwargs):
    os.makedirs(run_dir, exist_ok=True)
    training_stats.reset()
    return training_loop(**tiny_options(run_dir, data_dir, **kwargs))


@pytest.mark.parametrize('architecture', ['skip', 'squeeze'])
def test_two_tick_run_writes_every_file(tmp_path, data_dir, architecture):
    state = _train(tmp_path / 'run', data_dir, architecture=architecture, steps=3, steps_per_tick=2)
    files = sorted(os.listdir(tmp_path / 'run'))
    # Ticks of 8 images (a fractional kimg): every snapshot keeps its own name, to the image.
    assert files == ['fakes000000.008.png', 'fakes000000.024.png', 'fakes_init.png', 'last-good.json',
                     'network-snapshot-000000.008.pkl', 'network-snapshot-000000.024.pkl', 'reals.png', 'stats.jsonl',
                     'training-state.pt']
    assert state.progress.cur_nimg == 3 * BATCH and state.progress.cur_tick == 2  # Ticks after steps 1 and 3.

    with open(tmp_path / 'run' / 'stats.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 2
    for line in lines:
        assert isinstance(line.pop('timestamp'), float)
        assert {'Loss/G/loss', 'Loss/D/loss', 'Progress/kimg', 'Progress/augment', 'Timing/sec_per_kimg'} <= set(line)
        assert all(set(value) == {'num', 'mean', 'std'} for value in line.values())

    G = snapshot_io.load_network(str(tmp_path / 'run' / 'network-snapshot-000000.024.pkl'))
    assert G.synthesis.architecture == architecture
    img = G(torch.randn([2, G.z_dim]), torch.eye(3)[:2], noise_mode='const')
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
    with PIL.Image.open(tmp_path / 'run' / 'reals.png') as reals:
        assert reals.size == (4 * 16, 2 * 16)

    record = torch.load(tmp_path / 'run' / 'training-state.pt', weights_only=True)
    assert record['progress']['cur_nimg'] == 3 * BATCH
    # The version-1 layout (training/checkpoint.py), which states written before the components existed share
    # (they lack loss_ranks, which older code ignores and which holds None with one process).
    assert record['version'] == 1 and set(record) == {'format', 'version', 'options', 'progress', 'networks',
                                                      'optimizers', 'loss', 'loss_ranks', 'ada', 'health',
                                                      'tick_stats', 'rng'}
    assert record['tick_stats'] is None and not record['progress']['between_ticks']  # Written at a tick.
    assert record['loss_ranks'] is None  # One process: `loss` is its own.
    assert set(record['networks']) == {'G', 'D', 'G_ema', 'augment_pipe'} and set(record['optimizers']) == {'G', 'D'}
    assert set(record['loss']) == {'pl_mean'}


def test_global_switches_are_restored(tmp_path, data_dir):
    before = (conv2d_gradfix.enabled, grid_sample_gradfix.enabled)
    _train(tmp_path / 'run', data_dir, steps=1)
    assert (conv2d_gradfix.enabled, grid_sample_gradfix.enabled) == before


def _final_tensors(state):
    tensors = {f'G_ema.{k}': v.clone() for k, v in state.nets.G_ema.state_dict().items()}
    tensors.update({f'D.{k}': v.clone() for k, v in state.nets.D.state_dict().items()})
    tensors['augment_p'] = state.nets.augment_pipe.p.clone()
    tensors['pl_mean'] = state.optim.loss.pl_mean.clone()
    return tensors


def test_exact_resume(tmp_path, data_dir):
    # 6 steps straight == 3 steps, stop, resume from the training state, 3 more steps: bitwise on the CPU.
    # A target below any possible E[sign] makes ADA raise p at once, so the augmentations really run.
    straight = _train(tmp_path / 'straight', data_dir, architecture='squeeze', steps=6, ada_target=-0.9)
    first = _train(tmp_path / 'split', data_dir, architecture='squeeze', steps=3, ada_target=-0.9)
    state_file = checkpoint.find_state_file(str(tmp_path / 'split'))
    assert state_file is not None
    assert first.nets.augment_pipe.p.item() > 0  # ADA has moved p: its pending statistics must survive the stop.
    resumed = _train(tmp_path / 'split', data_dir, architecture='squeeze', steps=6, ada_target=-0.9,
                     resume_state=state_file)
    assert resumed.progress.cur_nimg == straight.progress.cur_nimg == 6 * BATCH
    expected, got = _final_tensors(straight), _final_tensors(resumed)
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert different == []
    # The divergence monitor's loss history came back too (it decides the next ticks).
    assert resumed.health.monitor.state_dict() == straight.health.monitor.state_dict()
    # And the split really changed something between the halves (the check is not vacuous).
    assert not torch.equal(_final_tensors(first)['G_ema.synthesis.b16.torgb.weight'],
                           expected['G_ema.synthesis.b16.torgb.weight'])


def test_ada_controller_carries_pending_signs_across_a_flush():
    # Signs reported before a flush (a tick, a training-state save) count toward the next adjustment.
    class Pipe:
        p = torch.zeros([])
    training_stats.reset()
    ada = AdaController(Pipe(), target=0.5, interval=2, kimg=1, batch_size=10)
    training_stats.report('Loss/signs/real', torch.ones(3))
    ada.step(1)  # Not an adjustment step.
    ada.flush()
    assert ada.pending.tolist() == [3, 3, 3]
    training_stats.report('Loss/signs/real', -torch.ones(1))
    ada.step(2)  # Mean of all four signs: (3 - 1) / 4 = 0.5, not above the target: p moves down (stays at 0).
    assert Pipe.p.item() == 0 and ada.pending.tolist() == [0, 0, 0]
    training_stats.report('Loss/signs/real', torch.ones(2))
    ada.step(4)
    assert Pipe.p.item() == pytest.approx(10 * 2 / 1000)
    training_stats.reset()


def test_resume_from_pkl_copies_weights_and_restarts_counters(tmp_path, data_dir):
    first = _train(tmp_path / 'a', data_dir, steps=1)
    pkl = str(tmp_path / 'a' / 'network-snapshot-000000.008.pkl')
    second = _train(tmp_path / 'b', data_dir, steps=1, resume_pkl=pkl, G_opt_kwargs=dict(
        class_name='torch.optim.Adam', lr=0.0, betas=(0.0, 0.99), eps=1e-8), ema_kimg=1e9, ema_rampup=None)
    assert second.progress.cur_nimg == BATCH  # A new run: counters start at zero.
    # With lr 0 and no EMA movement, G and G_ema keep exactly the resumed weights.
    assert torch.equal(second.nets.G.synthesis.b16.conv1.weight, first.nets.G.synthesis.b16.conv1.weight)
    assert torch.equal(second.nets.G_ema.synthesis.b16.conv1.weight, first.nets.G_ema.synthesis.b16.conv1.weight)


def test_crash_while_writing_a_snapshot_keeps_the_previous_one(tmp_path, data_dir, monkeypatch):
    _train(tmp_path / 'run', data_dir, steps=1)
    path = tmp_path / 'run' / 'network-snapshot-000000.008.pkl'
    before = path.read_bytes()

    def crashing_dump(obj, f, *args, **kwargs):
        f.write(b'\x80\x04partial')
        raise OSError('disk full (simulated)')
    monkeypatch.setattr(pickle, 'dump', crashing_dump)
    with pytest.raises(TrainingStopped, match='simulated') as error:
        _train(tmp_path / 'run', data_dir, steps=1)
    assert isinstance(error.value.__cause__, OSError)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert snapshot_io.load_network(str(path)).z_dim == 8
    assert [name for name in os.listdir(tmp_path / 'run') if '.tmp-' in name] == []


class NaNAfterFirstTickLoss(StyleGAN2Loss):
    """A loss whose discriminator outputs turn to NaN after the first step (a diverged run)."""

    calls = 0

    def run_D(self, img, c):
        logits = super().run_D(img, c)
        NaNAfterFirstTickLoss.calls += 1
        return logits * float('nan') if NaNAfterFirstTickLoss.calls > 4 else logits


def test_nonfinite_losses_stop_training_with_the_last_snapshot_intact(tmp_path, data_dir):
    NaNAfterFirstTickLoss.calls = 0
    loss_kwargs = dict(class_name='test_training_loop.NaNAfterFirstTickLoss', r1_gamma=1.0)
    with pytest.raises(TrainingDiverged, match=r'Training diverged at .* kimg: every Loss/G/loss value'):
        _train(tmp_path / 'run', data_dir, steps=6, loss_kwargs=loss_kwargs)
    snapshot = tmp_path / 'run' / 'network-snapshot-000000.008.pkl'
    G = snapshot_io.load_network(str(snapshot))  # Written after the first (healthy) tick, not overwritten since.
    assert all(torch.isfinite(p).all() for p in G.parameters())
    record = checkpoint.load_training_state(str(tmp_path / 'run' / 'training-state.pt'))
    assert record['progress']['cur_nimg'] == BATCH


def test_metrics_request_without_an_evaluator_gives_a_clear_message(tmp_path, data_dir):
    with pytest.raises(ValueError, match='--metrics=none'):
        _train(tmp_path / 'run', data_dir, steps=1, metrics=['fid50k_full'])


def test_metrics_are_evaluated_at_every_snapshot(tmp_path, data_dir):
    # The real evaluator of the metrics package, with a detector-free metric registered for the test.
    def mean_pixel_test_metric(opts):
        G = opts.G.to(opts.device)
        z = torch.randn([4, G.z_dim], generator=torch.Generator().manual_seed(0))
        c = torch.eye(G.c_dim)[torch.zeros(4, dtype=torch.long)] if G.c_dim else torch.zeros([4, 0])
        return dict(mean_pixel_test_metric=float(G(z, c, noise_mode='const').mean()))
    metric_main.register_metric(mean_pixel_test_metric)
    try:
        _train(tmp_path / 'run', data_dir, steps=3, metrics=['mean_pixel_test_metric'],
               metric_fn=metric_main.run_training_metrics)
    finally:
        metric_main.unregister_metric('mean_pixel_test_metric')
    with open(tmp_path / 'run' / 'metric-mean_pixel_test_metric.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 2  # Snapshots after ticks 0 and 1.
    assert {'results', 'metric', 'total_time', 'total_time_str', 'num_gpus', 'snapshot_pkl', 'timestamp'} <= set(lines[0])
    assert lines[0]['snapshot_pkl'] == 'network-snapshot-000000.008.pkl'
    with open(tmp_path / 'run' / 'stats.jsonl') as f:
        stats = [json.loads(line) for line in f]
    assert 'Metrics/mean_pixel_test_metric' in stats[-1]


def _two_rank_worker(rank, world_size, run_dir, data):
    training_stats.init_multiprocessing(rank, sync_device=torch.device('cpu'))
    opts = tiny_options(run_dir, data, steps=3, num_gpus=world_size, rank=rank, batch_gpu=2)
    state = training_loop(device=torch.device('cpu'), **opts)
    for module in (state.nets.G, state.nets.D, state.nets.G_ema, state.nets.augment_pipe):
        misc.check_ddp_consistency(module, ignore_regex=r'.*\.w_avg')
    assert state.progress.cur_nimg == 3 * BATCH


def test_two_gloo_processes_stay_consistent(tmp_path, data_dir):
    os.makedirs(tmp_path / 'run')
    spawn(_two_rank_worker, 2, str(tmp_path / 'run'), data_dir, timeout=300)
    assert os.path.isfile(tmp_path / 'run' / 'network-snapshot-000000.024.pkl')


def test_a_state_written_by_the_code_before_checkpoint_components_resumes_bitwise(tmp_path, data_dir):
    # tests/golden/training-state-v1-squeeze.pt: 2 steps of this module's tiny squeeze run (ada_target=-0.9),
    # written by the training loop as of commit 4fbf7d9, before the state was assembled from components and
    # before gradients were averaged without DDP. Continuing it for 2 steps must give exactly the 4-step run on
    # a CPU whose kernels round as those of the machine that wrote it (its first 2 steps come out bitwise equal).
    # Elsewhere (AVX2 against AVX-512 kernels, say) the runs differ by rounding only: about 1e-5 after 4 steps,
    # where a state that lost a part (the Adam moments, measured: 8e-3) differs by hundreds of times more.
    golden = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'training-state-v1-squeeze.pt')
    first_two = _train(tmp_path / 'first-two', data_dir, architecture='squeeze', steps=2, ada_target=-0.9)
    golden_G_ema = torch.load(golden, weights_only=True)['networks']['G_ema']
    same_rounding = all(torch.equal(value, golden_G_ema[name]) for name, value in first_two.nets.G_ema.state_dict().items())
    straight = _train(tmp_path / 'straight', data_dir, architecture='squeeze', steps=4, ada_target=-0.9)
    resumed = _train(tmp_path / 'resumed', data_dir, architecture='squeeze', steps=4, ada_target=-0.9,
                     resume_state=golden)
    assert resumed.progress.cur_nimg == straight.progress.cur_nimg == 4 * BATCH
    expected, got = _final_tensors(straight), _final_tensors(resumed)
    if same_rounding:
        assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    else:
        worst = max((expected[name].double() - got[name].double()).abs().max().item() for name in expected)
        assert worst < 1e-4, f'{worst:.3g} is more than rounding'

    # Machine-independent: the old layout loads into the state the new code itself saves and restores. Resumed
    # from the golden file for 1 step, saved in today's layout and resumed for the last step, the run ends
    # bitwise where the golden file's 2-step continuation ends.
    _train(tmp_path / 'chain', data_dir, architecture='squeeze', steps=3, ada_target=-0.9, resume_state=golden)
    chained = _train(tmp_path / 'chain2', data_dir, architecture='squeeze', steps=4, ada_target=-0.9,
                     resume_state=checkpoint.find_state_file(str(tmp_path / 'chain')))
    assert chained.progress.cur_nimg == 4 * BATCH
    chained_tensors = _final_tensors(chained)
    assert [name for name in got if not torch.equal(got[name], chained_tensors[name])] == []
