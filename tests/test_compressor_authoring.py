"""Writing a compressor: the guide's example passes the battery and runs everywhere a built-in runs;
registration and ``check_compressor`` catch what a caller could not use, naming it.

The example (examples/my_compressor.py, the code of docs/writing_a_compressor.md) registers "row_topk".
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import compressors
import sim
from compressors import Aggregator, Reduced, TheoryClaim
from compressors.testing import ContractError, check_compressor, random_grads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_compressor.py"


@pytest.fixture(autouse=True, scope="module")
def _unregister_example_afterwards():
    """Registering is process-wide: leave the registry as this file found it, so registry-driven tests that run
    later in the same process (and compare against spawned processes that never import the example) see only
    the built-in compressors."""
    yield
    compressors.REGISTRY.pop("row_topk", None)
    sys.modules.pop("my_compressor", None)


def example():
    """The example module, imported once per process (importing it registers "row_topk")."""
    if "my_compressor" not in sys.modules:
        spec = importlib.util.spec_from_file_location("my_compressor", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["my_compressor"] = module
        spec.loader.exec_module(module)
    return sys.modules["my_compressor"]


def test_guide_code_is_the_example():
    # the guide shows the example's code verbatim (from its imports on), so the tested code is the documented one
    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing_a_compressor.md").read_text()
    source = EXAMPLE.read_text()
    code = source[source.index("import torch"):]
    assert f"```python\n{code}```" in guide
    for line in ('def init(self, shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):',
                 "def bits_per_step(self, shapes, *, dtype=torch.float32):", '@compressors.register("row_topk")'):
        assert line in code


@pytest.mark.parametrize("options", [{}, {"k": 3}, {"k": 2, "error_feedback": "none"}])
def test_example_passes_the_battery(options):
    example()
    report = check_compressor("row_topk", **options)
    assert set(report) == set(compressors.testing.CHECKS)
    assert report["theory_holds"] == "ok" and set(report.values()) == {"ok"}


def test_example_against_a_dense_reference():
    # per row, the k largest magnitudes survive; the update is the mean of every worker's sparse rows
    agg = example().RowTopK(k=2)
    grads = random_grads(7, {"w": (4, 5)}, workers=3, dtype=torch.float64)
    update, _ = agg.aggregate(grads, agg.init({"w": (4, 5)}, 3), sim.VirtualCollective(3))
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for worker in grads["w"]:
        for i, row in enumerate(worker):
            keep = sorted(range(5), key=lambda j: -abs(float(row[j])))[:2]
            for j in keep:
                expected[i, j] += row[j] / 3
    torch.testing.assert_close(update["w"], expected, rtol=1e-12, atol=1e-15)


def test_example_runs_in_sim_run():
    example()
    e = sim.Experiment(task="digits-mlp", workers=4, steps=6, batch_size=16, eval_every=0,
                       compressor={"name": "row_topk", "k": 2}, seed=0)
    result = sim.run(e)
    assert len(result.history) >= 1 and result.history.train_loss.notna().all()
    assert result.bits_per_step < result.dense_bits_per_step
    assert result.history.bits.iloc[-1] == pytest.approx(6 * result.bits_per_step)


def test_example_runs_in_whatif():
    example()
    shapes = {"w1": (256, 1024), "b1": (256,), "w2": (10, 256)}
    table = sim.whatif(shapes, compressors=["row_topk:k=4"], workers=[8], networks=["ethernet-1g"], compute=0.001)
    row = table[table.compressor == "row_topk(k=4)"].iloc[0]
    assert row.mb_per_worker * 8e6 == pytest.approx(compressors.make("row_topk", k=4).bits_per_step(shapes))
    assert row.speedup > 1.0  # 64x fewer bits on a slow link, little compute to hide the dense all-reduce


def test_example_runs_as_a_ddp_hook(tmp_path):
    example()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        state, hook = compressors.ddp_comm_hook("row_topk", k=2, model=ddp, keep_records=True, error_feedback="none")
        ddp.register_comm_hook(state, hook)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        ddp(x).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    # one process: the hook's result is the compressor applied to this process's own gradient
    reference = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    reference(x).square().sum().backward()
    agg = compressors.make("row_topk", k=2, error_feedback="none")
    raw = {n: p.grad[None] for n, p in reference.named_parameters()}  # (1, *shape)
    expected, _ = agg.aggregate(raw, agg.init({n: tuple(g.shape[1:]) for n, g in raw.items()}, 1),
                                sim.VirtualCollective(1))
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n])
    assert {r.op for r in state.comm.ledger} >= {"all_gather"}


# -- registration catches what callers could not use ---------------------------------------------------------
class Mean(Aggregator):
    """The exact mean, correctly written (the broken variants below each change one thing)."""

    def init(self, shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):
        return ()

    def reduce(self, grads, state, comm, want_local=False):
        update = {n: comm.all_reduce_mean(g) for n, g in grads.items()}
        return Reduced(update, dict(grads) if want_local else None), state

    def bits_per_step(self, shapes, *, dtype=torch.float32):
        return sum(torch.Size(s).numel() for s in shapes.values()) * torch.finfo(dtype).bits

    def theory(self, shapes):
        return TheoryClaim("exact", omega=0.0, delta=1.0)


class OldInit(Mean):
    def init(self, shapes, workers, seed=0):  # the signature before dtype/device were documented
        return ()


class OldBits(Mean):
    def bits_per_step(self, shapes):
        return super().bits_per_step(shapes)


class NoLocal(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        return Reduced({n: comm.all_reduce_mean(g) for n, g in grads.items()}, None), state


class WrongShape(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        reduced, state = super().reduce(grads, state, comm, want_local)
        return Reduced({n: u.reshape(-1) for n, u in reduced.update.items()}, reduced.local), state


@pytest.mark.parametrize("cls, match", [
    (OldInit, r"init.*dtype=.*expected init\(self, shapes, workers, seed=0, \*, dtype=torch.float32"),
    (OldBits, r"bits_per_step.*expected bits_per_step\(self, shapes, \*, dtype=torch.float32\)"),
    (NoLocal, r"want_local=True.*Reduced.local"),
    (WrongShape, r"update\['w'\] must be finite, shape \(3, 2\)"),
])
def test_register_names_what_is_missing(cls, match):
    name = f"broken_{cls.__name__.lower()}"

    def factory():
        return cls()
    factory.__module__ = __name__
    with pytest.raises(ValueError, match=match):
        compressors.register(name)(factory)
    assert name not in compressors.REGISTRY  # nothing half-registered


def test_register_refuses_positional_options_and_non_aggregators():
    def positional(rank=1):
        return Mean()
    with pytest.raises(ValueError, match="keyword-only"):
        compressors.register("broken_positional")(positional)

    def not_an_aggregator():
        return object()
    with pytest.raises(ValueError, match="compressors.Aggregator"):
        compressors.register("broken_object")(not_an_aggregator)
    assert "broken_positional" not in compressors.REGISTRY and "broken_object" not in compressors.REGISTRY


def test_register_accepts_a_correct_compressor_and_the_old_signature_still_fails_in_a_run():
    def make_mean():
        return Mean()
    compressors.register("authoring_mean")(make_mean)
    try:
        assert set(check_compressor("authoring_mean").values()) == {"ok"}
        assert compressors.make("authoring_mean").bits_per_step({"w": (2, 3)}, dtype=torch.float16) == 6 * 16
    finally:
        del compressors.REGISTRY["authoring_mean"]
    # what registration prevents: sim.run passes dtype= to init
    with pytest.raises(TypeError, match="dtype"):
        OldInit().init({"w": (2, 3)}, workers=2, seed=0, dtype=torch.float32)


# -- check_compressor catches broken contracts ----------------------------------------------------------------
class LyingBits(Mean):
    def bits_per_step(self, shapes, *, dtype=torch.float32):
        return super().bits_per_step(shapes, dtype=dtype) / 2


class GlobalRng(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        noisy = {n: g + 1e-3 * torch.randn(g.shape, dtype=g.dtype) for n, g in grads.items()}
        return super().reduce(noisy, state, comm, want_local)

    def theory(self, shapes):
        return TheoryClaim("biased")


class NormalizesZero(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        scaled = {n: g / g.norm() * g.norm() for n, g in grads.items()}  # 0/0 on zero gradients
        return super().reduce(scaled, state, comm, want_local)


class MutatesInput(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        for g in grads.values():
            g.mul_(1.0)
            g.add_(0.0)
            g[..., :1] *= 2  # in place: the caller's gradient changes
        return super().reduce(grads, state, comm, want_local)


class ClaimsExactButHalves(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        return super().reduce({n: g / 2 for n, g in grads.items()}, state, comm, want_local)


class ClaimsTooGoodContraction(ClaimsExactButHalves):
    def theory(self, shapes):
        return TheoryClaim("contractive", delta=0.9)  # halving gives delta = 0.75


class LocalNotTheMessage(Mean):
    def reduce(self, grads, state, comm, want_local=False):
        reduced, state = super().reduce(grads, state, comm, want_local)
        local = {n: 2 * g for n, g in grads.items()} if want_local else None
        return Reduced(reduced.update, local), state


class ObjectState(Mean):
    def init(self, shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):
        return {"generator": torch.Generator().manual_seed(seed)}


@pytest.mark.parametrize("aggregator, check, match", [
    (LyingBits(), "ledger_matches_bits_per_step", "ledger of 2 steps"),
    (GlobalRng(), "deterministic_and_pure", "different updates"),
    (NormalizesZero(), "zero_gradients", "NaN"),
    (MutatesInput(), "deterministic_and_pure", "modified its input"),
    (ClaimsExactButHalves(), "theory_holds", "claims exact"),
    (ClaimsTooGoodContraction(), "theory_holds", "delta=0.9"),
    (LocalNotTheMessage(), "error_feedback_composes", "not the mean of the workers' messages"),
    (ObjectState(), "state_is_plain", "Generator"),
])
def test_check_compressor_catches(aggregator, check, match):
    with pytest.raises(ContractError, match=f"{check}: .*{match}"):
        check_compressor(aggregator, checks=[check])
    with pytest.raises(ContractError):  # the whole battery fails too (perhaps at an earlier check)
        check_compressor(aggregator)


def test_check_compressor_bad_input_names_the_field():
    with pytest.raises(ValueError, match="factory_or_name"):
        check_compressor(42)
    with pytest.raises(ValueError, match="did you mean 'powersgd'"):
        check_compressor("powersdg")
    with pytest.raises(ValueError, match="checks"):
        check_compressor("identity", checks=["everything"])
