"""Fine-tuning across architectures (`--resume=<pkl>`), the loop's failure report, snapshot names, --batch-gpu,
and what the loop shows at the start (module summaries, official timing keys)."""

import json
import os

import pytest
import torch
from test_legacy_adopt import official_format_pickle
from test_training_loop import BATCH, _train, make_image_folder, tiny_options

from torch_utils import misc, training_stats
from training import snapshot_io, transfer
from training.loss import StyleGAN2Loss
from training.networks import Discriminator, Generator
from training.run_files import snapshot_tag
from training.training_loop import TrainingStopped, one_line, training_loop

pytestmark = pytest.mark.usefixtures('one_thread')


def make_G(architecture='skip', c_dim=0, seed=0, **synthesis_kwargs):
    torch.manual_seed(seed)
    return Generator(z_dim=8, w_dim=8, c_dim=c_dim, img_resolution=16, img_channels=3,
                     mapping_kwargs=dict(num_layers=2),
                     synthesis_kwargs=dict(channel_base=128, channel_max=16, architecture=architecture,
                                           **synthesis_kwargs))


def make_D(c_dim=0, seed=0):
    torch.manual_seed(seed)
    return Discriminator(c_dim=c_dim, img_resolution=16, img_channels=3, channel_base=128, channel_max=16)


def _lines(network, report):
    return transfer.format_report(network, report)


def _check_copied_and_fresh(src, dst_before, dst_after, report):
    """Copied tensors hold the source's values; every other tensor kept the fresh network's."""
    src_tensors = dict(misc.named_params_and_buffers(src))
    before = dict(misc.named_params_and_buffers(dst_before))
    for name, tensor in misc.named_params_and_buffers(dst_after):
        expected = src_tensors[name] if name in report.copied else before[name]
        assert torch.equal(tensor, expected), name


@pytest.mark.parametrize('src_kwargs, dst_kwargs, expected', [
    # Stock -> squeeze: toRGB keeps its bias (same shape), its weights and style read q channels now.
    (dict(), dict(architecture='squeeze', squeeze_r=8),
     ['  copied whole: mapping',
      '  synthesis.b4: const, conv1, resample_filter copied; torgb dropped',
      '  synthesis.b8: conv0, resample_filter copied; torgb partly copied; squeeze, excite, blend new; conv1 dropped',
      '  synthesis.b16: conv0, resample_filter copied; torgb partly copied; squeeze new; conv1 dropped']),
    # Squeeze r=8 -> r=4: the squeeze width q changes, so the squeeze layers keep only their styles.
    (dict(architecture='squeeze', squeeze_r=8), dict(architecture='squeeze', squeeze_r=4),
     ['  copied whole: synthesis.b4, mapping',
      '  synthesis.b8: conv0, blend, resample_filter copied; squeeze, excite, torgb partly copied',
      '  synthesis.b16: conv0, resample_filter copied; squeeze, torgb partly copied']),
    # Skip -> resnet: a 1x1 skip conv per block is new; only the last block has a toRGB.
    (dict(), dict(architecture='resnet'),
     ['  copied whole: mapping',
      '  synthesis.b4: const, conv1, resample_filter copied; torgb dropped',
      '  synthesis.b8: conv0, conv1, resample_filter copied; skip new; torgb dropped',
      '  synthesis.b16: conv0, conv1, torgb, resample_filter copied; skip new']),
])
def test_generator_transfer_copies_what_fits_and_reports_the_rest(src_kwargs, dst_kwargs, expected):
    src = make_G(seed=1, **src_kwargs)
    dst = make_G(seed=2, **dst_kwargs)
    fresh = make_G(seed=2, **dst_kwargs)
    report = transfer.transfer_params_and_buffers(src, dst)
    _check_copied_and_fresh(src, fresh, dst, report)
    lines = _lines('G', report)
    assert lines[1:] == expected, '\n'.join(lines)
    assert lines[0].startswith(f'G: {len(report.copied)} tensors')
    assert not report.is_complete


def test_conditional_transfer_of_both_networks():
    G_report = transfer.transfer_params_and_buffers(make_G(seed=1), make_G(c_dim=3, seed=2))
    assert set(G_report.new) == {'mapping.embed.weight', 'mapping.embed.bias'}
    assert set(G_report.reshaped) == {'mapping.fc0.weight'}
    assert _lines('G', G_report)[1:] == ['  copied whole: synthesis.b4, synthesis.b8, synthesis.b16',
                                         '  mapping: fc1, w_avg copied; fc0 partly copied; embed new']
    D_src, D_dst, D_fresh = make_D(seed=1), make_D(c_dim=3, seed=2), make_D(c_dim=3, seed=2)
    D_report = transfer.transfer_params_and_buffers(D_src, D_dst)
    _check_copied_and_fresh(D_src, D_fresh, D_dst, D_report)
    assert _lines('D', D_report)[1:] == [  # In the order D builds its layers: blocks, label mapping, epilogue.
        '  copied whole: b16, b8',
        '  mapping: embed, fc0, fc1, fc2, fc3, fc4, fc5, fc6, fc7 new',
        '  b4: conv, fc copied; out new (shape differs)']
    # And back: the label layers of the conditional source are dropped.
    back = transfer.transfer_params_and_buffers(make_D(c_dim=3), make_D())
    assert 'mapping.fc0.weight' in back.dropped and 'b4.out.weight' in back.reshaped


