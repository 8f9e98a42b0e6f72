"""Custom operations with pure-PyTorch reference paths and optional CUDA kernels."""
