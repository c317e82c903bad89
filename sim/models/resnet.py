"""ResNet-50 for ImageNet (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
Table 1, the 50-layer column), written from the architecture: no torchvision.

A 7x7/2 convolution stem with 64 channels, BatchNorm, ReLU, 3x3/2 max-pool; four stages of 3, 4, 6, 3
Bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4) with 64, 128, 256, 512 inner channels; the stride of a
stage's first block sits on its 3x3 convolution (the "v1.5" placement of the common implementations; the
parameter count does not depend on it); a 1x1 convolution + BatchNorm shortcut where the shape changes;
convolutions without bias; global average pooling; a 2048 -> 1000 linear head. 25,557,032 parameters, the
published count of the standard implementation (torchvision's ``resnet50`` model card).
"""
from __future__ import annotations

import torch
from torch import nn

RESNET50_PARAMETERS = 25_557_032
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (inner channels, blocks, stride of the first)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, channels = [], 64
        for planes, count, stride in STAGES:
            for i in range(count):
                blocks.append(Bottleneck(channels, planes, stride if i == 0 else 1))
                channels = planes * EXPANSION
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 224, 224) -> (B, classes)
        y = self.blocks(self.stem(x))  # (B, 2048, 7, 7)
        return self.fc(y.mean(dim=(2, 3)))


def resnet50(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)
