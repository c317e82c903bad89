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
