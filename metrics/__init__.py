"""Evaluation metrics: a registry (metric_main) and one module per metric, all built on metric_utils.

Importing this package does no work: feature detectors are loaded, and dataset statistics computed, only when
a metric runs.
"""
