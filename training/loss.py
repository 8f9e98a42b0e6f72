"""The StyleGAN2 objective: non-saturating logistic loss, lazy R1 on reals, path-length regularization and
style mixing (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", 2020, Sec. 2.2 and 3.2).

The loss terms are small functions of tensors so tests can check them against closed forms; `StyleGAN2Loss`
runs the networks and calls them per training phase. Phase names and gains follow the training loop's
protocol: `Gmain`/`Dmain` every step with gain 1, `Greg`/`Dreg` every `interval` steps with gain = interval
(lazy regularization), or `Gboth`/`Dboth` for both at once. `phase_plan` computes that schedule together with
the optimizer settings that compensate for it.
"""

import contextlib
import dataclasses
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import training_stats
from torch_utils.ops import conv2d_gradfix

PHASES = ('Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth')

# The statistics the loss reports (training_stats), defined once here: their readers (ADA's controller in
# training.augment, the divergence monitor in training.health) import these names, so that a rename cannot
# leave a reader listening to a statistic that no longer exists, and grep finds every use.
STAT_SCORES_REAL    = 'Loss/scores/real'    # D's logits of reals.
STAT_SCORES_FAKE    = 'Loss/scores/fake'    # D's logits of fakes.
STAT_SIGNS_REAL     = 'Loss/signs/real'     # sign(D(real)); ADA's overfitting heuristic r_t is its mean.
STAT_SIGNS_FAKE     = 'Loss/signs/fake'     # sign(D(fake)).
STAT_G_LOSS         = 'Loss/G/loss'         # generator_loss per sample.
STAT_G_REG          = 'Loss/G/reg'          # Weighted path-length penalty per sample.
STAT_PL_PENALTY     = 'Loss/pl_penalty'     # Path-length penalty per sample, unweighted.
STAT_D_LOSS         = 'Loss/D/loss'         # D's loss on fakes plus reals per sample.
STAT_D_REG          = 'Loss/D/reg'          # Weighted R1 penalty per sample.
STAT_R1_PENALTY     = 'Loss/r1_penalty'     # R1 penalty per sample, unweighted.
STAT_G_IMG_ABSMAX   = 'Health/G/img_absmax' # max |pixel| of each image G made in Gmain (training.health's ceiling).

# ----------------------------------------------------------------------------
# Loss terms.


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss per sample: -log sigmoid(D(G(z))) = softplus(-D(G(z)))."""
    return F.softplus(-fake_logits)


def discriminator_loss_fake(fake_logits: torch.Tensor) -> torch.Tensor:
    """D loss on generated images per sample: -log(1 - sigmoid(D(G(z)))) = softplus(D(G(z)))."""
    return F.softplus(fake_logits)


def discriminator_loss_real(real_logits: torch.Tensor) -> torch.Tensor:
    """D loss on real images per sample: -log sigmoid(D(x)) = softplus(-D(x))."""
    return F.softplus(-real_logits)


def r1_penalty(real_logits: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """||grad_x D(x)||^2 per sample (Mescheder et al. 2018), differentiable w.r.t. D's parameters.

    `real_img` must require grad and `real_logits` must have been computed from it. The inner gradient needs
    only input gradients, so the weight gradients of convolutions are skipped there; the outer backward still
    reaches D's weights through the graph that create_graph keeps.
    """
    with conv2d_gradfix.no_weight_gradients():
        grads, = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img], create_graph=True,
                                     only_inputs=True)
    return grads.square().sum(dim=[1, 2, 3])


def path_lengths(gen_img: torch.Tensor, gen_ws: torch.Tensor, pl_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||J_w^T y|| per sample, y ~ N(0, I) / sqrt(H * W), with the Jacobian of the image w.r.t. w.

    The squared norm is summed over w_dim and averaged over the num_ws rows before the square root, as in
    StyleGAN2. Pass `pl_noise` to fix y (tests); by default it is drawn here.
    """
    if pl_noise is None:
        pl_noise = torch.randn_like(gen_img) / np.sqrt(gen_img.shape[2] * gen_img.shape[3])
    with conv2d_gradfix.no_weight_gradients():
        grads, = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()], inputs=[gen_ws], create_graph=True,
                                     only_inputs=True)
    return grads.square().sum(dim=2).mean(dim=1).sqrt()


