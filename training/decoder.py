"""The discriminator-side decoders of GGDR and GLeaD (SPEC §5), built by `Discriminator(decoder_kwargs=...)`.

GGDR ("Generator Knows What Discriminator Should Learn", Lee et al., ECCV 2022) asks D to predict the
generator's feature map at one resolution from its own encoder features; GLeaD ("Improving GANs with a
Generator-Leading Task", Bai et al., CVPR 2023) adds heads that turn that prediction into the input of G's
upper blocks. Both read enc[r], the output of D's block that ends at resolution r, and run in float32.
"""

from typing import Dict, Optional

import numpy as np
import torch

from torch_utils import misc, persistence
from torch_utils.ops import bias_act, conv2d_resample, upfirdn2d


@persistence.persistent_class
class DecoderConv(torch.nn.Module):
    """A linear 1x1 convolution with equalized learning rate and a bias, optionally after 2x FIR upsampling.

    It computes what `training.networks.Conv2dLayer(in, out, kernel_size=1, activation='linear', up=up)` does,
    with the same parameter and buffer names (`weight`, `bias`, `resample_filter`) and the same random draws at
    construction. It lives here rather than being imported from training.networks because a snapshot embeds
    this module's source, and the official code (and forks built on it) execute that source against their own
    `training` package, which a module of ours must not lean on (SPEC §7).
    """

    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of output channels.
        up              = 1,        # 1 = no resampling, 2 = upsample 2x with the [1,3,3,1] filter first.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.register_buffer('resample_filter', upfirdn2d.setup_filter([1, 3, 3, 1]))
        self.weight_gain = 1 / np.sqrt(in_channels)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x):
        w = (self.weight * self.weight_gain).to(x.dtype)
        # flip_weight as Conv2dLayer passes it: a 1x1 kernel makes it irrelevant, but the op path stays the same.
        x = conv2d_resample.conv2d_resample(x=x, w=w, f=self.resample_filter, up=self.up, padding=0,
                                            flip_weight=(self.up == 1))
        return bias_act.bias_act(x, self.bias.to(x.dtype), act='linear')

    def extra_repr(self):
        return f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, up={self.up}'


@persistence.persistent_class
class FeatureDecoder(torch.nn.Module):
    """U-Net-like decoder on D's encoder features: dec[8] = up(enc[4]), dec[r] = up(cat(dec[r/2], enc[r/2])).

    Each step is a 1x1 equalized-lr convolution with the [1,3,3,1] FIR 2x upsampling and a bias, without a
    nonlinearity or normalization (GGDR's decoder); the output dec[out_res] has C[out_res] channels, the shape
    of G's feature at that resolution when G and D share channel_base and channel_max.
    """

    def __init__(self,
        channels,                   # D's channels per resolution, {res: C[res]} (given by the Discriminator).
        img_resolution,             # D's input resolution (given by the Discriminator).
        out_res         = 64,       # Resolution of the decoded feature (--ggdr-res; GLeaD decodes to 64).
        heads           = None,     # GLeaD's heads on dec[out_res]: dict(img_channels, feat_channels, w_dim),
                                    # None = GGDR (the decoded feature only).
    ):
        # D's resolutions (the keys of `channels`, the powers of two 4 ... img_resolution) are the ones it can
        # decode to; training.networks.is_power_of_two cannot be imported here (SPEC §7).
        if out_res not in channels or out_res < 8:
            raise ValueError(f'The decoder resolution must be a power of two in [8, {img_resolution}] (the image '
                             f'resolution), got {out_res!r}')
        super().__init__()
        self.out_res = out_res
        self.img_resolution = img_resolution
        self.input_resolutions = sorted(res for res in channels if res < out_res)  # enc[4], ..., enc[out_res/2]
        self.out_channels = channels[out_res]
        for res in self.input_resolutions:
            in_channels = channels[4] if res == 4 else channels[res] * 2
            setattr(self, f'dec{res * 2}', DecoderConv(in_channels, channels[res * 2], up=2))
        self.heads = GLeaDHeads(channels[out_res], **heads) if heads is not None else None

    def forward(self, features: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{r: enc[r]} -> dict(feature=dec[out_res]) and, with heads, image, head_feature and w."""
        x = None
        for res in self.input_resolutions:
            enc = features[res].to(dtype=torch.float32, memory_format=torch.contiguous_format)
            misc.assert_shape(enc, [None, None, res, res])
            x = getattr(self, f'dec{res * 2}')(enc if x is None else torch.cat([x, enc], dim=1))
        outputs = dict(feature=x)
        if self.heads is not None:
            outputs.update(self.heads(x))
        return outputs

    def extra_repr(self):
        return f'out_res={self.out_res:d}, out_channels={self.out_channels:d}, heads={self.heads is not None}'


@persistence.persistent_class
class GLeaDHeads(torch.nn.Module):
    """GLeaD's three linear 1x1 heads on the decoded feature: an intermediate RGB image (img_proj), the feature
    that G's upper blocks start from (feat_proj1), and one w for them (feat_proj2, then a global average pool)."""

    def __init__(self,
        in_channels,                # Channels of the decoded feature, C[decoder_res].
        img_channels    = 3,        # Channels of the predicted image.
        feat_channels   = 512,      # Channels of the predicted G feature, C[glead_res_g].
        w_dim           = 512,      # Dimensionality of the predicted w.
    ):
        super().__init__()
        self.img_proj = DecoderConv(in_channels, img_channels)
        self.feat_proj1 = DecoderConv(in_channels, feat_channels)
        self.feat_proj2 = DecoderConv(in_channels, w_dim)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        w = self.feat_proj2(x).mean(dim=[2, 3]).unsqueeze(1)  # [N, 1, w_dim]
        return dict(image=self.img_proj(x), head_feature=self.feat_proj1(x), w=w)


def decoder_kwargs(out_res: int, heads: Optional[dict] = None) -> dict:
    """The D_kwargs.decoder_kwargs entry that train.py writes into the options tree."""
    kwargs = dict(class_name='training.decoder.FeatureDecoder', out_res=out_res)
    if heads is not None:
        kwargs['heads'] = dict(heads)
    return kwargs
