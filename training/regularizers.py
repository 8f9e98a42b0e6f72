"""GGDR and GLeaD as terms of D's loss (SPEC §5), for `train.py --reg=ggdr|glead`.

Both give the discriminator a dense prediction task on its own encoder features (the decoder of
training/decoder.py, an option of the Discriminator):
- GGDR (Lee et al., ECCV 2022): on fakes, D's decoder predicts G's feature map at one resolution; the loss is
  weight * (1 - cosine similarity over channels), averaged over positions.
- GLeaD (Bai et al., CVPR 2023): heads on the decoder output give a feature, an image and one w, from which
  G's frozen upper blocks reconstruct the input; on reals the reconstruction is compared with the real image
  (LPIPS or mse), on fakes either the predicted feature with G's (`gfeat`, the GGDR term: "GLeaD + GGDR") or
  the reconstruction with the fake (`gfwimage`, plain GLeaD).
Gradients flow through G's tail into D, but G's weights get none: the loop trains only D in D's phases.
"""

from typing import Optional

import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc, training_stats
from training import lpips
from training.loss import DiscriminatorTerm

STAT_GGDR           = 'Loss/D/ggdr'             # Weighted GGDR cosine term per fake.
STAT_GLEAD_REAL     = 'Loss/D/glead_real'       # Weighted reconstruction term per real.
STAT_GLEAD_FAKE     = 'Loss/D/glead_fake'       # Weighted fake-branch term (gfeat or gfwimage) per fake.

