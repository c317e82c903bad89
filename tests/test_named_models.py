"""The standard models known by name: parameter counts equal the published ones exactly, and FLOPs counted by
torch.utils.flop_counter equal the published multiply-add counts (x2) or an analytic count from the
architecture. Built on the meta device: nothing is allocated or computed."""
from __future__ import annotations

import pytest
import torch

from sim.cost.compute import forward_flops
from sim.cost.whatif import MODELS, resolve_source
from sim.models import bert, gpt2, resnet, vit

PUBLISHED = {  # parameters, from the models' cards (torchvision resnet50 / vit_b_16, Hugging Face bert-base, gpt2)
    "resnet50": (resnet.resnet50, 25_557_032),
    "vit_b16": (vit.vit_b16, 86_567_656),
    "bert_base": (bert.bert_base, 109_482_240),
    "gpt2": (gpt2.gpt2, 124_439_808),
}


def meta(factory):
    with torch.device("meta"):
        return factory()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_one(name):
    factory, count = PUBLISHED[name]
    model = meta(factory)
    assert sum(p.numel() for p in model.parameters()) == count
    assert all(p.device.type == "meta" for p in model.parameters())
    assert name in MODELS  # and whatif knows it by name
    shapes = resolve_source(name).shapes
    assert sum(torch.Size(s).numel() for s in shapes.values()) == count


def test_module_constants_agree():
    assert resnet.RESNET50_PARAMETERS == PUBLISHED["resnet50"][1]
    assert vit.VIT_B16_PARAMETERS == PUBLISHED["vit_b16"][1]
    assert bert.BERT_BASE_PARAMETERS == PUBLISHED["bert_base"][1]
    assert gpt2.GPT2_PARAMETERS == PUBLISHED["gpt2"][1]


def test_gpt2_head_is_tied_to_the_token_embedding():
    model = meta(gpt2.gpt2)
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    assert model(torch.zeros(2, 5, dtype=torch.long, device="meta")).shape == (2, 5, 50_257)


@pytest.mark.parametrize("name, published_macs", [("resnet50", 4.09e9), ("vit_b16", 17.56e9)])
def test_image_model_flops_match_published_multiply_adds(name, published_macs):
    # torchvision's model cards: 4.09 and 17.56 GFLOPS (multiply-adds) per 224x224 image
    model = meta(PUBLISHED[name][0])
    flops = forward_flops(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert flops == pytest.approx(2 * published_macs, rel=2e-3)
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)


def _transformer_flops_per_token(width, layers, hidden, tokens):
    # 2 per multiply-add: q, k, v, out projections (4 d^2) and the MLP (2 d h) per layer, plus q k^T and
    # attention x v (2 T d per token per layer)
    return 2 * layers * (4 * width ** 2 + 2 * width * hidden) + 2 * layers * 2 * tokens * width


def test_bert_flops_are_the_analytic_count():
    tokens = 128
    flops = forward_flops(meta(bert.bert_base), torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    pooler = 2 * 768 ** 2
    assert flops == tokens * _transformer_flops_per_token(768, 12, 3072, tokens) + pooler


def test_gpt2_flops_are_the_analytic_count():
    tokens = 1024
    flops = forward_flops(meta(gpt2.gpt2), torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    head = 2 * 768 * 50_257  # tied output projection, per token
    assert flops == tokens * (_transformer_flops_per_token(768, 12, 3072, tokens) + head)


def test_a_small_real_forward_runs():
    # the same code on real tensors (tiny inputs, real weights): finite outputs of the right shape
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet.resnet50(num_classes=7).eval()
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
