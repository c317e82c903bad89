"""ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Table 1: 12 layers, width 768,
MLP 3072, 12 heads), for 224x224 images with a 1000-class head, written from the architecture.

16x16 patches embedded by a stride-16 convolution, a learned class token, learned position embeddings for
1 + 196 tokens, 12 pre-norm blocks, a final LayerNorm, a linear head on the class token. 86,567,656
parameters (the published count of ViT-B/16 with a 1000-class head, e.g. torchvision's ``vit_b_16`` card).
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import PreNormBlock

VIT_B16_PARAMETERS = 86_567_656


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 224, patch: int = 16, width: int = 768, layers: int = 12, heads: int = 12,
                 hidden: int = 3072, num_classes: int = 1000):
        super().__init__()
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.empty(1, tokens, width).normal_(std=0.02))
        self.blocks = nn.Sequential(*(PreNormBlock(width, heads, hidden) for _ in range(layers)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 224, 224) -> (B, classes)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 196, d)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_b16(num_classes: int = 1000) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes)
