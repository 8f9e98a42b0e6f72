"""The method: networks, loss, augmentation, datasets, the training loop and snapshot handling."""
