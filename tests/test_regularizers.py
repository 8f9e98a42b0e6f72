"""GGDR, GLeaD (SPEC §5) and LeCam and the seams they use: G features and G's tail (SynthesisNetwork), D features
and its decoder option (Discriminator, training/decoder.py), the D loss terms (training/regularizers/), and
tiny training runs with each regularizer: two gloo processes, exact resume (LeCam's averages included),
snapshots."""

import os

import pytest
import torch
from dist_utils import spawn
from test_training_loop import BATCH, make_image_folder, tiny_options

from torch_utils import misc, training_stats
from training import checkpoint, networks, snapshot_io
from training.decoder import FeatureDecoder, decoder_kwargs
from training.loss import DPass, StyleGAN2Loss
from training.networks import Discriminator, Generator, SynthesisNetwork
from training.regularizers import GGDRTerm, GLeaDTerm, cosine_distance
from training.regularizers.lecam import LeCamTerm
from training.training_loop import training_loop

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(channel_base=256, channel_max=32)
ARCHS = tuple(networks.SYNTHESIS_BLOCKS)
BLOCK_KWARGS = dict(squeeze=dict(squeeze_r=4))


def _synthesis(architecture, resolution=32, **kwargs):
    torch.manual_seed(0)
    return SynthesisNetwork(w_dim=8, img_resolution=resolution, img_channels=3, architecture=architecture,
                            **TINY, **BLOCK_KWARGS.get(architecture, {}), **kwargs)

# ----------------------------------------------------------------------------
# Generator seams.


@pytest.mark.parametrize('architecture', ARCHS)
def test_synthesis_features_leave_the_image_unchanged(architecture):
    S = _synthesis(architecture)
    ws = torch.randn([2, S.num_ws, 8])
    img = S(ws, noise_mode='const')
    img2, features = S(ws, return_features=[8, 16], noise_mode='const')
    assert torch.equal(img, img2)
    assert sorted(features) == [8, 16]  # Only the requested ones.
    assert features[8].shape == (2, 32, 8, 8) and features[16].shape == (2, 16, 16, 16)
    assert features[8].dtype == torch.float32


@pytest.mark.parametrize('architecture', ARCHS)
def test_forward_from_continues_a_full_pass_exactly(architecture):
    # The blocks above 8, run from the feature and image that block 8 passed on, give the full pass's image.
    S = _synthesis(architecture)
    ws = torch.randn([2, S.num_ws, 8])
    x = img = None
    for res, block_ws in zip(S.block_resolutions, S.block_ws(ws), strict=True):
        if res > 8:
            break
        x, img = getattr(S, f'b{res}')(x, img, block_ws, noise_mode='const')
    tail_ws = ws[:, S.num_ws - S.tail_num_ws(8):]
    assert torch.equal(S.forward_from(8, x, img, tail_ws, noise_mode='const'), S(ws, noise_mode='const'))


def test_tail_rows_match_the_published_counts():
    # SPEC §5: the stock 256x256 G's blocks above 64 consume 5 rows of ws, those above 32 consume 7; a squeeze
    # block has two more convolutions, so its tail consumes more.
    stock = SynthesisNetwork(w_dim=8, img_resolution=256, img_channels=3, channel_base=512, channel_max=8)
    assert (stock.num_ws, stock.tail_num_ws(64), stock.tail_num_ws(32)) == (14, 5, 7)
    squeeze = SynthesisNetwork(w_dim=8, img_resolution=256, img_channels=3, channel_base=512, channel_max=8,
                               architecture='squeeze', squeeze_r=4)
    assert squeeze.tail_num_ws(64) > 5
    with pytest.raises(ValueError, match='below 256'):
        stock.tail_num_ws(256)
    with pytest.raises(ValueError, match='no block at resolution 12'):
        stock(torch.zeros([1, 14, 8]), return_features=[12])

# ----------------------------------------------------------------------------
# Discriminator seams and the decoder.


