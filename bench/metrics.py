"""Metric throughput: feature extraction for dataset and generator images, and the implied time of fid10k.

    python bench/metrics.py                                 # 32 and 256 px on the CPU, small counts
    python bench/metrics.py --device=cuda --num-images=2000

The real Inception network (`inception-2015-12-05.pt`) is used when it can be found (STYLEGAN_DETECTOR_DIR,
the download cache, or a download); otherwise the script says so and times the pipeline with a stand-in
TorchScript detector of the same call signature, whose own cost is negligible, so the numbers then measure
data loading, generation and bookkeeping only. fid10k is estimated as 10k / (dataset images/s) +
10k / (generated images/s) + the measured time of one Frechet distance on 2048-dimensional statistics.
Generators are the cifar (32 px) and paper256 (256 px) networks, stock `skip` unless --arch says otherwise.
"""

import os
import sys
import tempfile
import time
import warnings

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import frechet_inception_distance, metric_utils  # noqa: E402
from training import networks  # noqa: E402

GENERATORS = {
    32:  dict(channel_base=32768, map=2),
    256: dict(channel_base=16384, map=8),
}


class StandInInception(torch.nn.Module):
    """Call-compatible stand-in: 2048 features from a fixed projection of a 4x4 average-pooled image."""

    def __init__(self):
        super().__init__()
        self.register_buffer('proj', torch.randn([3 * 16, 2048], generator=torch.Generator().manual_seed(0)))

    def forward(self, img, return_features: bool = False, no_output_bias: bool = False, resize_images: bool = True,
                return_lpips: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32) / 255, [4, 4]).flatten(1)
        return x @ self.proj


def find_detector(stand_in_dir: str) -> str:
    """The detector folder to use: None for the real one, or a folder with the stand-in."""
    try:
        metric_utils.detector_path(metric_utils.INCEPTION_URL)
        return None
    except FileNotFoundError as e:
        print(f'The real Inception network could not be obtained; timing with a stand-in detector.\n  ({e})\n',
              file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=DeprecationWarning)
        torch.jit.script(StandInInception()).save(os.path.join(stand_in_dir, 'inception-2015-12-05.pt'))
    return stand_in_dir


def make_dataset(root: str, res: int, count: int) -> dict:
    rnd = np.random.RandomState(0)
    os.makedirs(root)
    for i in range(count):
        PIL.Image.fromarray((rnd.rand(res, res, 3) * 255).astype(np.uint8)).save(os.path.join(root, f'{i:05d}.png'))
    return dict(class_name='training.dataset.ImageFolderDataset', path=root, use_labels=False, max_size=None,
                xflip=False, resolution=res)


def make_generator(res: int, arch: str) -> torch.nn.Module:
    spec = GENERATORS[res]
    synthesis = dict(channel_base=spec['channel_base'], channel_max=512, num_fp16_res=4, conv_clamp=256,
                     architecture=arch)
    if arch == 'squeeze':
        synthesis['squeeze_r'] = 8
    return networks.Generator(z_dim=512, c_dim=0, w_dim=512, img_resolution=res, img_channels=3,
                              mapping_kwargs=dict(num_layers=spec['map']), synthesis_kwargs=synthesis).eval()


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@click.command()
@click.option('--res', default='32,256', show_default=True, help='Comma-separated resolutions (32, 256)')
@click.option('--num-images', type=click.IntRange(min=8), default=None, help='Images per measurement '
              '[default: 64 on the CPU, 2000 on a GPU]')
@click.option('--batch', type=click.IntRange(min=1), default=32, show_default=True, help='Detector batch size')
@click.option('--arch', type=click.Choice(list(networks.SYNTHESIS_BLOCKS)), default='skip', show_default=True)
@click.option('--device', default=None, help='cpu or cuda  [default: cuda if available]')
def main(res, num_images, batch, arch, device):
    """Images/s of the metric feature extraction and the estimated total time of fid10k."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    num_images = num_images or (2000 if device.type == 'cuda' else 64)
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        detector_dir = find_detector(temp)
        sigma = np.cov(np.random.RandomState(0).randn(4096, 2048), rowvar=False)
        fd_seconds = time_call(lambda: frechet_inception_distance.frechet_distance(np.zeros(2048), sigma,
                                                                                   np.ones(2048) * 0.1, sigma))
        for r in (int(x) for x in res.split(',')):
            dataset_kwargs = make_dataset(os.path.join(temp, f'data{r}'), r, num_images)
            opts = metric_utils.MetricOptions(G=make_generator(r, arch), dataset_kwargs=dataset_kwargs, device=device,
                                              cache=False, detector_dir=detector_dir)
            kwargs = dict(detector_url=metric_utils.INCEPTION_URL, detector_kwargs=dict(return_features=True),
                          batch_size=batch, capture_mean_cov=True)
            # Load the detector outside the timing.
            metric_utils.get_feature_detector(metric_utils.INCEPTION_URL, device=device, detector_dir=detector_dir)
            t_real = time_call(lambda o=opts, k=kwargs: metric_utils.compute_feature_stats_for_dataset(o, **k))
            t_gen = time_call(lambda o=opts, k=kwargs: metric_utils.compute_feature_stats_for_generator(
                o, max_items=num_images, **k))
            rows.append((r, num_images / t_real, num_images / t_gen,
                         10000 / (num_images / t_real) + 10000 / (num_images / t_gen) + fd_seconds))
            metric_utils.clear_detector_cache()
    kind = 'real Inception' if detector_dir is None else 'stand-in detector'
    print(f'{"res":>4}  {"dataset img/s":>13}  {"generated img/s":>15}  {"fid10k est. (s)":>15}')
    for r, real_rate, gen_rate, fid10k in rows:
        print(f'{r:>4}  {real_rate:>13.1f}  {gen_rate:>15.1f}  {fid10k:>15.1f}')
    print(f'{device}, {kind}, generator {arch}, {num_images} images per measurement, detector batch {batch}, '
          f'Frechet distance on 2048-D statistics {fd_seconds:.2f} s; torch {torch.__version__}.')


if __name__ == '__main__':
    main()
