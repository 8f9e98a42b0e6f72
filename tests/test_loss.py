"""training.loss: closed forms of every loss term, the lazy-regularization arithmetic, and the phases of
StyleGAN2Loss on tiny networks."""

import math

import pytest
import torch

from torch_utils import training_stats
from torch_utils.ops import conv2d_gradfix
from training import loss as loss_module
from training import networks
from training.loss import StyleGAN2Loss

pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------
# Closed forms.


def test_logistic_losses():
    logits = torch.tensor([[-2.0], [0.0], [3.0]], dtype=torch.float64)
    sigmoid = torch.sigmoid(logits)
    torch.testing.assert_close(loss_module.generator_loss(logits), -torch.log(sigmoid))
    torch.testing.assert_close(loss_module.discriminator_loss_real(logits), -torch.log(sigmoid))
    torch.testing.assert_close(loss_module.discriminator_loss_fake(logits), -torch.log(1 - sigmoid))
    # Large logits stay finite (softplus, not log of sigmoid).
    assert torch.isfinite(loss_module.generator_loss(torch.tensor([-1e4]))).all()


def test_r1_penalty_of_a_linear_discriminator():
    # D(x) = <a, x>: grad_x D = a for every sample, so the penalty is ||a||^2 and the loss gamma/2 ||a||^2.
    torch.manual_seed(0)
    a = torch.randn([3, 4, 4], dtype=torch.float64, requires_grad=True)
    x = torch.randn([5, 3, 4, 4], dtype=torch.float64, requires_grad=True)
    logits = (x * a).sum(dim=[1, 2, 3]).unsqueeze(1)
    penalty = loss_module.r1_penalty(logits, x)
    expected = a.detach().square().sum()
    torch.testing.assert_close(penalty, expected.expand(5))
    # The penalty is differentiable w.r.t. D's parameters: d/da ||a||^2 = 2a.
    grad_a, = torch.autograd.grad(penalty.sum(), a)
    torch.testing.assert_close(grad_a, 5 * 2 * a.detach())


def test_path_length_of_a_linear_synthesis():
    # img = sum_k A_k w_k (rows k of ws): J^T y for row k is A_k^T y, so
    # length = sqrt(mean_k ||A_k^T y||^2).
    torch.manual_seed(0)
    num_ws, w_dim, shape = 3, 4, (2, 3, 3)
    A = torch.randn([num_ws, *shape, w_dim], dtype=torch.float64)
    ws = torch.randn([2, num_ws, w_dim], dtype=torch.float64, requires_grad=True)
    img = torch.einsum('kchwd,nkd->nchw', A, ws)
    noise = torch.randn_like(img)
    lengths = loss_module.path_lengths(img, ws, pl_noise=noise)
    for n in range(2):
        per_row = [torch.einsum('chwd,chw->d', A[k], noise[n]).square().sum() for k in range(num_ws)]
        torch.testing.assert_close(lengths[n], torch.stack(per_row).mean().sqrt())


def test_default_path_length_noise_is_scaled_by_the_image_size():
    # For a linear synthesis E[length^2] = mean_k ||A_k||_F^2 / (H W): the noise has variance 1 / (H W).
    torch.manual_seed(0)
    A = torch.randn([1, 1, 8, 8, 2], dtype=torch.float64)
    ws = torch.zeros([4000, 1, 2], dtype=torch.float64, requires_grad=True)
    img = torch.einsum('kchwd,nkd->nchw', A, ws)
    lengths = loss_module.path_lengths(img, ws)
    expected = A.square().sum() / 64
    assert abs(lengths.square().mean().item() / expected.item() - 1) < 0.05


def test_path_length_penalty_and_running_mean():
    lengths = torch.tensor([1.0, 3.0])
    penalty, new_mean = loss_module.path_length_penalty(lengths, torch.tensor(0.0), pl_decay=0.01)
    assert new_mean.item() == pytest.approx(0.02)
    torch.testing.assert_close(penalty, (lengths - 0.02).square())
    _, next_mean = loss_module.path_length_penalty(lengths, new_mean, pl_decay=0.01)
    assert next_mean.item() == pytest.approx(0.02 + 0.01 * (2 - 0.02))