def test_paper256_decoder_and_heads_have_the_published_counts():
    # SPEC §5: C[4..32] = 512, C[64] = 256 (paper256); 1,574,656 decoder weights; heads 771 + 65,792 / 131,584
    # (feat_proj1 for glead_res_g = 64 / 32) + 131,584.
    channels = {res: min(16384 // res, 512) for res in (4, 8, 16, 32, 64, 128, 256)}
    decoder = FeatureDecoder(channels, img_resolution=256, out_res=64)
    assert sum(p.numel() for p in decoder.parameters()) == 1_574_656
    shapes = [tuple(getattr(decoder, f'dec{r}').weight.shape[:2]) for r in (8, 16, 32, 64)]
    assert shapes == [(512, 512), (512, 1024), (512, 1024), (256, 1024)]
    for feat_channels, feat_params in ((256, 65_792), (512, 131_584)):
        heads = FeatureDecoder(channels, 256, out_res=64, heads=dict(img_channels=3, feat_channels=feat_channels,
                                                                      w_dim=512)).heads
        counts = [sum(p.numel() for p in getattr(heads, name).parameters())
                  for name in ('img_proj', 'feat_proj1', 'feat_proj2')]
        assert counts == [771, feat_params, 131_584]


def _discriminator(out_res=8, heads=None, resolution=32):
    torch.manual_seed(0)
    return Discriminator(c_dim=0, img_resolution=resolution, img_channels=3, **TINY,
                         decoder_kwargs=decoder_kwargs(out_res, heads))


def test_discriminator_features_and_decoder_leave_the_logits_unchanged():
    D = _discriminator(out_res=16, heads=dict(img_channels=3, feat_channels=16, w_dim=8))
    img = torch.randn([4, 3, 32, 32])
    logits = D(img, None)
    logits2, features, decoded = D(img, None, return_features=[4, 16], decode=True)
    assert torch.equal(logits, logits2)
    assert {r: tuple(f.shape) for r, f in features.items()} == {4: (4, 32, 4, 4), 16: (4, 16, 16, 16)}
    assert tuple(decoded['feature'].shape) == (4, 16, 16, 16)
    assert tuple(decoded['image'].shape) == (4, 3, 16, 16)
    assert tuple(decoded['head_feature'].shape) == (4, 16, 16, 16)
    assert tuple(decoded['w'].shape) == (4, 1, 8)


def test_decoder_option_errors():
    with pytest.raises(ValueError, match=r'power of two in \[8, 32\]'):
        _discriminator(out_res=64)
    with pytest.raises(ValueError, match='needs a decoder'):
        Discriminator(c_dim=0, img_resolution=32, img_channels=3, **TINY)(torch.zeros([1, 3, 32, 32]), None,
                                                                          decode=True)


def test_a_discriminator_without_decoder_keeps_the_official_state_dict():
    plain = Discriminator(c_dim=0, img_resolution=32, img_channels=3, **TINY)
    decoded = _discriminator()
    assert set(decoded.state_dict()) - set(plain.state_dict()) == {k for k in decoded.state_dict()
                                                                    if k.startswith('decoder.')}
    assert not any(k.startswith('decoder') for k in plain.state_dict())

# ----------------------------------------------------------------------------
# Loss terms: closed forms and where the gradients go.


def test_cosine_term_closed_forms():
    feature = torch.randn([3, 5, 4, 4])
    term = GGDRTerm(G_synthesis=None, device='cpu', res=4, weight=10)
    record = lambda decoded: DPass(real=False, main=True, phase='Dmain', gain=1, logits=None,  # noqa: E731
                                   images=None, clean=None, decoded=dict(feature=decoded), g_feature=feature)
    assert torch.allclose(term.fake_loss(record(feature)), torch.zeros(3), atol=1e-6)
    assert torch.allclose(term.fake_loss(record(-feature)), torch.full([3], 20.0))
    # Scale does not matter, direction does: a positive multiple is identical, an orthogonal feature gives 1.
    assert torch.allclose(cosine_distance(feature * 3, feature), torch.zeros(3), atol=1e-6)
    a = torch.zeros([1, 2, 1, 1])
    a[0, 0] = 1
    b = torch.zeros([1, 2, 1, 1])
    b[0, 1] = 1
    assert cosine_distance(a, b).item() == 1
    with pytest.raises(ValueError, match='same --cbase/--cmax'):
        cosine_distance(torch.zeros([1, 4, 2, 2]), torch.zeros([1, 5, 2, 2]))


def _loss_and_networks(reg, architecture='skip', fake='gfeat'):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(architecture=architecture, **TINY, **BLOCK_KWARGS.get(architecture, {})))
    if reg == 'ggdr':
        D = _discriminator(out_res=8)
        terms = [dict(class_name='training.regularizers.GGDRTerm', res=8)]
    else:
        D = _discriminator(out_res=16, heads=dict(img_channels=3, feat_channels=32, w_dim=8))
        terms = [dict(class_name='training.regularizers.GLeaDTerm', res_g=8, distance='mse', fake=fake)]
    G.requires_grad_(False)
    D.requires_grad_(False)
    loss = StyleGAN2Loss(device='cpu', G_mapping=G.mapping, G_synthesis=G.synthesis, D=D, r1_gamma=1,
                         augment_pipe=None, d_terms=terms)
    return loss, G, D


def _grads_after(phase, loss, G, D):
    module = G if phase.startswith('G') else D
    module.requires_grad_(True)
    for p in list(G.parameters()) + list(D.parameters()):
        p.grad = None
    training_stats.reset()
    loss.accumulate_gradients(phase, real_img=torch.randn([4, 3, 32, 32]), real_c=torch.zeros([4, 0]),
                              gen_z=torch.randn([4, 8]), gen_c=torch.zeros([4, 0]), gain=1)
    module.requires_grad_(False)
    grads = lambda m: [p.grad for p in m.parameters()]  # noqa: E731
    return grads(G), grads(D), grads(D.decoder)


@pytest.mark.parametrize('architecture', ARCHS)
@pytest.mark.parametrize('reg, fake', [('ggdr', None), ('glead', 'gfeat'), ('glead', 'gfwimage')])
def test_gradients_reach_only_d_in_d_phases(reg, fake, architecture):
    loss, G, D = _loss_and_networks(reg, architecture=architecture, fake=fake)
    G_grads, D_grads, decoder_grads = _grads_after('Dmain', loss, G, D)
    assert all(g is None for g in G_grads)  # G is frozen; GLeaD's gradients pass through G's tail into D.
    assert all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in D_grads)
    # In G's phases no term runs: the decoder gets nothing.
    _G_grads, _D_grads, decoder_grads = _grads_after('Gmain', loss, G, D)
    assert all(g is None for g in decoder_grads)


