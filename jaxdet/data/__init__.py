"""Synthetic datasets (the embedded default), tfds loaders, augmentation, batching."""
