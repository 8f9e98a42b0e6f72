"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium"): the Fréchet distance between Gaussians fitted to Inception-v3 pool features of real
and generated images."""

from typing import Optional

import numpy as np
import scipy.linalg

from . import metric_utils

# The feature network this metric runs (Inception-v3 pool3 features); metric_main registers it with the metric so that
# check_metrics_ready() can find the file before a training run starts.
DETECTOR_URL = metric_utils.INCEPTION_URL

# Added to both covariances when their product has no finite square root (e.g. singular, from fewer samples
# than feature dimensions).
SQRTM_EPS = 1e-6


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == (mu1.size, mu1.size)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Numerical error gives the square root of a (theoretically PSD-like) product a small imaginary part.
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def compute_fid(opts: metric_utils.MetricOptions, max_real: Optional[int], num_gen: int, batch_size: int = 64) -> float:
    """FID between the first `max_real` dataset images (None = all) and `num_gen` generated ones.
    The value is computed on rank 0; other ranks return NaN (calc_metric broadcasts rank 0's result)."""
    detector_kwargs = dict(return_features=True)  # Inception pool3 features, 2048-D.
    mu_real, sigma_real = metric_utils.compute_feature_stats_for_dataset(
        opts, detector_url=DETECTOR_URL, detector_kwargs=detector_kwargs, batch_size=batch_size,
        max_items=max_real, capture_mean_cov=True).get_mean_cov()
    mu_gen, sigma_gen = metric_utils.compute_feature_stats_for_generator(
        opts, detector_url=DETECTOR_URL, detector_kwargs=detector_kwargs, batch_size=batch_size,
        capture_mean_cov=True, max_items=num_gen).get_mean_cov()
    if opts.rank != 0:
        return float('nan')
    return frechet_distance(mu_gen, sigma_gen, mu_real, sigma_real)
