"""GPT-2 small (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019: 12 layers,
width 768, 12 heads, context 1024), written from the architecture.

Token (50,257-entry BPE vocabulary) and learned position embeddings, 12 pre-norm causal blocks, a final
LayerNorm, and a language-model head tied to the token embedding (the same weight, counted once).
124,439,808 parameters (the published count of Hugging Face ``gpt2``). The forward takes token ids (B, T) and
returns logits (B, T, vocab).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import PreNormBlock

GPT2_PARAMETERS = 124_439_808


class GPT2(nn.Module):
    def __init__(self, vocab: int = 50_257, context: int = 1024, width: int = 768, layers: int = 12, heads: int = 12):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(PreNormBlock(width, heads, 4 * width, causal=True, eps=1e-5)
                                      for _ in range(layers)))
        self.norm = nn.LayerNorm(width, eps=1e-5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.blocks(self.token(ids) + self.position(positions))
        return F.linear(self.norm(x), self.token.weight)  # tied head: no parameter of its own


def gpt2() -> GPT2:
    return GPT2()
