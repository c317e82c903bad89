"""Models keep their own initialisation: free parameters, attention projections and custom schemes are exactly
what the module's own code draws for the seed; the caller's global RNG is left as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sim
from sim.models import build


class FreeParameterAttention(nn.Module):
    """A user model the old meta-device build zeroed: a free parameter, attention, a custom-initialised layer."""

    def __init__(self):
        super().__init__()
        self.position = nn.Parameter(torch.randn(12, 32) * 0.02)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)
        nn.init.orthogonal_(self.head.weight)

    def forward(self, x):  # x: (B, 12, 32)
        h, _ = self.attention(x + self.position, x + self.position, x + self.position)
        return self.head(h.mean(1))


def reference(seed: int) -> dict[str, torch.Tensor]:
    """What plain PyTorch gives: seed the global generator, build the module (then restore the RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {n: p.detach().clone() for n, p in FreeParameterAttention().named_parameters()}


@pytest.mark.parametrize("seed", [0, 7])
def test_user_model_starts_from_exactly_its_own_initialisation(seed):
    model = build(FreeParameterAttention, seed)
    expected = reference(seed)
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert model.position.abs().max() > 0 and model.attention.in_proj_weight.abs().max() > 0


def test_same_seed_same_parameters_other_seed_other_parameters():
    a, b, c = build(FreeParameterAttention, 3), build(FreeParameterAttention, 3), build(FreeParameterAttention, 4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.abs().max() > 0:  # randomly drawn (MultiheadAttention's biases start at 0 by design)
            assert not torch.equal(pa, pc), name


def test_build_leaves_no_trace_on_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build(FreeParameterAttention, 5, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), before)


def test_float64_build_is_the_float32_draw_widened():
    wide, narrow = build(FreeParameterAttention, 1, dtype=torch.float64), build(FreeParameterAttention, 1)
    for (name, w), n in zip(wide.named_parameters(), narrow.parameters()):
        assert w.dtype == torch.float64 and torch.equal(w, n.double()), name


def test_build_refuses_a_factory_that_is_not_a_module_and_a_bad_seed():
    with pytest.raises(ValueError, match="nn.Module"):
        build(lambda: torch.zeros(3), 0)
    with pytest.raises(ValueError, match="seed"):
        build(FreeParameterAttention, -1)


def test_simulation_model_is_the_task_models_own_initialisation():
    experiment = sim.Experiment(task="digits-mlp", workers=2, steps=1, seed=11)
    simulation = sim.Simulation(experiment)
    state = simulation.initial_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        own = simulation.task.model()
    for name, p in own.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name
