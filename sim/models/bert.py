"""BERT-base (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers", NAACL 2019: L=12,
H=768, A=12), the encoder with its pooler (Hugging Face ``BertModel``), written from the architecture.

Word (30,522-token WordPiece vocabulary), position (512) and token-type (2) embeddings summed and
LayerNorm'ed; 12 post-norm blocks with separate query/key/value projections; a pooler (dense + tanh on the
first token). 109,482,240 parameters (the published count of ``bert-base-uncased``'s ``BertModel``).
The forward takes token ids (B, T) and returns the pooled (B, 768) output.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import PostNormBlock

BERT_BASE_PARAMETERS = 109_482_240


class Bert(nn.Module):
    def __init__(self, vocab: int = 30_522, positions: int = 512, types: int = 2, width: int = 768, layers: int = 12,
                 heads: int = 12, hidden: int = 3072):
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.position = nn.Embedding(positions, width)
        self.token_type = nn.Embedding(types, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.blocks = nn.Sequential(*(PostNormBlock(width, heads, hidden) for _ in range(layers)))
        self.pooler = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) token ids -> (B, d)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids))  # (B, T, d)
        x = self.blocks(self.norm(x))
        return torch.tanh(self.pooler(x[:, 0]))


def bert_base() -> Bert:
    return Bert()
