"""GGDR ("Generator Knows What Discriminator Should Learn", Lee et al., ECCV 2022) as a term of D's loss
(SPEC §5), `train.py --reg=ggdr`: on fakes, D's decoder (training/decoder.py) predicts G's feature map at one
resolution; the loss is weight * (1 - cosine similarity over channels), averaged over positions."""

import torch
import torch.nn.functional as F

from torch_utils import training_stats
from training import decoder
from training.flags import Option
from training.regularizers.term import Regularizer, power_of_two_between

STAT_GGDR = 'Loss/D/ggdr'   # Weighted GGDR cosine term per fake.

# The README's rule of the authors: G's feature at a quarter of the image resolution (64 at 256, 8 for CIFAR).
FEATURE_RES_HELP = 'resolution / 4, at least 8'


def default_feature_res(resolution: int) -> int:
    return max(8, resolution // 4)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels, averaged over positions: [N, C, H, W] x 2 -> [N]. Identical
    features give 0, opposite ones 2."""
    if pred.shape != target.shape:
        raise ValueError(f"The decoded feature {list(pred.shape)} does not match G's {list(target.shape)}; G and "
                         f"D must have the same channels at that resolution (same --cbase/--cmax)")
    similarity = F.cosine_similarity(pred, target, dim=1, eps=1e-8)    # [N, H, W]
    return 1 - similarity.mean(dim=[1, 2])


class GGDRTerm(Regularizer):
    """GGDR: weight * (1 - cos(dec(aug(G(z))), aug(feat_G))) in D's loss on fakes; nothing on reals or in G's
    phases. The target is G's feature in float32, a constant (G is frozen in D's phases)."""

    name = 'ggdr'
    help = 'ggdr (D predicts G\'s features)'
    options = (
        Option('ggdr_res', int, None, 'Resolution of the G feature that D predicts', min=8, tree='res',
               desc='{value}', desc_always=True, default_help=FEATURE_RES_HELP),
        Option('ggdr_weight', float, 10.0, 'Weight of the cosine term', min=0, tree='weight', desc='w{value:g}'),
    )
    on_fakes = True
    reads_decoder = True

    def __init__(self,
        G_synthesis,                # G's synthesis network (given by the loss; GGDR reads only its features).
        device,                     # Device of the networks (given by the loss).
        res         = 64,           # Resolution of G's feature that D predicts (--ggdr-res).
        weight      = 10.0,         # Weight of the term (--ggdr-weight).
    ):
        del G_synthesis, device
        self.g_feature_res = res
        self.weight = weight

    @classmethod
    def resolve(cls, values, net):
        res = values['ggdr_res'] or default_feature_res(net.resolution)
        power_of_two_between('--ggdr-res', res, 8, net.resolution, net.resolution, FEATURE_RES_HELP)
        return dict(values, ggdr_res=res)

    @classmethod
    def decoder(cls, values, net):
        return decoder.decoder_kwargs(values['ggdr_res'])

    def fake_loss(self, record):
        loss = cosine_distance(record.decoded['feature'], record.g_feature.detach()) * self.weight
        training_stats.report(STAT_GGDR, loss)
        return loss
