"""Transformer blocks shared by ``vit``, ``bert`` and ``gpt2`` (Vaswani et al., "Attention Is All You Need",
2017): multi-head self-attention and the two-layer MLP, with the layouts of the published implementations so
that parameter counts match them (attention: one fused q/k/v projection or three separate ones, then an output
projection; every linear layer with a bias).

Attention is written with plain matmuls (no fused kernel) so that ``torch.utils.flop_counter`` counts it and
``torch.func.vmap`` can batch it.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d_head) + mask) v over ``heads`` heads, then an output projection.

    fused=True: one (d, 3d) q/k/v projection (ViT's ``in_proj``, GPT-2's ``c_attn``); False: three (d, d) ones
    (BERT's query, key, value).
    """

    def __init__(self, width: int, heads: int, fused: bool = True, causal: bool = False):
        super().__init__()
        self.heads, self.causal, self.fused = heads, causal, fused
        if fused:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(d, dim=-1)  # (B, T, d) each
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)  # (B, h, T, T)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        y = scores.softmax(dim=-1) @ v  # (B, h, T, dh)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class PreNormBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) (ViT, GPT-2)."""

    def __init__(self, width: int, heads: int, hidden: int, causal: bool = False, eps: float = 1e-6):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads, fused=True, causal=causal)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PostNormBlock(nn.Module):
    """LN(x + attn(x)), then LN(x + mlp(x)) (BERT)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.attn = SelfAttention(width, heads, fused=False)
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden)
        self.ln2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))