def test_reals_term_runs_in_the_lazy_r1_step_for_glead_only():
    # GGDR has no term on reals, so its decoder takes no part in Dreg; GLeaD's reconstruction of reals does.
    loss, G, D = _loss_and_networks('ggdr')
    assert all(g is None for g in _grads_after('Dreg', loss, G, D)[2])
    loss, G, D = _loss_and_networks('glead')
    assert all(g is not None and g.abs().sum() > 0 for g in _grads_after('Dreg', loss, G, D)[2])


def test_the_ggdr_term_is_reported_within_its_range():
    loss, G, D = _loss_and_networks('ggdr')
    collector = training_stats.Collector(regex='Loss/D/ggdr')
    _grads_after('Dmain', loss, G, D)
    collector.update()
    assert collector.num('Loss/D/ggdr') == 4
    assert 0 < collector.mean('Loss/D/ggdr') < 20  # weight 10 * (1 - cos), cos in [-1, 1].


def test_glead_tail_needs_a_block_above_res_g():
    S = _synthesis('skip')
    with pytest.raises(ValueError, match='below 32'):
        GLeaDTerm(G_synthesis=S, device='cpu', res_g=32, distance='mse')
    with pytest.raises(ValueError, match='gfeat, gfwimage'):
        GLeaDTerm(G_synthesis=S, device='cpu', res_g=8, distance='mse', fake='feat')
    with pytest.raises(ValueError, match='LPIPS needs weights'):
        GLeaDTerm(G_synthesis=S, device='cpu', res_g=8, distance='lpips')

def _pass(real, logits, main=True):
    logits = torch.tensor(logits).reshape(-1, 1)
    return DPass(real=real, main=main, phase='Dmain' if main else 'Dreg', gain=1, logits=logits, images=None,
                 clean=None)


