"""LeCam ("Regularizing Generative Adversarial Networks under Limited Data", Tseng et al., CVPR 2021) as a term of
D's loss, `train.py --reg=lecam`: D's logits of reals are pulled down towards a moving average of its logits of
fakes and its logits of fakes up towards a moving average of those of reals, a squared hinge each way:

    weight * (mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(G(z)))^2)

Form, decay and weights follow the authors' StyleGAN2 code, google/lecam-gan stylegan2/lecam_loss.py, function
`lecamreg` (their BigGAN code, biggan_cifar/losses.py `lecam_reg`, has the same form). The moving averages are
the term's state: the training state saves them, so a resumed run continues them exactly.
"""

import torch
import torch.nn.functional as F

from torch_utils import distributed, training_stats
from training.flags import Option
from training.regularizers.term import Regularizer

STAT_LECAM_REAL     = 'Loss/D/lecam_real'   # Weighted penalty of reals above the fakes' average, per real.
STAT_LECAM_FAKE     = 'Loss/D/lecam_fake'   # Weighted penalty of fakes below the reals' average, per fake.

# lecamreg's `assign_moving_average(..., decay=0.99, zero_debias=True)` for both averages.
EMA_DECAY = 0.99
# The weight (their `--lecam`) of stylegan2/scripts/run_train_ffhq.sh (FFHQ 256x256, cfg paper256); their
# run_train_cifar.sh uses 1e-6 for CIFAR-10 (cfg cifar).
WEIGHT = 3e-7


class LeCamTerm(Regularizer):
    """LeCam: a squared hinge of D's logits against moving averages of the other side's logits (module docstring).

    When it starts: from the first step, as in the authors' code, where the averages are zero-debiased moving
    averages (TensorFlow's zero_debias: the biased average divided by 1 - decay^updates), so that the first
    update gives the first mean itself and no warm-up or start step is needed; kimg 0 here.

    When the averages move: once per pass of D's main loss (Dmain/Dboth, every round of the batch), with the
    mean of that pass's logits; the lazy R1 step adds no term and leaves them alone (the authors' term lives in
    D's main loss, not in its regularization pass). The loss evaluates fakes before reals, so a pass of reals
    is compared with the fakes' average including this round's fakes, as in `lecamreg`; a pass of fakes with
    the reals' average up to the previous round (`lecamreg` would include this round's reals, which this loss
    has not seen yet: a lag of one round in an average of decay 0.99), and the first pass of fakes of a run,
    before any real was seen, adds no term.

    With several processes each pass's mean is averaged over the ranks before it enters the averages, so every
    rank holds the same averages (the training state saves rank 0's and restores them on every rank). The
    authors' variables are declared with synchronization ON_READ and aggregation MEAN, an average over replicas
    as well; their TF1 StyleGAN2-ADA towers would in fact keep one average per GPU.
    """

    name = 'lecam'
    help = 'lecam (D\'s logits against moving averages of the other side\'s)'
    options = (
        Option('lecam_weight', float, WEIGHT, 'Weight of the LeCam term (the authors: 3e-7 at 256x256, 1e-6 for '
               'CIFAR-10)', min=0, tree='weight', desc='w{value:g}'),
        Option('lecam_decay', float, EMA_DECAY, 'Decay of the moving averages of D\'s logits (per pass of D), '
               'below 1', min=0, max=1, tree='decay', desc='d{value:g}'),
    )
    on_fakes = True
    on_reals = True

    def __init__(self,
        G_synthesis,                # G's synthesis network (given by the loss; LeCam reads only D's logits).
        device,                     # Device of the networks: the averages live there, like the loss's pl_mean.
        weight      = WEIGHT,       # Weight of the term (--lecam-weight).
        decay       = EMA_DECAY,    # Decay of the moving averages (--lecam-decay).
    ):
        del G_synthesis
        if not 0 <= decay < 1:
            raise ValueError(f'LeCam decay must be in [0, 1), got {decay}')
        self.weight = weight
        self.decay = decay
        # The biased averages and how many means each has taken in (the zero-debiasing needs the count).
        self.biased_real = torch.zeros([], device=device)
        self.biased_fake = torch.zeros([], device=device)
        self.updates_real = 0
        self.updates_fake = 0

    @classmethod
    def resolve(cls, values, net):
        del net
        # Decay 1 would never move the averages (and leave nothing to debias); the flag's range is closed.
        if values['lecam_decay'] >= 1:
            raise ValueError(f'--lecam-decay must be below 1, got {values["lecam_decay"]:g}  [default: {EMA_DECAY}]')
        return dict(values)

    def _update(self, side: str, logits: torch.Tensor) -> None:
        """Takes this pass's mean logit (averaged over the ranks) into the `side` average."""
        mean = logits.detach().float().mean()
        world_size = distributed.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(mean)
            mean = mean / world_size
        biased = getattr(self, f'biased_{side}')
        biased.copy_(biased.lerp(mean, 1 - self.decay))
        setattr(self, f'updates_{side}', getattr(self, f'updates_{side}') + 1)

    def _average(self, side: str) -> torch.Tensor:
        """The zero-debiased average: the biased one / (1 - decay^updates), exactly the first mean after one."""
        return getattr(self, f'biased_{side}') / (1 - self.decay ** getattr(self, f'updates_{side}'))

    def fake_loss(self, record):
        self._update('fake', record.logits)
        if self.updates_real == 0:
            return None
        loss = F.relu(self._average('real') - record.logits).square().flatten() * self.weight
        training_stats.report(STAT_LECAM_FAKE, loss)
        return loss

    def real_loss(self, record):
        if not record.main:
            return None
        self._update('real', record.logits)
        loss = F.relu(record.logits - self._average('fake')).square().flatten() * self.weight
        training_stats.report(STAT_LECAM_REAL, loss)
        return loss

    def state_dict(self):
        return dict(biased_real=self.biased_real.detach().cpu(), biased_fake=self.biased_fake.detach().cpu(),
                    updates_real=self.updates_real, updates_fake=self.updates_fake)

    def load_state_dict(self, state):
        self.biased_real.copy_(state['biased_real'])
        self.biased_fake.copy_(state['biased_fake'])
        self.updates_real = int(state['updates_real'])
        self.updates_fake = int(state['updates_fake'])
