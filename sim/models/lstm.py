"""A multi-layer LSTM unrolled in Python from matmuls and pointwise ops, so ``vmap(grad(...))`` batches it.

``nn.LSTM`` has no vmap batching rule in torch 2.13 (``aten::mkldnn_rnn_layer``): under the simulator's vmap
engine it loops over workers in float32 and fails in float64. ``UnrolledLSTM`` computes the same function
with the same parameters (names, shapes and registration order of ``nn.LSTM(..., batch_first=True)``:
``weight_ih_l{k}`` (4h, in), ``weight_hh_l{k}`` (4h, h), ``bias_ih_l{k}`` (4h), ``bias_hh_l{k}`` (4h)), so
its state dict loads into ``nn.LSTM`` and back, and its ``reset_parameters`` gives it the LSTM's
U(-1/sqrt h, 1/sqrt h) in the same generator order as ``nn.LSTM``.

Gates (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000), PyTorch's gate order:
    i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);  h_t = sigmoid(o) * tanh(c_t)
Dropout (probability ``dropout``, training mode only) applies to each layer's output except the last, as in
``nn.LSTM``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lstm_layer(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
               bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer over all steps: x (B, T, in), h and c (B, h) -> outputs (B, T, h), last h, last c."""
    projected = F.linear(x, weight_ih, bias_ih)  # (B, T, 4h): the input half of every gate, all steps at once
    outputs = []
    for t in range(x.shape[1]):
        i, f, g, o = (projected[:, t] + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=-1)  # each (B, h)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, dim=1), h, c  # (B, T, h), (B, h), (B, h)


class UnrolledLSTM(nn.Module):
    """Drop-in for ``nn.LSTM(input_size, hidden_size, num_layers, dropout=dropout, batch_first=True)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        for k in range(num_layers):
            inputs = input_size if k == 0 else hidden_size
            # registration order = nn.LSTM's, so reset_parameters draws from the generator in the same order
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, inputs)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's scheme: every weight and bias U(-1/sqrt(h), 1/sqrt(h)), in registration order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, T, in); hx = (h_0, c_0), each (layers, B, h), zeros if None -> (out (B, T, h), (h_n, c_n))."""
        if hx is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)  # (L, B, h)
            hx = (zeros, zeros)
        last_h, last_c = [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, h, c = lstm_layer(x, hx[0][k], hx[1][k], getattr(self, f"weight_ih_l{k}"),
                                 getattr(self, f"weight_hh_l{k}"), getattr(self, f"bias_ih_l{k}"),
                                 getattr(self, f"bias_hh_l{k}"))
            last_h.append(h)
            last_c.append(c)
        return x, (torch.stack(last_h), torch.stack(last_c))  # (B, T, h), ((L, B, h), (L, B, h))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}"