def path_length_penalty(lengths: torch.Tensor, pl_mean: torch.Tensor, pl_decay: float) -> tuple:
    """(penalty per sample, new running mean): (|J^T y| - a)^2 with a an exponential moving average of the
    lengths, a <- a + decay * (mean(lengths) - a). The new mean is returned detached, for storing."""
    new_mean = pl_mean.lerp(lengths.mean(), pl_decay)
    return (lengths - new_mean).square(), new_mean.detach()


def style_mixing_mask(num_ws: int, prob: float, device: torch.device) -> torch.Tensor:
    """Boolean [num_ws] mask of the ws rows that come from the second latent: rows >= a cutoff drawn
    uniformly from 1..num_ws-1 with probability `prob`, else none. Drawn on `device`, no host sync."""
    cutoff = torch.randint(1, max(num_ws, 2), [], device=device)
    cutoff = torch.where(torch.rand([], device=device) < prob, cutoff, torch.full_like(cutoff, num_ws))
    return torch.arange(num_ws, device=device) >= cutoff


def image_absmax(img: torch.Tensor) -> torch.Tensor:
    """max |pixel| of each image [N, C, H, W] -> [N], detached. An image with a NaN or Inf gives the largest
    float32 instead, so that it counts (statistics skip non-finite samples) and exceeds every ceiling."""
    absmax = img.detach().float().abs().amax(dim=[1, 2, 3])
    largest = torch.finfo(torch.float32).max
    return torch.nan_to_num(absmax, nan=largest, posinf=largest)


def _report_scores(scores_name: str, signs_name: str, logits: torch.Tensor) -> None:
    training_stats.report(scores_name, logits)
    training_stats.report(signs_name, logits.sign())

# ----------------------------------------------------------------------------
# Lazy regularization schedule.


@dataclasses.dataclass
class Phase:
    name:       str             # 'Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg' or 'Dboth'.
    interval:   int             # Run on steps where step % interval == 0.
    opt_kwargs: Dict            # Optimizer settings of this phase's network (same dict for main and reg).


def phase_plan(name: str, reg_interval: Optional[int], opt_kwargs: Dict) -> List[Phase]:
    """The phases of network `name` ('G' or 'D') and its optimizer settings.

    With lazy regularization (reg_interval = k) the optimizer sees k main steps and one regularization step
    per k minibatches; lr and Adam betas are rescaled by k / (k + 1) so that the effective schedule per
    minibatch matches the non-lazy one (StyleGAN2, Appendix B): lr * k/(k+1), beta ** (k/(k+1)).
    """
    if name not in ('G', 'D'):
        raise ValueError(f"phase_plan: name must be 'G' or 'D', got {name!r}")
    opt_kwargs = dnnlib.EasyDict(opt_kwargs)
    if reg_interval is None:
        return [Phase(f'{name}both', 1, opt_kwargs)]
    if not isinstance(reg_interval, int) or reg_interval < 1:
        raise ValueError(f'reg_interval must be a positive integer or None, got {reg_interval!r}')
    ratio = reg_interval / (reg_interval + 1)
    opt_kwargs.lr = opt_kwargs.lr * ratio
    if 'betas' in opt_kwargs:  # Adam and its relatives; plain SGD has none.
        opt_kwargs.betas = tuple(float(beta) ** ratio for beta in opt_kwargs.betas)
    return [Phase(f'{name}main', 1, opt_kwargs), Phase(f'{name}reg', reg_interval, opt_kwargs)]

# ----------------------------------------------------------------------------


class Loss:
    """Interface of the training loop's loss: accumulate gradients for one phase and one minibatch round.

    `trained_networks` names the networks the loop makes phases and optimizers for (`<name>main`/`<name>reg`,
    one optimizer per network from `<name>_opt_kwargs`). The loop averages the gradients over the ranks itself
    after a phase's last round, so there is no `sync` argument (the official one told DDP when). The loss's
    own running values go into the training state through `state_dict` / `load_state_dict`.
    """

    trained_networks = ('G', 'D')

    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, gain):
        raise NotImplementedError()

    def state_dict(self) -> dict:
        return dict()

    def load_state_dict(self, state: dict) -> None:
        del state  # A loss without running values has nothing to restore.

    def compile_networks(self, compile_fn) -> None:
        """Run the networks through `compile_fn(module)` (torch.compile; the loop's `compile` option) where
        that is possible. A loss that does not support it says so."""
        del compile_fn
        raise ValueError(f'{type(self).__name__} cannot run compiled networks')


