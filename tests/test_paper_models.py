"""The PowerSGD paper's models and the golden numbers of its Table 3 / Section 5.

Golden: PowerSGD's bits per step on ResNet-18 (vectors sent uncompressed, counted) give the paper's
compression ratios 243x, 136x, 72x, 42x at ranks 1, 2, 4, 7; dense SGD sends 1023 MB per worker per epoch
(16 workers x 128 images, 50,000 images: 24 full steps, MB = 2^20 bytes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressors
from compressors.comm import VirtualCollective
from sim.models import build, lstm_wikitext2, resnet18_cifar
from sim.models.paper import LSTM_WIKITEXT2_PARAMETERS, RESNET18_CIFAR_PARAMETERS
from theory import bits as tbits


def shapes_of(factory):
    with torch.device("meta"):
        module = factory()
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def resnet_shapes():
    return shapes_of(resnet18_cifar)


def test_parameter_counts(resnet_shapes):
    assert sum(torch.Size(s).numel() for s in resnet_shapes.values()) == RESNET18_CIFAR_PARAMETERS == 11_173_962
    lstm = shapes_of(lstm_wikitext2)
    assert sum(torch.Size(s).numel() for s in lstm.values()) == LSTM_WIKITEXT2_PARAMETERS == 28_949_319
    assert resnet_shapes["conv1.weight"] == (64, 3, 3, 3)  # the 3x3 CIFAR stem
    assert sum(len(s) == 4 for s in resnet_shapes.values()) == 20  # 17 3x3 convs + 3 1x1 shortcuts
    assert lstm["embedding.weight"] == (28869, 650) and "decoder_bias" in lstm
    assert sum(name.startswith("lstm.weight_ih") for name in lstm) == 3
    # nn.LSTM's names and shapes (the unrolled LSTM keeps them): 4h x h input and recurrent weights, two biases
    assert lstm["lstm.weight_ih_l2"] == lstm["lstm.weight_hh_l0"] == (4 * 650, 650)
    assert lstm["lstm.bias_ih_l1"] == lstm["lstm.bias_hh_l1"] == (4 * 650,) and len(lstm) == 2 + 3 * 4


@pytest.mark.parametrize("rank,ratio", [(1, 243), (2, 136), (4, 72), (7, 42)])
def test_golden_powersgd_compression_ratios(resnet_shapes, rank, ratio):
    """Default min_compression_rate (2.0) needs no adjustment: at rank 7 it sends the 10x512 classifier dense
    (rate 1.40 <= 2), giving 42.11x; compressing it too gives 42.34x: both round to the paper's 42."""
    dense = sum(torch.Size(s).numel() for s in resnet_shapes.values()) * 32
    agg = compressors.make("powersgd", rank=rank)
    bits = agg.bits_per_step(resnet_shapes)
    assert round(dense / bits) == ratio
    assert bits == tbits.scheme_bits("powersgd", resnet_shapes, rank=rank)
    assert round(tbits.scheme_ratio("powersgd", resnet_shapes, rank=rank, min_compression_rate=0.0)) == ratio


def test_golden_dense_epoch_volume(resnet_shapes):
    bits = compressors.make("identity").bits_per_step(resnet_shapes)
    assert bits == 11_173_962 * 32
    # 24 steps x 44,695,848 bytes = 1,072,700,352 bytes = 1023.0 MiB (1072.7 in 10^6-byte MB: not the paper's)
    assert round(tbits.epoch_megabytes(bits, 50_000, 16, 128)) == 1023
    assert round(tbits.epoch_megabytes(bits, 50_000, 16, 128, megabyte=10 ** 6)) == 1073


def test_powersgd_ledger_on_resnet_matches_bits_per_step(resnet_shapes):
    """The real kernel on the real shapes (one worker): the ledger equals bits_per_step."""
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn((1, *s), generator=g) for n, s in resnet_shapes.items()}
    agg = compressors.make("powersgd", rank=2)
    state = agg.init(resnet_shapes, workers=1, seed=0)
    comm = VirtualCollective(1)
    agg.aggregate(grads, state, comm)
    assert sum(r.bits for r in comm.ledger) == agg.bits_per_step(resnet_shapes)


def test_models_run_forward():
    net = build(resnet18_cifar, torch.Generator().manual_seed(0))
    net.eval()
    out = net(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    lm = build(lambda: lstm_wikitext2(vocab_size=50, hidden=16), torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    logits = lm(tokens)
    assert logits.shape == (3, 7, 50)
    # tied: the decoder is the embedding matrix (and its bias)
    hidden, _ = lm.lstm(lm.embedding(tokens))
    torch.testing.assert_close(logits, hidden @ lm.embedding.weight.T + lm.decoder_bias)


def test_lstm_bad_vocab_names_the_field():
    with pytest.raises(ValueError, match="vocab_size"):
        lstm_wikitext2(vocab_size=0)


class TorchLSTMLanguageModel(nn.Module):
    """The reference: the same language model on nn.LSTM (what lstm_wikitext2 was before it was unrolled)."""

    def __init__(self, vocab_size: int, hidden: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, tokens):
        out, _ = self.lstm(self.embedding(tokens))
        return F.linear(out, self.embedding.weight, self.decoder_bias)


@pytest.mark.parametrize("seed", [0, 3])
def test_unrolled_lstm_model_equals_the_nn_lstm_model(seed):
    """Same seed -> bit-identical parameters as the nn.LSTM model (reset_parameters gives the unrolled
    LSTM nn.LSTM's U(-1/sqrt h, 1/sqrt h) in nn.LSTM's order), and the same logits."""
    ours = build(lambda: lstm_wikitext2(vocab_size=40, hidden=12, layers=3), torch.Generator().manual_seed(seed),
                 dtype=torch.float64)
    ref = build(lambda: TorchLSTMLanguageModel(40, 12, 3), torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for name in ref_state:
        assert torch.equal(ours_state[name], ref_state[name]), name
    for name, p in ours.lstm.named_parameters():
        assert 0.9 / 12 ** 0.5 < p.abs().max() <= 1 / 12 ** 0.5, name
    tokens = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours(tokens), ref(tokens), rtol=1e-12, atol=1e-12)
