"""--fast-demod: G's demodulation coefficients from one small matmul (issue 23). The default stays the official
computation bitwise (tests/test_networks_vectors.py); this one is the same maths with other rounding."""

import pytest
import torch
from test_loss import _run_phase
from test_networks import VARIANTS, tiny_G

from training import networks

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('up', [1, 2])
def test_coefficients_equal_the_per_sample_weight_norms(fused, up):
    # Closed form in float64: d[n,o] = rsqrt(sum (weight[o,i] * styles[n,i])^2 + 1e-8) scales output channel o.
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn([3, 5, 6, 6], generator=g, dtype=torch.float64), torch.randn([7, 5, 3, 3], generator=g,
                                                                                         dtype=torch.float64)
    styles = torch.randn([3, 5], generator=g, dtype=torch.float64)
    f = torch.tensor([1., 3., 3., 1.]) if up == 2 else None
    kwargs = dict(x=x, weight=weight, styles=styles, up=up, padding=1, flip_weight=(up == 1), fused_modconv=fused,
                  resample_filter=None if f is None else torch.outer(f, f) / 64)
    plain = networks.modulated_conv2d(demodulate=False, **kwargs)
    d = ((weight[None] * styles[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    fast = networks.modulated_conv2d(demodulate=True, fast_demod=True, **kwargs)
    torch.testing.assert_close(fast, plain * d[:, :, None, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_generators_agree_with_the_exact_path_in_float32(variant):
    torch.manual_seed(0)
    G = tiny_G(**VARIANTS[variant])
    z, c = torch.randn([4, G.z_dim]), torch.zeros([4, 0])
    for training in (False, True):
        G.train(training)
        exact, fast = G(z, c, noise_mode='const'), G(z, c, noise_mode='const', fast_demod=True)
        torch.testing.assert_close(fast, exact, rtol=0, atol=1e-5)
    grads = []
    for fast_demod in (False, True):
        G.zero_grad(set_to_none=True)
        G(z, c, noise_mode='const', fast_demod=fast_demod).square().sum().backward()
        grads.append([p.grad for p in G.parameters()])
    # Per tensor, relative to its norm: a gradient entry that is a sum with cancellation keeps only the
    # absolute rounding of its terms.
    errors = [((fast - exact).norm() / exact.norm()).item() for exact, fast in zip(*grads, strict=True)]
    assert max(errors) < 1e-4, errors


def test_the_loss_passes_it_to_the_generator():
    # The same phase with and without: close gradients, and not the same bits (so the option reached G).
    G_exact, _, _ = _run_phase('Gmain', architecture='squeeze')
    G_fast, _, _ = _run_phase('Gmain', architecture='squeeze', fast_demod=True)
    pairs = [(a.grad, b.grad) for a, b in zip(G_exact.parameters(), G_fast.parameters(), strict=True)]
    assert max(((fast - exact).norm() / exact.norm()).item() for exact, fast in pairs) < 1e-4
    assert not all(torch.equal(exact, fast) for exact, fast in pairs)
