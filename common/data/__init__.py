"""CIFAR-10 in: sources -> splits -> streams, with the augmentation recipes both pipelines read
(design.md)."""
