"""Generic PyTorch utilities: persistence, training statistics, misc helpers, custom ops."""
