"""GLeaD ("Improving GANs with a Generator-Leading Task", Bai et al., CVPR 2023) as a term of D's loss (SPEC
§5), `train.py --reg=glead`. Like GGDR it gives the discriminator a dense prediction task on its own encoder
features (the decoder of training/decoder.py, an option of the Discriminator): heads on the decoder output give
a feature, an image and one w, from which G's frozen upper blocks reconstruct the input; on reals the
reconstruction is compared with the real image (LPIPS or mse), on fakes either the predicted feature with G's
(`gfeat`, the GGDR term: "GLeaD + GGDR") or the reconstruction with the fake (`gfwimage`, plain GLeaD).
Gradients flow through G's tail into D, but G's weights get none: the loop trains only D in D's phases.
"""

from typing import Optional

import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import misc, training_stats
from training import decoder, lpips
from training.flags import Option
from training.regularizers.ggdr import FEATURE_RES_HELP, cosine_distance, default_feature_res
from training.regularizers.term import Regularizer, power_of_two_between

STAT_GLEAD_REAL     = 'Loss/D/glead_real'       # Weighted reconstruction term per real.
STAT_GLEAD_FAKE     = 'Loss/D/glead_fake'       # Weighted fake-branch term (gfeat or gfwimage) per fake.

GLEAD_FAKE_BRANCHES = ('gfeat', 'gfwimage')
GLEAD_FAKE_WEIGHTS = dict(gfeat=10.0, gfwimage=3.0)     # The published weights of the two branches.
# The authors' train.py defaults to glead_res_g = 64 at every resolution and their decoder ends at 64 (SPEC §5);
# below 256x256 we scale it down as GGDR's rule does (resolution / 4, at least 8), since 64 would leave G no
# blocks above it. 128 at 512 and 256 at 1024 would run G's tail on D's predictions at a resolution the authors
# never trained, so above 256 we follow them.
DECODER_END = 64
RES_G_HELP = FEATURE_RES_HELP + f', at most {DECODER_END} (the authors\' value above 256x256)'


def default_res_g(resolution: int) -> int:
    return min(DECODER_END, default_feature_res(resolution))


class GLeaDTerm(Regularizer):
    """GLeaD: D's heads -> G's frozen upper blocks -> a reconstruction of D's input (SPEC §5)."""

    name = 'glead'
    help = 'glead (D\'s predictions run G\'s upper blocks)'
    options = (
        Option('glead_res_g', int, None, 'G\'s blocks above this resolution reconstruct D\'s input (64 or 32 at '
               '256x256)', min=8, tree='res_g', desc='{value}', desc_always=True, default_help=RES_G_HELP),
        Option('glead_fake', str, 'gfeat', 'Fake branch, gfeat (cosine to G\'s feature: GLeaD + GGDR) or gfwimage '
               '(reconstruction of the fake: plain GLeaD)', choices=GLEAD_FAKE_BRANCHES, tree='fake',
               desc='-{value}'),
        Option('glead_real_weight', float, 10.0, 'Weight of the reconstruction of reals', min=0,
               tree='real_weight'),
        Option('glead_fake_weight', float, None, 'Weight of the fake branch', min=0, tree='fake_weight',
               default_help='10 for gfeat, 3 for gfwimage'),
        Option('glead_recon', str, 'lpips', 'Reconstruction distance; lpips needs weights (--glead-lpips or a '
               'download), mse needs none', choices=lpips.KINDS, tree='distance', desc='-{value}'),
        Option('glead_lpips', str, None, 'LPIPS-AlexNet weights, torchvision\'s alexnet-owt-7be5be79.pth and '
               'lpips\' weights/v0.1/alex.pth, or one combined file', tree='lpips_weights',
               default_help='download', metavar='FILE|TRUNK,LIN'),
    )
    on_fakes = True
    on_reals = True
    reads_decoder = True

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

    @classmethod
    def resolve(cls, values, net):
        res_g = values['glead_res_g'] or default_res_g(net.resolution)
        # G's tail needs at least one block above res_g.
        power_of_two_between('--glead-res-g', res_g, 8, net.resolution // 2, net.resolution, RES_G_HELP)
        return dict(values, glead_res_g=res_g, glead_lpips=_lpips_weights(values))

    @classmethod
    def decoder(cls, values, net):
        """The decoder ends at 64 (SPEC §5), or lower for small images, never below res_g; the heads give an
        image, G's feature at res_g and one w."""
        res_g = values['glead_res_g']
        heads = dict(img_channels=net.img_channels, feat_channels=net.channels(res_g), w_dim=net.w_dim)
        return decoder.decoder_kwargs(max(res_g, min(DECODER_END, net.resolution // 4)), heads)

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

    def real_loss(self, record):
        """In every pass of reals, the lazy R1 step too (with its gain): record.main is not read."""
        recon = self.reconstruct(record.decoded)
        misc.assert_shape(recon, list(record.clean.shape))
        loss = self.distance(recon, record.clean) * self.real_weight
        training_stats.report(STAT_GLEAD_REAL, loss)
        return loss

    def fake_loss(self, record):
        if self.fake == 'gfeat':
            feature, _image = self._heads_at_res_g(record.decoded)
            loss = cosine_distance(feature, record.g_feature.detach())
        else:
            loss = self.distance(self.reconstruct(record.decoded), record.clean)
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


def _lpips_weights(values) -> Optional[str]:
    """The weights the options record: none for mse; for lpips the files, found and checked now, on every rank
    (the download cache writes atomically), so that the recorded options name the files every rank loads."""
    if values['glead_recon'] != 'lpips':
        return None
    try:
        return resolve_lpips_weights(values['glead_lpips'])
    except (OSError, ValueError) as e:
        raise ValueError(f'--glead-recon=lpips: {e}; give the files with --glead-lpips=TRUNK.pth,LIN.pth '
                         f'(torchvision\'s alexnet-owt-7be5be79.pth, lpips\' weights/v0.1/alex.pth) or one '
                         f'combined file, or use --glead-recon=mse (needs no file)') from None

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
