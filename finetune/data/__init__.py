"""Reading data sources, near-duplicate search, augmentation; and the one constant every formatted row shares."""

IGNORE = -100  # the label of a position that is not trained (PyTorch's cross-entropy ignore_index)