def test_lecam_closed_forms_and_zero_debiased_averages():
    term = LeCamTerm(G_synthesis=None, device='cpu', weight=2.0, decay=0.5)
    # The loss sees fakes first: no real seen yet, so no term on fakes; the fake average is the first mean (2).
    assert term.fake_loss(_pass(False, [1.0, 3.0])) is None
    # Reals above the fakes' average: 2 * relu([2, 4] - 2)^2.
    assert torch.equal(term.real_loss(_pass(True, [2.0, 4.0])), torch.tensor([0.0, 8.0]))
    # The lazy R1 step neither adds a term nor moves the averages.
    assert term.real_loss(_pass(True, [100.0, 100.0], main=False)) is None
    # Fakes below the reals' average (3): 2 * relu(3 - [0, 5])^2; the fake average now (0.5 * 1 + 0.5 * 2.5) / 0.75.
    assert torch.equal(term.fake_loss(_pass(False, [0.0, 5.0])), torch.tensor([18.0, 0.0]))
    assert term._average('fake').item() == pytest.approx(1.75 / 0.75) and term._average('real').item() == 3.0
    # Its state round-trips into a fresh term, which then computes the same.
    fresh = LeCamTerm(G_synthesis=None, device='cpu', weight=2.0, decay=0.5)
    fresh.load_state_dict(term.state_dict())
    assert torch.equal(fresh.real_loss(_pass(True, [4.0, 1.0])), term.real_loss(_pass(True, [4.0, 1.0])))
    assert fresh.state_dict() == term.state_dict()


def test_the_loss_state_holds_the_terms_and_an_old_state_still_loads():
    loss, G, D = _loss_and_networks('ggdr')
    loss.d_terms.insert(0, LeCamTerm(G_synthesis=G.synthesis, device='cpu', weight=1.0))
    _grads_after('Dmain', loss, G, D)
    state = loss.state_dict()
    assert list(state['d_terms']) == ['0.lecam', '1.ggdr'] and state['d_terms']['1.ggdr'] == {}
    assert state['d_terms']['0.lecam']['updates_real'] == 1
    loss.load_state_dict(dict(pl_mean=torch.ones([])))  # A state written before terms had state: kept as is.
    assert loss.d_terms[0].updates_real == 1 and loss.pl_mean.item() == 1
    with pytest.raises(ValueError, match='D terms this run does not have: 0.glead'):
        loss.load_state_dict(dict(pl_mean=torch.ones([]), d_terms={'0.glead': {}}))

# ----------------------------------------------------------------------------
# Tiny training runs with each regularizer.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def reg_options(run_dir, data, reg, architecture='skip', **overrides):
    """tiny_options with the regularizers of `reg`, a comma list as --reg takes; LeCam at a weight that acts."""
    opts = tiny_options(run_dir, data, architecture=architecture, **overrides)
    terms = opts['loss_kwargs']['d_terms'] = []
    for name in reg.split(','):
        if name == 'ggdr':
            opts['D_kwargs']['decoder_kwargs'] = decoder_kwargs(8)
            terms.append(dict(class_name='training.regularizers.GGDRTerm', res=8))
        elif name == 'glead':
            opts['D_kwargs']['decoder_kwargs'] = decoder_kwargs(8, dict(img_channels=3, feat_channels=16, w_dim=8))
            terms.append(dict(class_name='training.regularizers.GLeaDTerm', res_g=8, distance='mse'))
        elif name == 'lecam':
            terms.append(dict(class_name='training.regularizers.lecam.LeCamTerm', weight=0.1))
    return opts


def _train(run_dir, data, reg, **kwargs):
    os.makedirs(run_dir, exist_ok=True)
    training_stats.reset()
    return training_loop(**reg_options(str(run_dir), data, reg, **kwargs))


def _tensors(state):
    tensors = {f'G_ema.{k}': v.clone() for k, v in state.nets.G_ema.state_dict().items()}
    tensors.update({f'D.{k}': v.clone() for k, v in state.nets.D.state_dict().items()})
    tensors['pl_mean'] = state.optim.loss.pl_mean.clone()
    for key, term_state in state.optim.loss.state_dict()['d_terms'].items():
        tensors.update({f'{key}.{k}': torch.as_tensor(v) for k, v in term_state.items()})
    return tensors