def test_same_architecture_transfer_is_complete_and_one_line():
    report = transfer.transfer_params_and_buffers(make_G(seed=1), make_G(seed=2))
    assert report.is_complete and _lines('G', report) == [f'G: {len(report.copied)} tensors '
                                                          f'({sum(report.copied.values()):,} values) copied']


def test_layer_of():
    assert transfer.layer_of('synthesis.b8.conv0.affine.weight') == ('synthesis.b8', 'conv0')
    assert transfer.layer_of('synthesis.b4.const') == ('synthesis.b4', 'const')
    assert transfer.layer_of('mapping.fc0.weight') == ('mapping', 'fc0')
    assert transfer.layer_of('mapping.w_avg') == ('mapping', 'w_avg')
    assert transfer.layer_of('b256.fromrgb.weight') == ('b256', 'fromrgb')
    assert transfer.layer_of('p') == ('', 'p')

# ----------------------------------------------------------------------------
# The training loop (the helpers are test_training_loop's).


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def test_resume_from_an_official_format_skip_snapshot_into_a_squeeze_run(tmp_path, data_dir, capsys):
    _train(tmp_path / 'skip', data_dir, steps=1)
    with open(tmp_path / 'skip' / 'network-snapshot-000000.008.pkl', 'rb') as f:
        snapshot = snapshot_io.load_network_pkl(f)
    official = tmp_path / 'official-skip.pkl'
    official.write_bytes(official_format_pickle(snapshot))  # Classes from embedded source.
    capsys.readouterr()

    frozen_G = dict(class_name='torch.optim.Adam', lr=0.0, betas=(0.0, 0.99), eps=1e-8)
    state = _train(tmp_path / 'squeeze', data_dir, architecture='squeeze', steps=2, resume_pkl=str(official),
                   G_opt_kwargs=frozen_G, ema_kimg=1e9, ema_rampup=None)
    out = capsys.readouterr().out
    assert f'Resuming from "{official}"' in out
    assert 'synthesis.b8: conv0, resample_filter copied; torgb partly copied; squeeze, excite, blend new' in out
    assert 'G_ema: as G' in out and 'D: ' in out
    assert state.progress.cur_nimg == 2 * BATCH and state.nets.G.synthesis.architecture == 'squeeze'
    # With G's learning rate 0 and a still EMA, the copied tensors still hold the snapshot's values.
    for name in ('G', 'G_ema'):
        new, old = getattr(state.nets, name).synthesis, snapshot[name].synthesis
        assert torch.equal(new.b8.conv0.weight, old.b8.conv0.weight)
        assert torch.equal(new.b16.torgb.bias, old.b16.torgb.bias)
        assert new.b8.squeeze.weight.shape[0] < old.b8.conv1.weight.shape[0]


class FailsAtThirdStepLoss(StyleGAN2Loss):
    """A loss that meets an unreadable image in step three, after the first tick's snapshot."""

    calls = 0

    def accumulate_gradients(self, phase, **kwargs):
        if phase.startswith('G'):
            FailsAtThirdStepLoss.calls += 1
        if FailsAtThirdStepLoss.calls > 4:
            raise ValueError('Cannot read image "img007.png" in "data.zip": broken PNG file')
        return super().accumulate_gradients(phase=phase, **kwargs)


def test_an_error_mid_run_is_one_line_naming_what_is_intact(tmp_path, data_dir):
    FailsAtThirdStepLoss.calls = 0
    loss_kwargs = dict(class_name='test_train_transfer.FailsAtThirdStepLoss', r1_gamma=1.0)
    with pytest.raises(TrainingStopped) as error:
        _train(tmp_path / 'run', data_dir, steps=6, loss_kwargs=loss_kwargs)
    message = str(error.value)
    assert '\n' not in message
    assert message.startswith('Training stopped at 0.0 kimg: Cannot read image "img007.png"')
    assert 'network-snapshot-000000.008.pkl and training-state.pt are intact' in message
    assert isinstance(error.value.__cause__, ValueError)
    assert snapshot_io.load_network(str(tmp_path / 'run' / 'network-snapshot-000000.008.pkl')).z_dim == 8