GLEAD_FAKE_BRANCHES = ('gfeat', 'gfwimage')
GLEAD_FAKE_WEIGHTS = dict(gfeat=10.0, gfwimage=3.0)     # The published weights of the two branches.


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels, averaged over positions: [N, C, H, W] x 2 -> [N]. Identical
    features give 0, opposite ones 2."""
    if pred.shape != target.shape:
        raise ValueError(f"The decoded feature {list(pred.shape)} does not match G's {list(target.shape)}; G and "
                         f"D must have the same channels at that resolution (same --cbase/--cmax)")
    similarity = F.cosine_similarity(pred, target, dim=1, eps=1e-8)    # [N, H, W]
    return 1 - similarity.mean(dim=[1, 2])


class GGDRTerm(DiscriminatorTerm):
    """GGDR: weight * (1 - cos(dec(aug(G(z))), aug(feat_G))) in D's loss on fakes; nothing on reals or in G's
    phases. The target is G's feature in float32, a constant (G is frozen in D's phases)."""

    on_fakes = True

    def __init__(self,
        G_synthesis,                # G's synthesis network (given by the loss; GGDR reads only its features).
        device,                     # Device of the networks (given by the loss).
        res         = 64,           # Resolution of G's feature that D predicts (--ggdr-res).
        weight      = 10.0,         # Weight of the term (--ggdr-weight).
    ):
        del G_synthesis, device
        self.g_feature_res = res
        self.weight = weight

    def fake_loss(self, decoded, g_feature, gen_img):
        del gen_img
        loss = cosine_distance(decoded['feature'], g_feature.detach()) * self.weight
        training_stats.report(STAT_GGDR, loss)
        return loss


class GLeaDTerm(DiscriminatorTerm):
    """GLeaD: D's heads -> G's frozen upper blocks -> a reconstruction of D's input (SPEC §5)."""

    on_fakes = True
    on_reals = True

    def __init__(self,
        G_synthesis,                # G's synthesis network, whose blocks above res_g reconstruct the image.
        device,                     # Device of the networks (given by the loss).
        res_g           = 64,       # G runs its blocks above this resolution from D's predictions (--glead-res-g).
        fake            = 'gfeat',  # Fake branch: 'gfeat' (cosine to G's feature) or 'gfwimage' (reconstruction).
        real_weight     = 10.0,     # Weight of the reconstruction of reals.
        fake_weight     = None,     # Weight of the fake branch, None = the published one (gfeat 10, gfwimage 3).
        distance        = 'lpips',  # Reconstruction distance: 'lpips' (needs weights) or 'mse'.
        lpips_weights   = None,     # LPIPS weights: a combined file or 'trunk.pth,lin.pth' (training/lpips.py).
    ):
        if fake not in GLEAD_FAKE_BRANCHES:
            raise ValueError(f'Unknown GLeaD fake branch {fake!r}; valid choices: {", ".join(GLEAD_FAKE_BRANCHES)}')
        G_synthesis.tail_resolutions(res_g)  # Fails now, with the valid range, if G has no blocks above res_g.
        self.G_synthesis = G_synthesis
        self.res_g = res_g
        self.fake = fake
        self.real_weight = real_weight
        self.fake_weight = GLEAD_FAKE_WEIGHTS[fake] if fake_weight is None else fake_weight
        self.g_feature_res = res_g if fake == 'gfeat' else None
        self.distance = lpips.reconstruction_distance(distance, weights=_weights_arg(lpips_weights), device=device)

    def _heads_at_res_g(self, decoded):
        """The heads' feature and image at res_g (resized bilinearly when the decoder ends above it)."""
        feature, image = decoded['head_feature'], decoded['image']
        if feature.shape[2] != self.res_g:
            size = (self.res_g, self.res_g)
            feature = F.interpolate(feature, size=size, mode='bilinear', align_corners=False)
            image = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
        return feature, image

    def reconstruct(self, decoded) -> torch.Tensor:
        """G's blocks above res_g run from the predicted feature and image, with the predicted w for every row."""
        feature, image = self._heads_at_res_g(decoded)
        ws = decoded['w'].repeat(1, self.G_synthesis.tail_num_ws(self.res_g), 1)
        return self.G_synthesis.forward_from(self.res_g, feature, image, ws)

    def real_loss(self, decoded, real_img):
        recon = self.reconstruct(decoded)
        misc.assert_shape(recon, list(real_img.shape))
        loss = self.distance(recon, real_img) * self.real_weight
        training_stats.report(STAT_GLEAD_REAL, loss)
        return loss

    def fake_loss(self, decoded, g_feature, gen_img):
        if self.fake == 'gfeat':
            feature, _image = self._heads_at_res_g(decoded)
            loss = cosine_distance(feature, g_feature.detach())
        else:
            loss = self.distance(self.reconstruct(decoded), gen_img.detach())
        loss = loss * self.fake_weight
        training_stats.report(STAT_GLEAD_FAKE, loss)
        return loss


def _weights_arg(value: Optional[str]):
    """'trunk.pth,lin.pth' -> a (trunk, lin) pair; one path (a combined file) or None as it is."""
    if value is not None and ',' in value:
        trunk, lin = value.split(',', 1)
        return trunk, lin
    return value

# ----------------------------------------------------------------------------
# LPIPS weights for --glead-recon=lpips, found before the run starts.

LIN_URL = 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth'


def resolve_lpips_weights(given: Optional[str]) -> str:
    """The LPIPS weights GLeaD will load, as the string the options record ('file' or 'trunk,lin'), checked
    now (every key and shape) so that a wrong or missing file stops the run before any work.

    Without `given`: torchvision's AlexNet file and the lin layers (from an installed lpips package, else from
    its repository) through the download cache. Raises ValueError (or FileNotFoundError) with one line."""
    if given is None:
        try:
            trunk = dnnlib.util.open_url(lpips.TRUNK_URL, return_filename=True, num_attempts=2, verbose=False)
            lin = lpips.installed_lin_file() or dnnlib.util.open_url(LIN_URL, return_filename=True, num_attempts=2,
                                                                     verbose=False)
        except OSError as e:
            raise ValueError(f'the LPIPS weights could not be downloaded ({str(e).splitlines()[0]})') from None
        given = f'{trunk},{lin}'
    lpips.load_weights(_weights_arg(given))
    return given
