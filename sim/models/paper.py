"""The PowerSGD paper's models (Vogels, Karimireddy, Jaggi 2019, Section 5 and Appendix), shapes from real modules.

- ``resnet18_cifar()``: the CIFAR-10 ResNet-18 of the paper's code (after kuangliu/pytorch-cifar): a 3x3
  stem with stride 1 and no max-pool, four stages of two BasicBlocks (64, 128, 256, 512 channels), 1x1
  convolution shortcuts where the shape changes, global average pooling, a 512 -> 10 linear head.
  11,173,962 parameters.
- ``lstm_wikitext2(vocab_size=28869)``: the WikiText-2 language model: embedding, 3-layer LSTM with 650
  hidden units, decoder tied to the embedding (weight shared, own bias). With the paper's vocabulary of
  28,869 tokens it has 28,949,319 parameters (the paper's Table 1 count).

Both build on any device (including ``meta``) and initialise themselves as torch's modules do;
``sim.models.build`` runs them under a seeded fork of the global RNG, which it restores afterwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lstm import UnrolledLSTM

#: The paper's parameter counts (Table 1 of the PowerSGD paper).
RESNET18_CIFAR_PARAMETERS = 11_173_962
LSTM_WIKITEXT2_VOCAB = 28_869
LSTM_WIKITEXT2_PARAMETERS = 28_949_319


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; the shortcut is a 1x1 convolution + BatchNorm when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # the 3x3 CIFAR stem
        self.bn1 = nn.BatchNorm2d(64)
        blocks, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stage = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            blocks.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.linear = nn.Linear(512, classes)

    def forward(self, x):  # x: (B, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, 4, 4)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 512)
        return self.linear(out)


def resnet18_cifar(classes: int = 10) -> nn.Module:
    """The paper's CIFAR-10 ResNet-18 (11,173,962 parameters for 10 classes)."""
    return ResNet18Cifar(classes)


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> decoder whose weight *is* the embedding matrix (tied by construction: the decoder
    owns only its bias, so tying survives ``to_empty``, ``functional_call`` and state-dict round trips).

    The LSTM is ``UnrolledLSTM`` (same parameters, names and function as ``nn.LSTM``) because ``nn.LSTM`` has
    no vmap batching rule: the simulator's vmap engine would loop over workers, and fail in float64."""

    def __init__(self, vocab_size: int, hidden: int = 650, layers: int = 3, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.lstm = UnrolledLSTM(hidden, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, tokens, hidden=None):  # tokens: (B, T) int64
        x = self.dropout(self.embedding(tokens))  # (B, T, h)
        out, _ = self.lstm(x, hidden)  # (B, T, h)
        return F.linear(self.dropout(out), self.embedding.weight, self.decoder_bias)  # (B, T, vocab)


def lstm_wikitext2(vocab_size: int = LSTM_WIKITEXT2_VOCAB, hidden: int = 650, layers: int = 3,
                   dropout: float = 0.0) -> nn.Module:
    """The paper's WikiText-2 LSTM: 3 layers, 650 hidden, tied embedding/decoder.

    Parameters: vocab*h (tied embedding) + vocab (decoder bias) + layers * (4h(h + h) + 8h) (LSTM weights
    and both biases). ``dropout`` defaults to 0 so a simulated step is deterministic without a dropout RNG.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"lstm_wikitext2: vocab_size={vocab_size!r} is invalid; allowed: an integer >= 1")
    return LSTMLanguageModel(vocab_size, hidden, layers, dropout)