def test_one_line_takes_the_original_error_of_a_data_loader_worker():
    worker_error = ValueError('Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent '
                              'call last):\n  File "x.py", line 1, in f\nValueError: Cannot read image "a.png"\n')
    # Without the type that starts the traceback's last line: the callers append it as '(ValueError)'.
    assert one_line(worker_error) == 'Cannot read image "a.png"'
    assert one_line(OSError('disk full\nmore')) == 'disk full'
    assert one_line(RuntimeError()) == 'RuntimeError'


def test_snapshot_tags_are_distinct_and_sort_in_training_order():
    assert snapshot_tag(4032, kimg_per_tick=4, total_kimg=25000) == '000004'  # The official name.
    tags = [snapshot_tag(nimg, kimg_per_tick=0.5, total_kimg=4) for nimg in range(64, 4000, 512)]
    assert len(set(tags)) == len(tags) and tags == sorted(tags)
    assert tags[:3] == ['000000.064', '000000.576', '000001.088']
    # A fractional training length makes the last snapshot fall into the previous one's kimg.
    assert snapshot_tag(4544, kimg_per_tick=4, total_kimg=4.5) == '000004.544'


def _quiet_options(run_dir, data, batch_gpu, optimizer='torch.optim.SGD'):
    """A run whose randomness is all in the latents and the data order: no noise inputs, augmentation, style
    mixing, path-length regularization, and minibatch-std groups of one (which no split changes)."""
    opts = tiny_options(run_dir, data, steps=3, steps_per_tick=3, batch_gpu=batch_gpu, augment_kwargs=None,
                        ada_target=None, loss_kwargs=dict(class_name='training.loss.StyleGAN2Loss', r1_gamma=1.0,
                                                          style_mixing_prob=0, pl_weight=0),
                        D_kwargs=dict(class_name='training.networks.Discriminator', channel_base=128,
                                      channel_max=16, epilogue_kwargs=dict(mbstd_group_size=1)),
                        image_snapshot_ticks=None, network_snapshot_ticks=None,
                        G_opt_kwargs=dict(class_name=optimizer, lr=0.01), D_opt_kwargs=dict(class_name=optimizer, lr=0.01))
    opts['G_kwargs']['synthesis_kwargs']['use_noise'] = False
    return opts


@pytest.mark.parametrize('optimizer', ['torch.optim.SGD', 'torch.optim.Adam'])
def test_batch_gpu_splits_the_batch_without_changing_the_result(tmp_path, data_dir, optimizer):
    # SGD steps are linear in the gradient, so this checks that the accumulated gradient is the batch mean
    # whatever the split. Adam normalizes each element by its own gradient history, which turns the rounding
    # differences of near-zero gradients into differences of up to one learning rate: a looser bound there.
    states = []
    for batch_gpu in (BATCH, 2):
        os.makedirs(tmp_path / str(batch_gpu))
        training_stats.reset()
        states.append(training_loop(**_quiet_options(tmp_path / str(batch_gpu), data_dir, batch_gpu, optimizer)))
    one_round, four_rounds = states
    assert one_round.progress.cur_nimg == four_rounds.progress.cur_nimg == 3 * BATCH
    atol = 2e-5 if optimizer.endswith('SGD') else 3 * 0.01
    for name in ('G', 'D', 'G_ema'):
        a = dict(getattr(one_round.nets, name).named_parameters())
        b = dict(getattr(four_rounds.nets, name).named_parameters())
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=atol), f'{name}.{key}'


def test_start_shows_module_summaries_and_stats_have_the_official_timing_keys(tmp_path, data_dir, capsys):
    _train(tmp_path / 'run', data_dir, steps=2, steps_per_tick=1, architecture='squeeze')
    out = capsys.readouterr().out
    assert out.count('<top-level>') == 2  # One table for G, one for D.
    assert 'synthesis.b8.squeeze' in out or 'b8.squeeze' in out
    try:
        import torch.utils.tensorboard  # noqa: F401  (an optional dependency: tfevents only where it is installed)
        assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'run'))
    except ImportError:
        assert 'Skipping tfevents export: ' in out
    with open(tmp_path / 'run' / 'stats.jsonl') as f:
        stats = [json.loads(line) for line in f]
    keys = set(stats[-1])
    assert {'Timing/total_sec', 'Timing/sec_per_tick', 'Timing/sec_per_kimg', 'Timing/maintenance_sec',
            'Timing/total_hours', 'Timing/total_days', 'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb',
            'Resources/peak_gpu_mem_reserved_gb', 'Progress/tick', 'Progress/kimg', 'Progress/augment',
            'Timing/Gmain', 'Timing/Dmain'} <= keys, sorted(keys)
    assert stats[-1]['Timing/Gmain']['mean'] > 0
