"""Small models for the bundled tasks (no torchvision on CPU: written here)."""
from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (128, 128), classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def digits_cnn(classes: int = 10) -> nn.Module:
    """8x8 grey images: two conv blocks with BatchNorm (per-worker batch statistics), then a linear head."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),  # (64, 4, 4)
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )


def linear(in_features: int, out_features: int) -> nn.Module:
    """One weight matrix, no bias: the least-squares model of ``synthetic-lowrank``."""
    return nn.Linear(in_features, out_features, bias=False)


def fashion_cnn(classes: int = 10) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) for 28x28 grey images, with ReLU and max-pooling: 61,706 parameters.

    Its conv kernels are compressed as matrices out x in*kh*kw (6 x 25, 16 x 150), its linear layers as
    120 x 400, 84 x 120, 10 x 84. No BatchNorm: per-worker batch statistics would add a second effect.
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (6, 14, 14)
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (16, 5, 5)
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes),
    )
