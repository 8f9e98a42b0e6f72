"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"): each sample set spans a manifold, the union of balls around its points whose radius is
the distance to the point's k-th nearest neighbour. Precision is the fraction of generated samples inside the
real manifold, recall the fraction of real samples inside the generated one. Features are VGG16 features.

Distances are computed in blocks of rows and columns and never held for a whole set at once; the column
blocks are spread over the ranks.
"""

from typing import Optional

import torch

from . import metric_utils

# The feature network this metric runs (VGG16 features); metric_main registers it with the metric so that
# check_metrics_ready() can find the file before a training run starts.
DETECTOR_URL = metric_utils.VGG16_URL


def _column_batches(num_cols: int, col_batch_size: int, num_gpus: int, rank: int) -> list:
    """Column ranges [start, stop) of this rank. Every rank gets the same number of slots (None = padding), so
    that all ranks take part in the same collectives."""
    starts = list(range(0, num_cols, col_batch_size))
    num_slots = -(-len(starts) // num_gpus)
    mine = []
    for slot in range(num_slots):
        index = slot * num_gpus + rank
        mine.append((starts[index], min(starts[index] + col_batch_size, num_cols)) if index < len(starts) else None)
    return mine


def _all_gather_cat(x: torch.Tensor, num_gpus: int, dim: int) -> torch.Tensor:
    if num_gpus == 1 or not metric_utils._distributed_ready():
        return x
    gathered = [torch.empty_like(x) for _ in range(num_gpus)]
    torch.distributed.all_gather(gathered, x.contiguous())
    return torch.cat(gathered, dim=dim)


def compute_distances(row_features: torch.Tensor, col_features: torch.Tensor, num_gpus: int = 1, rank: int = 0,
                      col_batch_size: int = 10000) -> torch.Tensor:
    """The full [rows, cols] matrix of Euclidean distances, columns computed in batches spread over the ranks
    and gathered; every rank returns the whole matrix."""
    pieces = []
    for cols in _column_batches(col_features.shape[0], col_batch_size, num_gpus, rank):
        if cols is None:
            dist = torch.zeros([row_features.shape[0], col_batch_size], device=row_features.device)
        else:
            dist = torch.cdist(row_features, col_features[cols[0]:cols[1]])
            dist = torch.nn.functional.pad(dist, [0, col_batch_size - dist.shape[1]])
        pieces.append(_all_gather_cat(dist, num_gpus, dim=1))
    return torch.cat(pieces, dim=1)[:, :col_features.shape[0]]


def knn_radii(features: torch.Tensor, nhood_size: int, num_gpus: int = 1, rank: int = 0,
              row_batch_size: int = 10000, col_batch_size: int = 10000) -> torch.Tensor:
    """Distance from every row to its `nhood_size`-th nearest neighbour among the other rows (the row itself,
    at distance 0, is the first of the nhood_size + 1 smallest)."""
    k = nhood_size + 1
    assert features.shape[0] >= k, f'k-NN radii with k={nhood_size} need more than {nhood_size} samples'
    radii = []
    for rows in features.split(row_batch_size):
        best = torch.full([rows.shape[0], k], float('inf'), device=features.device)
        for cols in _column_batches(features.shape[0], col_batch_size, num_gpus, rank):
            if cols is not None:
                dist = torch.cdist(rows, features[cols[0]:cols[1]])
                best = torch.cat([best, dist], dim=1).topk(min(k, best.shape[1] + dist.shape[1]), dim=1,
                                                           largest=False).values
        # Each rank holds the k smallest of its own columns; the k smallest of their union are the answer.
        best = _all_gather_cat(best, num_gpus, dim=1).topk(k, dim=1, largest=False).values
        radii.append(best[:, -1])
    return torch.cat(radii)


def inside_manifold(probes: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, num_gpus: int = 1,
                    rank: int = 0, row_batch_size: int = 10000, col_batch_size: int = 10000) -> torch.Tensor:
    """Bool per probe: is it within `radii[j]` of some manifold point j?"""
    result = []
    for rows in probes.split(row_batch_size):
        inside = torch.zeros([rows.shape[0]], dtype=torch.bool, device=probes.device)
        for cols in _column_batches(manifold.shape[0], col_batch_size, num_gpus, rank):
            if cols is not None:
                dist = torch.cdist(rows, manifold[cols[0]:cols[1]])
                inside |= (dist <= radii[cols[0]:cols[1]].unsqueeze(0)).any(dim=1)
        if num_gpus > 1 and metric_utils._distributed_ready():
            counts = inside.to(torch.int32)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            inside = counts.to(torch.bool)
        result.append(inside)
    return torch.cat(result)


def precision_recall(real_features: torch.Tensor, gen_features: torch.Tensor, nhood_size: int = 3, num_gpus: int = 1,
                     rank: int = 0, row_batch_size: int = 10000, col_batch_size: int = 10000) -> tuple:
    """(precision, recall) of generated features against real features."""
    kwargs = dict(num_gpus=num_gpus, rank=rank, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
    real_radii = knn_radii(real_features, nhood_size, **kwargs)
    gen_radii = knn_radii(gen_features, nhood_size, **kwargs)
    precision = inside_manifold(gen_features, real_features, real_radii, **kwargs).to(torch.float64).mean()
    recall = inside_manifold(real_features, gen_features, gen_radii, **kwargs).to(torch.float64).mean()
    return float(precision), float(recall)


def compute_pr(opts: metric_utils.MetricOptions, max_real: Optional[int], num_gen: int, nhood_size: int = 3,
               row_batch_size: int = 10000, col_batch_size: int = 10000, batch_size: int = 64) -> tuple:
    """(precision, recall) of `num_gen` generated images against the first `max_real` dataset images."""
    detector_url = DETECTOR_URL
    detector_kwargs = dict(return_features=True)
    real_features = metric_utils.compute_feature_stats_for_dataset(
        opts, detector_url=detector_url, detector_kwargs=detector_kwargs, batch_size=batch_size,
        max_items=max_real, capture_all=True).get_all_torch().to(opts.device)
    gen_features = metric_utils.compute_feature_stats_for_generator(
        opts, detector_url=detector_url, detector_kwargs=detector_kwargs, batch_size=batch_size,
        capture_all=True, max_items=num_gen).get_all_torch().to(opts.device)
    return precision_recall(real_features, gen_features, nhood_size=nhood_size, num_gpus=opts.num_gpus,
                            rank=opts.rank, row_batch_size=row_batch_size, col_batch_size=col_batch_size)