@dataclasses.dataclass
class DPass:
    """One pass of D in D's phases, as the terms of D's loss (training.regularizers.Regularizer) read it: one
    record per pass of fakes and one per pass of reals, made once and given to every term taking part."""
    real:       bool                        # True: a pass of reals; False: of fakes.
    main:       bool                        # The pass adds D's main loss (Dmain/Dboth); False in the lazy R1 step.
    phase:      str                         # The loop's phase name ('Dmain', 'Dreg' or 'Dboth').
    gain:       float                       # The phase's gain (the pass's loss mean is multiplied by it).
    logits:     torch.Tensor                # D's logits [N, 1], in the graph (a term's gradient reaches D).
    images:     torch.Tensor                # The images D saw, after augmentation, in the graph.
    clean:      torch.Tensor                # The same images before augmentation, detached.
    decoded:    Optional[Dict[str, torch.Tensor]] = None  # D's decoder outputs, when a term reads the decoder.
    g_feature:  Optional[torch.Tensor] = None   # G's feature at g_feature_res, augmented like the images.


class StyleGAN2Loss(Loss):
    def __init__(self,
        device,                         # Device of the networks.
        G_mapping,                      # Generator mapping network.
        G_synthesis,                    # Generator synthesis network.
        D,                              # Discriminator (with its decoder, if any).
        augment_pipe        = None,     # Augmentation applied to every image D sees, None = no augmentation.
        style_mixing_prob   = 0.9,      # Probability of mixing two latents in a generated image, 0 = off.
        r1_gamma            = 10,       # R1 weight gamma; the penalty is gamma / 2 * ||grad D||^2, 0 = off.
        pl_batch_shrink     = 2,        # The path-length pass uses batch_size // pl_batch_shrink samples.
        pl_decay            = 0.01,     # Decay of the running mean of path lengths.
        pl_weight           = 2,        # Path-length weight, 0 = off.
        d_terms             = (),       # Extra terms of D's loss: class_name + arguments of Regularizers
                                        # (training/regularizers; built with G_synthesis and device).
        fast_demod          = False,    # G's demodulation from one small matmul (networks.modulated_conv2d).
    ):
        super().__init__()
        self.device = torch.device(device)
        # Passed only when on: a network of another class (kept embedded from a snapshot) need not know it.
        self.synthesis_kwargs = dict(fast_demod=True) if fast_demod else dict()
        self.G_mapping = G_mapping
        self.G_synthesis = G_synthesis
        self.D = D
        self.augment_pipe = augment_pipe
        self.style_mixing_prob = style_mixing_prob
        self.r1_gamma = r1_gamma
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_weight = pl_weight
        self.pl_mean = torch.zeros([], device=self.device)
        self.d_terms = [dnnlib.util.construct_class_by_name(**term, G_synthesis=G_synthesis, device=self.device)
                        for term in d_terms]
        self._compiled = None   # Compiled wrappers of the three networks (compile_networks), None = eager.

    def _term_keys(self) -> List[str]:
        # Position + name: stable for a run's options (the list is the --reg list, in order), and readable.
        return [f'{i}.{getattr(term, "name", "") or type(term).__name__}' for i, term in enumerate(self.d_terms)]

    def state_dict(self) -> dict:
        state = dict(pl_mean=self.pl_mean.detach().cpu())
        if self.d_terms:  # A run without terms writes the state it always wrote.
            keys = self._term_keys()
            state['d_terms'] = {key: term.state_dict() for key, term in zip(keys, self.d_terms, strict=True)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores pl_mean and each term's running values. A term the state has no entry for (a state written
        before terms had state) keeps its fresh values; an entry no term of this run has is an error."""
        self.pl_mean.copy_(state['pl_mean'])
        saved = state.get('d_terms') or {}
        keys = self._term_keys()
        unknown = sorted(set(saved) - set(keys))
        if unknown:
            raise ValueError(f'The training state holds D terms this run does not have: {", ".join(unknown)} '
                             f'(this run has: {", ".join(keys) or "none"})')
        for key, term in zip(keys, self.d_terms, strict=True):
            if key in saved:
                term.load_state_dict(saved[key])

    def compile_networks(self, compile_fn) -> None:
        """Compiled G mapping, G synthesis and D for the phases that differentiate once (Gmain, Dmain). The
        regularization passes (path length, R1) differentiate a gradient again, which compiled graphs do not
        support, so Greg, Dreg, Gboth and Dboth keep the eager modules; both share the same parameters."""
        self._compiled = dict(G_mapping=compile_fn(self.G_mapping), G_synthesis=compile_fn(self.G_synthesis),
                              D=compile_fn(self.D))

    @contextlib.contextmanager
    def _networks(self, compiled: bool):
        """Within this block, run_G / run_D use the compiled wrappers if `compiled` and there are any."""
        if not compiled or self._compiled is None:
            yield
            return
        eager = dict(G_mapping=self.G_mapping, G_synthesis=self.G_synthesis, D=self.D)
        try:
            for name, module in self._compiled.items():
                setattr(self, name, module)
            yield
        finally:
            for name, module in eager.items():
                setattr(self, name, module)

    # Running the networks.

    def run_G(self, z, c, feature_res=None):
        """Generate images; with probability style_mixing_prob the rows after a random cutoff come from a
        second latent (mixing regularization). Returns (img, ws), or (img, ws, feature) with G's feature at
        `feature_res`."""
        ws = self.G_mapping(z, c)
        if self.style_mixing_prob > 0:
            with torch.autograd.profiler.record_function('style_mixing'):
                mask = style_mixing_mask(ws.shape[1], self.style_mixing_prob, ws.device)
                ws2 = self.G_mapping(torch.randn_like(z), c, skip_w_avg_update=True)
                ws = torch.where(mask.reshape(1, -1, 1), ws2, ws)
        if feature_res is None:
            return self.G_synthesis(ws, **self.synthesis_kwargs), ws
        img, features = self.G_synthesis(ws, return_features=[feature_res], **self.synthesis_kwargs)
        return img, ws, features[feature_res]

    def run_D(self, img, c, feature=None, decode=False):
        """D's logits of augmented images; with `decode`, (logits, decoder outputs, the feature augmented like
        the images or None)."""
        _img, logits, decoded, feature = self._see(img, c, feature, decode)
        return (logits, decoded, feature) if decode else logits

    def _see(self, img, c, feature, decode):
        """(the augmented images, D's logits, decoder outputs or None, the feature augmented like the images).
        The passes with D terms call it directly, for the record's images; the others go through run_D."""
        if self.augment_pipe is not None and feature is not None:
            img, (feature,) = self.augment_pipe(img, features=[feature])
        elif self.augment_pipe is not None:
            img = self.augment_pipe(img)
        if not decode:
            return img, self.D(img, c), None, feature
        logits, decoded = self.D(img, c, decode=True)
        return img, logits, decoded, feature

    # The phases.

    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, gain):
        if phase not in PHASES:
            raise ValueError(f'Unknown phase {phase!r}; valid phases: {", ".join(PHASES)}')
        do_Gmain = phase in ('Gmain', 'Gboth')
        do_Dmain = phase in ('Dmain', 'Dboth')
        do_Gpl = phase in ('Greg', 'Gboth') and self.pl_weight != 0
        do_Dr1 = phase in ('Dreg', 'Dboth') and self.r1_gamma != 0

        with self._networks(compiled=not (do_Gpl or do_Dr1)):
            if do_Gmain:
                self._accumulate_Gmain(gen_z, gen_c, gain=gain)
            if do_Gpl:
                self._accumulate_Gpl(gen_z, gen_c, gain=gain)
            loss_Dgen = self._accumulate_Dgen(gen_z, gen_c, phase=phase, gain=gain) if do_Dmain else 0
            if do_Dmain or do_Dr1:
                self._accumulate_Dreal(real_img, real_c, loss_Dgen, do_Dmain, do_Dr1, phase=phase, gain=gain)

    def _accumulate_Gmain(self, gen_z, gen_c, gain):
        with torch.autograd.profiler.record_function('Gmain_forward'):
            gen_img, _gen_ws = self.run_G(gen_z, gen_c)
            training_stats.report(STAT_G_IMG_ABSMAX, image_absmax(gen_img))
            gen_logits = self.run_D(gen_img, gen_c)
            _report_scores(STAT_SCORES_FAKE, STAT_SIGNS_FAKE, gen_logits)
            loss_Gmain = generator_loss(gen_logits)
            training_stats.report(STAT_G_LOSS, loss_Gmain)
        with torch.autograd.profiler.record_function('Gmain_backward'):
            loss_Gmain.mean().mul(gain).backward()

    def _accumulate_Gpl(self, gen_z, gen_c, gain):
        with torch.autograd.profiler.record_function('Gpl_forward'):
            batch_size = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
            gen_img, gen_ws = self.run_G(gen_z[:batch_size], gen_c[:batch_size])
            lengths = path_lengths(gen_img, gen_ws)
            pl_penalty, new_mean = path_length_penalty(lengths, self.pl_mean, self.pl_decay)
            self.pl_mean.copy_(new_mean)
            training_stats.report(STAT_PL_PENALTY, pl_penalty)
            loss_Gpl = pl_penalty * self.pl_weight
            training_stats.report(STAT_G_REG, loss_Gpl)
        with torch.autograd.profiler.record_function('Gpl_backward'):
            # The zero term ties the loss to the image, so that every synthesis parameter gets a gradient (zero
            # for the last toRGB bias, which path lengths do not depend on) and Adam moves every moment alike.
            (gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()

    def _accumulate_Dgen(self, gen_z, gen_c, phase, gain):
        terms = [term for term in self.d_terms if term.on_fakes]
        with torch.autograd.profiler.record_function('Dgen_forward'):
            if not terms:
                gen_img, _gen_ws = self.run_G(gen_z, gen_c)
                gen_logits = self.run_D(gen_img, gen_c)
                loss_terms = 0
            else:
                gen_logits, loss_terms = self._run_fake_terms(terms, gen_z, gen_c, phase, gain)
            _report_scores(STAT_SCORES_FAKE, STAT_SIGNS_FAKE, gen_logits)
            loss_Dgen = discriminator_loss_fake(gen_logits)
        with torch.autograd.profiler.record_function('Dgen_backward'):
            (loss_Dgen + loss_terms).mean().mul(gain).backward()
        return loss_Dgen.detach()

    def _run_fake_terms(self, terms, gen_z, gen_c, phase, gain):
        """D's logits of fakes and the sum of the terms on them, from one G pass and one D pass."""
        resolutions = {term.g_feature_res for term in terms} - {None}
        if len(resolutions) > 1:
            raise ValueError(f'The D terms ask for G features at several resolutions ({sorted(resolutions)})')
        feature_res = resolutions.pop() if resolutions else None
        generated = self.run_G(gen_z, gen_c, feature_res=feature_res)
        gen_img, feature = generated[0], (generated[2] if feature_res is not None else None)
        decode = any(term.reads_decoder for term in terms)
        seen, gen_logits, decoded, feature = self._see(gen_img, gen_c, feature, decode)
        record = DPass(real=False, main=True, phase=phase, gain=gain, logits=gen_logits, images=seen,
                       clean=gen_img.detach(), decoded=decoded, g_feature=feature)
        return gen_logits, _sum_terms(term.fake_loss(record) for term in terms)

    def _accumulate_Dreal(self, real_img, real_c, loss_Dgen, do_Dmain, do_Dr1, phase, gain):
        name = 'Dreal_Dr1' if do_Dmain and do_Dr1 else 'Dreal' if do_Dmain else 'Dr1'
        with torch.autograd.profiler.record_function(name + '_forward'):
            real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
            terms = [term for term in self.d_terms if term.on_reals]
            loss_terms = 0
            if terms:
                decode = any(term.reads_decoder for term in terms)
                seen, real_logits, decoded, _ = self._see(real_img_tmp, real_c, None, decode)
                record = DPass(real=True, main=do_Dmain, phase=phase, gain=gain, logits=real_logits,
                               images=seen, clean=real_img.detach(), decoded=decoded)
                loss_terms = _sum_terms(term.real_loss(record) for term in terms)
            else:
                real_logits = self.run_D(real_img_tmp, real_c)
            _report_scores(STAT_SCORES_REAL, STAT_SIGNS_REAL, real_logits)
            loss_Dreal = 0
            if do_Dmain:
                loss_Dreal = discriminator_loss_real(real_logits)
                training_stats.report(STAT_D_LOSS, loss_Dgen + loss_Dreal)
            loss_Dr1 = 0
            if do_Dr1:
                penalty = r1_penalty(real_logits, real_img_tmp)
                loss_Dr1 = penalty * (self.r1_gamma / 2)
                training_stats.report(STAT_R1_PENALTY, penalty)
                training_stats.report(STAT_D_REG, loss_Dr1)
        with torch.autograd.profiler.record_function(name + '_backward'):
            (real_logits * 0 + loss_Dreal + loss_Dr1 + loss_terms).mean().mul(gain).backward()


def _sum_terms(losses):
    """The sum of the terms' per-sample losses, skipping a term's None (no term in this pass); 0 for none.
    Summed from 0 in the terms' order, as the loss always did, so that the float rounding stays the same."""
    return sum(loss for loss in losses if loss is not None)
