"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs"): exp(E_x[KL(p(y|x) ‖ p(y))])
with Inception-v3 class probabilities, mean and standard deviation over splits of the samples."""

import numpy as np
import scipy.special

from . import metric_utils

# The feature network this metric runs (Inception-v3 class probabilities); metric_main registers it with the metric so that
# check_metrics_ready() can find the file before a training run starts.
DETECTOR_URL = metric_utils.INCEPTION_URL


def as_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Detector outputs -> class probabilities. The official Inception module returns softmax probabilities
    already; raw logits (rows that are not non-negative and summing to one) are put through a softmax."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1, atol=1e-3):
        return outputs
    return scipy.special.softmax(outputs, axis=1)


def inception_score(probs: np.ndarray, num_splits: int) -> tuple:
    """(mean, std) over `num_splits` consecutive splits of exp(mean_i KL(p(y|x_i) ‖ p(y))), p(y) = the split's
    mean prediction. 0·log 0 counts as 0, so one-hot predictions are fine."""
    probs = np.asarray(probs, dtype=np.float64)
    n = probs.shape[0]
    assert probs.ndim == 2 and n >= num_splits >= 1
    scores = []
    for i in range(num_splits):
        part = probs[i * n // num_splits: (i + 1) * n // num_splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (scipy.special.xlogy(part, part) - scipy.special.xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def compute_is(opts: metric_utils.MetricOptions, num_gen: int, num_splits: int = 10, batch_size: int = 64) -> tuple:
    """IS of `num_gen` generated images (rank 0; (NaN, NaN) elsewhere)."""
    # The original TensorFlow IS code computed the softmax without the output layer's bias.
    detector_kwargs = dict(no_output_bias=True)
    outputs = metric_utils.compute_feature_stats_for_generator(
        opts, detector_url=DETECTOR_URL, detector_kwargs=detector_kwargs, batch_size=batch_size,
        capture_all=True, max_items=num_gen).get_all()
    if opts.rank != 0:
        return float('nan'), float('nan')
    return inception_score(as_probabilities(outputs), num_splits)