@pytest.mark.parametrize('reg', ['lecam,ggdr', 'glead'])
def test_exact_resume_with_a_regularizer(tmp_path, data_dir, reg):
    straight = _train(tmp_path / 'straight', data_dir, reg, architecture='squeeze', steps=4, ada_target=-0.9)
    _train(tmp_path / 'split', data_dir, reg, architecture='squeeze', steps=2, ada_target=-0.9)
    state_file = checkpoint.find_state_file(str(tmp_path / 'split'))
    record = checkpoint.load_training_state(state_file)
    assert any(k.startswith('decoder.') for k in record['networks']['D'])  # The decoder is in the state.
    if reg.startswith('lecam'):  # So are LeCam's averages, which the resumed run continues (compared below).
        assert record['loss']['d_terms']['0.lecam']['updates_real'] == 2 * 2  # Two Dmain steps of two rounds.
    resumed = _train(tmp_path / 'split', data_dir, reg, architecture='squeeze', steps=4, ada_target=-0.9,
                     resume_state=state_file)
    expected, got = _tensors(straight), _tensors(resumed)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    # The snapshot holds D with its decoder, and its G runs as usual.
    data = snapshot_io.load_network_pkl(open(tmp_path / 'split' / 'network-snapshot-000000.032.pkl', 'rb'))
    assert data['D'].decoder is not None
    img = data['G_ema'](torch.randn([1, 8]), torch.eye(3)[:1], noise_mode='const')
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


def _two_rank_worker(rank, world_size, run_root, data):
    # Both regularizers in one process group, each run a separate training_loop in its own directory; then LeCam
    # with GGDR interrupted after two steps and resumed from rank 0's state, against the uninterrupted run.
    # With the path-length term, whose running mean is each rank's own: the state holds every rank's.
    training_stats.init_multiprocessing(rank, sync_device=torch.device('cpu'))
    runs = dict()
    for reg, run, steps, resume in (('lecam,ggdr', 'lecam', 3, False), ('glead', 'glead', 3, False),
                                    ('lecam,ggdr', 'split', 2, False), ('lecam,ggdr', 'split', 3, True)):
        training_stats.reset_values()  # Keeps init_multiprocessing: the ranks judge health on shared statistics.
        torch.distributed.barrier()  # Rank 0 has written the state a resume reads.
        run_dir = os.path.join(run_root, run)
        opts = reg_options(run_dir, data, reg, steps=steps, num_gpus=world_size, rank=rank, batch_gpu=2,
                           resume_state=checkpoint.find_state_file(run_dir) if resume else None)
        state = runs[run] = training_loop(device=torch.device('cpu'), **opts)
        for module in (state.nets.G, state.nets.D, state.nets.G_ema, state.nets.augment_pipe):
            misc.check_ddp_consistency(module, ignore_regex=r'.*\.w_avg')
        assert state.progress.cur_nimg == steps * BATCH
        assert state.nets.D.decoder is not None
    # LeCam's averages are the same on both ranks: each pass's mean logit is averaged over them.
    lecam = runs['lecam'].optim.loss.d_terms[0]
    assert lecam.updates_real == lecam.updates_fake == 3 * 2  # Three Dmain steps of two rounds.
    averages = [torch.zeros(2) for _ in range(world_size)]
    torch.distributed.all_gather(averages, torch.stack([lecam.biased_real, lecam.biased_fake]))
    assert torch.equal(averages[0], averages[1]) and averages[0].abs().min() > 0
    # The resumed run is the uninterrupted one, bit for bit, averages included (w_avg is each rank's own).
    expected, got = _tensors(runs['lecam']), _tensors(runs['split'])
    assert [name for name in expected if not torch.equal(expected[name], got[name])
            and not name.endswith('.w_avg')] == []


def test_two_gloo_processes_with_each_regularizer(tmp_path, data_dir):
    for run in ('lecam', 'glead', 'split'):
        os.makedirs(tmp_path / run)
    spawn(_two_rank_worker, 2, str(tmp_path), data_dir, timeout=600)
    for run in ('lecam', 'glead'):
        assert os.path.isfile(tmp_path / run / 'network-snapshot-000000.024.pkl')
