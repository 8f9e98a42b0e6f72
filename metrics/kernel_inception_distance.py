"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the
squared MMD between Inception features of real and generated images, with the cubic polynomial kernel
k(x, y) = (x·y / d + 1)³, averaged over random subsets."""

from typing import Optional

import numpy as np

from . import metric_utils

# The feature network this metric runs (Inception-v3 pool3 features); metric_main registers it with the metric so that
# check_metrics_ready() can find the file before a training run starts.
DETECTOR_URL = metric_utils.INCEPTION_URL


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x_i, y_j) = (x_i·y_j / d + 1)³ for all pairs of rows."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equally sized samples: the mean over i≠j of k(x_i, x_j) and k(y_i, y_j), minus
    twice the mean over all i, j of k(x_i, y_j)."""
    m = x.shape[0]
    assert y.shape[0] == m and m >= 2
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_inception_distance(real_features: np.ndarray, gen_features: np.ndarray, num_subsets: int,
                              max_subset_size: int, seed: int = 0) -> float:
    """Mean unbiased MMD² over `num_subsets` pairs of random subsets (without replacement) of
    min(len(real), len(gen), max_subset_size) rows each."""
    real_features = np.asarray(real_features, dtype=np.float64)
    gen_features = np.asarray(gen_features, dtype=np.float64)
    m = min(len(real_features), len(gen_features), max_subset_size)
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = gen_features[rng.choice(len(gen_features), m, replace=False)]
        y = real_features[rng.choice(len(real_features), m, replace=False)]
        total += mmd2_unbiased(x, y)
    return total / num_subsets


def compute_kid(opts: metric_utils.MetricOptions, max_real: Optional[int], num_gen: int, num_subsets: int = 100,
                max_subset_size: int = 1000, batch_size: int = 64) -> float:
    """KID between the first `max_real` dataset images and `num_gen` generated ones (rank 0; NaN elsewhere)."""
    detector_kwargs = dict(return_features=True)
    real_features = metric_utils.compute_feature_stats_for_dataset(
        opts, detector_url=DETECTOR_URL, detector_kwargs=detector_kwargs, batch_size=batch_size,
        max_items=max_real, capture_all=True).get_all()
    gen_features = metric_utils.compute_feature_stats_for_generator(
        opts, detector_url=DETECTOR_URL, detector_kwargs=detector_kwargs, batch_size=batch_size,
        capture_all=True, max_items=num_gen).get_all()
    if opts.rank != 0:
        return float('nan')
    return kernel_inception_distance(real_features, gen_features, num_subsets, max_subset_size)
