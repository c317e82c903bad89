"""Experiment(device=..., autocast=...): validation, the CPU default unchanged bitwise, resuming onto a device,
bf16 autocast on the CPU, the CLI and config key, and a model build that leaves accelerator generators alone."""
import hashlib
import json

import pytest
import torch

import compressors
import sim
from compressors.placement import PlacementCheck
from compressors.state_tree import float_leaves, tensor_leaves
from sim.cli.runs import add_run
from sim.models import build
from sim.workflow.config import from_mapping

# Final parameters (sha256 of their bytes) and last metrics of 4-step runs, computed by the code as it stood
# before runs had a device (commit 0c5423c): device="cpu" must reproduce them bitwise. QSGD and random-k are
# here because their draws moved to the gradient's device: on the CPU they still come from the same generators.
BEFORE = {
    "powersgd": ({"name": "powersgd", "rank": 2}, "digits-mlp",
                 ["fa06160023eee5d9", 2.3108506202697754, 0.8465331131357439, 2.3015968799591064]),
    "powersgd_adaptive": ({"name": "powersgd", "adaptive": {"rule": "accordion", "low_rank": 1, "high_rank": 3,
                                                            "interval": 2, "threshold": 0.5}}, "digits-mlp",
                          ["1f2026f12d258f17", 2.3093113899230957, 0.8158189090088499, 2.2987563610076904]),
    "qsgd": ({"name": "qsgd"}, "digits-mlp",
             ["99575b5feb9067c2", 2.3054003715515137, 0.8336885873257442, 2.2931885719299316]),
    "randomk": ({"name": "randomk"}, "digits-mlp",
                ["da27339200a6e28a", 2.317574977874756, 0.9177828432665076, 2.31164813041687]),
    "identity_cnn": ({"name": "identity"}, "digits-cnn",
                     ["b9c903cc4cc9f92a", 1.5320708751678467, 0.0, 2.1180379390716553]),
}


def fingerprint(params) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_the_cpu_default_reproduces_earlier_runs_bitwise(case):
    spec, task, expected = BEFORE[case]
    result = sim.run(sim.Experiment(task=task, workers=4, steps=4, seed=1, eval_every=0, compressor=spec))
    last = result.history.iloc[-1]
    assert [fingerprint(result.params), float(last["train_loss"]), float(last["compression_error"]),
            float(last["test_loss"])] == expected


def test_device_and_autocast_are_validated_naming_the_field():
    for fields, words in [({"device": "gpu0"}, "device='gpu0' is invalid"), ({"device": 0}, "device=0 is invalid"),
                          ({"autocast": "float16"}, "autocast='float16' is invalid; allowed: one of None, 'bfloat16'"),
                          ({"autocast": "bfloat16", "dtype": "float64"}, "autocast='bfloat16' is invalid")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            sim.Experiment(**fields)
    assert sim.Experiment().device == "cpu" and sim.Experiment().autocast is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is invalid on this machine"):
            sim.Simulation(sim.Experiment(device="cuda"))


def test_device_is_a_config_key_and_a_command_line_option(tmp_path):
    config = from_mapping({"task": "digits-mlp", "device": "meta", "autocast": "bfloat16"}, source="test")
    assert (config.experiment.device, config.experiment.autocast) == ("meta", "bfloat16")
    import argparse
    parser = argparse.ArgumentParser()
    add_run(parser)
    assert parser.parse_args(["x.toml", "--device", "cuda:1"]).device == "cuda:1"
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"task": "digits-mlp", "steps": 1}))
    from sim.cli.launch import load_experiment
    assert load_experiment(str(path), {"device": "meta"}).device == "meta"


def test_a_checkpoint_resumes_onto_the_runs_device_with_generator_states_on_the_cpu(tmp_path):
    spec = {"name": "randomk", "error_feedback": "local"}
    cpu = sim.Experiment(task="digits-mlp", workers=2, steps=4, seed=0, eval_every=0, compressor=spec)
    sim.run(cpu.replace(steps=4), checkpoint_dir=tmp_path, checkpoint_every=2)
    meta = cpu.replace(device="meta")
    with PlacementCheck() as check:
        result = sim.run(meta, resume_from=tmp_path / "checkpoint-000000002.pt")
    assert check.mixed == []
    state = result.extras["final_state"]
    assert state.step == 4
    assert all(p.device.type == "meta" for p in state.params.values())
    assert all(t.device.type == "meta" for _, t in float_leaves(state.aggregator))
    generators = [t for t in tensor_leaves(state.aggregator) if t.dtype == torch.uint8]
    assert generators and all(t.device.type == "cpu" for t in generators)



def test_bf16_autocast_keeps_state_float32_and_compressors_see_float32_gradients():
    spec = {"name": "powersgd", "rank": 2, "error_feedback": "local"}
    results, seen = {}, {}
    for autocast in (None, "bfloat16"):
        e = sim.Experiment(task="digits-cnn", workers=2, steps=3, batch_size=8, seed=0, eval_every=0,
                           compressor=spec, autocast=autocast)
        simulation = sim.Simulation(e)
        inner = simulation.aggregator.aggregate
        dtypes = seen[autocast] = set()

        def recording(grads, state, comm, inner=inner, dtypes=dtypes):
            dtypes.update(g.dtype for g in grads.values())
            return inner(grads, state, comm)

        simulation.aggregator.aggregate = recording
        results[autocast] = sim.run(e, simulation=simulation)
    assert seen == {None: {torch.float32}, "bfloat16": {torch.float32}}
    state = results["bfloat16"].extras["final_state"]
    assert {p.dtype for p in state.params.values()} == {torch.float32}
    assert {t.dtype for _, t in float_leaves(state.optimizer)} == {torch.float32}
    assert {t.dtype for _, t in float_leaves(state.aggregator)} == {torch.float32}
    assert compressors.state_tree.memory_tensors(state.aggregator)
    fp32, bf16 = (results[a].history["train_loss"].to_numpy() for a in (None, "bfloat16"))
    assert (fp32 != bf16).any()  # autocast is on: the forward pass ran in bfloat16
    assert abs(fp32 - bf16).max() < 0.05 * abs(fp32).max()  # and it is the same training, to bf16 rounding


def test_building_a_model_reseeds_only_the_cpu_generator(monkeypatch):
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    before = torch.random.get_rng_state()
    a = build(lambda: torch.nn.Linear(3, 2), seed=5)
    b = build(lambda: torch.nn.Linear(3, 2), seed=5)
    assert seeded == []  # torch.manual_seed would have reseeded every CUDA generator
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight)
