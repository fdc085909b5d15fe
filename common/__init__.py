"""Shared code of the CIFAR-10 pre-training comparison: data, models, training loop, checkpoints,
logs."""