def test_style_mixing_mask():
    torch.manual_seed(0)
    assert not loss_module.style_mixing_mask(8, 0.0, torch.device('cpu')).any()
    cutoffs = set()
    for _ in range(200):
        mask = loss_module.style_mixing_mask(8, 1.0, torch.device('cpu'))
        cutoff = int(mask.logical_not().sum())
        assert mask.tolist() == [i >= cutoff for i in range(8)]
        cutoffs.add(cutoff)
    assert cutoffs == set(range(1, 8))  # Never 0 (mixing everything is no mixing) and never 8.

# ----------------------------------------------------------------------------
# Lazy regularization.


def test_phase_plan_lazy_regularization():
    opt = dict(lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    G_phases = loss_module.phase_plan('G', 4, opt)
    assert [(p.name, p.interval) for p in G_phases] == [('Gmain', 1), ('Greg', 4)]
    assert G_phases[0].opt_kwargs.lr == pytest.approx(0.0025 * 4 / 5)
    assert G_phases[0].opt_kwargs.betas == pytest.approx((0.0, 0.99 ** 0.8))
    assert all(isinstance(b, float) for b in G_phases[0].opt_kwargs.betas)
    D_phases = loss_module.phase_plan('D', 16, opt)
    assert [(p.name, p.interval) for p in D_phases] == [('Dmain', 1), ('Dreg', 16)]
    assert D_phases[1].opt_kwargs.lr == pytest.approx(0.0025 * 16 / 17)
    assert opt['lr'] == 0.0025  # The caller's settings are not modified.
    both = loss_module.phase_plan('D', None, opt)
    assert [(p.name, p.interval, p.opt_kwargs.lr) for p in both] == [('Dboth', 1, 0.0025)]
    with pytest.raises(ValueError):
        loss_module.phase_plan('X', 4, opt)
    with pytest.raises(ValueError):
        loss_module.phase_plan('G', 0, opt)

# ----------------------------------------------------------------------------
# StyleGAN2Loss on tiny networks.


def _tiny_setup(c_dim=0, architecture='skip', **loss_kwargs):
    torch.manual_seed(0)
    synthesis_kwargs = dict(channel_base=64, channel_max=8, architecture=architecture)
    if architecture == 'squeeze':
        synthesis_kwargs['squeeze_r'] = 2
    G = networks.Generator(z_dim=4, c_dim=c_dim, w_dim=4, img_resolution=8, img_channels=3,
                           mapping_kwargs=dict(num_layers=1), synthesis_kwargs=synthesis_kwargs).train()
    D = networks.Discriminator(c_dim=c_dim, img_resolution=8, img_channels=3, channel_base=64, channel_max=8,
                               epilogue_kwargs=dict(mbstd_group_size=2)).train()
    loss = StyleGAN2Loss('cpu', G.mapping, G.synthesis, D, **loss_kwargs)
    batch = dict(real_img=torch.randn([4, 3, 8, 8]), real_c=torch.eye(4)[:, :c_dim],
                 gen_z=torch.randn([4, 4]), gen_c=torch.eye(4)[:, :c_dim])
    return G, D, loss, batch


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _run_phase(phase, gain=1, seed=1, **kwargs):
    G, D, loss, batch = _tiny_setup(**kwargs)
    module = G if phase.startswith('G') else D
    G.requires_grad_(module is G)
    D.requires_grad_(module is D)
    torch.manual_seed(seed)
    loss.accumulate_gradients(phase, gain=gain, **batch)
    return G, D, loss


@pytest.mark.parametrize('phase', ['Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth'])
@pytest.mark.parametrize('architecture', ['skip', 'squeeze'])
def test_each_phase_reaches_every_parameter_of_its_network(phase, architecture):
    G, D, loss = _run_phase(phase, architecture=architecture)
    module, other = (G, D) if phase.startswith('G') else (D, G)
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    assert missing == []  # DDP needs every parameter in every phase's graph.
    assert all(p.grad is None for p in other.parameters())
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_gain_scales_the_gradients():
    for phase in ('Gmain', 'Greg', 'Dmain', 'Dreg'):
        G1, D1, _ = _run_phase(phase, gain=1)
        G4, D4, _ = _run_phase(phase, gain=4)
        module1, module4 = (G1, G4) if phase.startswith('G') else (D1, D4)
        g1, g4 = _grads(module1), _grads(module4)
        assert g1.keys() == g4.keys() and g1
        for name in g1:
            torch.testing.assert_close(g4[name], 4 * g1[name], rtol=1e-4, atol=1e-6, msg=f'{phase} {name}')


def test_regularization_passes_update_pl_mean_and_skip_when_weight_is_zero():
    _G, _D, loss = _run_phase('Greg')
    assert loss.pl_mean.item() > 0
    G, _D, loss = _run_phase('Greg', pl_weight=0)
    assert loss.pl_mean.item() == 0 and all(p.grad is None for p in G.parameters())
    _G, D, _loss = _run_phase('Dreg', r1_gamma=0)
    assert all(p.grad is None for p in D.parameters())


def test_regularization_passes_skip_weight_gradients(monkeypatch):
    # The inner autograd.grad calls of R1 and path length run inside no_weight_gradients().
    seen = []
    original = conv2d_gradfix.no_weight_gradients

    def spy(disable=True):
        seen.append(disable)
        return original(disable)
    monkeypatch.setattr(conv2d_gradfix, 'no_weight_gradients', spy)
    _run_phase('Greg')
    _run_phase('Dreg')
    assert seen == [True, True]


def test_dreg_equals_gamma_half_r1_gradient():
    # The Dreg phase's gradient is exactly the gradient of gain * gamma/2 * mean ||grad D||^2.
    gamma = 3.0
    G, D, loss, batch = _tiny_setup(r1_gamma=gamma)
    G.requires_grad_(False)
    loss.accumulate_gradients('Dreg', gain=2, **batch)
    expected_grads = _grads(D)
    D.zero_grad(set_to_none=True)
    x = batch['real_img'].detach().requires_grad_(True)
    penalty = loss_module.r1_penalty(D(x, batch['real_c']), x)
    (penalty.mean() * gamma / 2 * 2).backward()
    for name, grad in _grads(D).items():
        torch.testing.assert_close(expected_grads[name], grad, msg=name)


def test_style_mixing_uses_two_latents():
    G, _D, loss, batch = _tiny_setup(style_mixing_prob=1.0)
    G.eval()
    torch.manual_seed(5)
    _img, ws = loss.run_G(batch['gen_z'], batch['gen_c'])
    plain = G.mapping(batch['gen_z'], batch['gen_c'])
    same_rows = (ws == plain).all(dim=2).all(dim=0)
    cutoff = int(same_rows.sum())
    assert 1 <= cutoff < G.num_ws
    assert same_rows.tolist() == [i < cutoff for i in range(G.num_ws)]
    loss.style_mixing_prob = 0
    _img, ws = loss.run_G(batch['gen_z'], batch['gen_c'])
    assert torch.equal(ws, plain)


def test_training_stats_are_reported():
    training_stats.reset()
    collector = training_stats.Collector(regex='Loss/.*')
    G, D, loss, batch = _tiny_setup()
    for phase in ('Gmain', 'Greg', 'Dmain', 'Dreg'):
        G.requires_grad_(phase.startswith('G'))
        D.requires_grad_(phase.startswith('D'))
        loss.accumulate_gradients(phase, gain=1, **batch)
    collector.update()
    assert set(collector.names()) == {'Loss/scores/fake', 'Loss/signs/fake', 'Loss/scores/real', 'Loss/signs/real',
                                      'Loss/G/loss', 'Loss/G/reg', 'Loss/pl_penalty', 'Loss/D/loss', 'Loss/D/reg',
                                      'Loss/r1_penalty'}
    assert collector.num('Loss/G/loss') == 4 and collector.num('Loss/pl_penalty') == 2  # pl batch shrink 2.
    assert all(math.isfinite(collector.mean(name)) for name in collector.names())
    assert -1 <= collector.mean('Loss/signs/real') <= 1
    training_stats.reset()


def test_conditional_loss_and_augment_pipe_hook():
    calls = []

    class CountingPipe(torch.nn.Module):
        def forward(self, images):
            calls.append(images.shape[0])
            return images.flip(3)
    G, D, loss, batch = _tiny_setup(c_dim=4)
    loss.augment_pipe = CountingPipe()
    G.requires_grad_(False)
    loss.accumulate_gradients('Dboth', gain=1, **batch)
    assert calls == [4, 4]  # Fakes, then reals: every image D sees goes through the pipe.
    assert all(p.grad is not None for p in D.parameters())


def test_unknown_phase():
    _G, _D, loss, batch = _tiny_setup()
    with pytest.raises(ValueError, match='Unknown phase'):
        loss.accumulate_gradients('Gfoo', gain=1, **batch)
