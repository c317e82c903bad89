"""A run lives on its device, proven without an accelerator: ``meta`` stands for it (compressors.placement).

Every registered compressor with every error-feedback mode it accepts, a rank schedule and adaptive rank, on an
MLP, a CNN and an LSTM task, runs a few steps with ``device="meta"`` inside ``PlacementCheck``: no operation may
mix a device tensor with a CPU array, the host may read the device at most ``SYNCS_PER_STEP`` times per step, and
the only per-step upload is the batch's sample indices. The check itself is shown to catch a compressor state
left on the CPU.
"""
import inspect

import pytest
import torch

import compressors
import sim
from compressors.error_feedback import ERROR_FEEDBACK_MODES
from compressors.placement import PlacementCheck

#: Host reads per training step outside evaluation: the train loss with the gradients' finiteness probes, then
#: every probe and metric of the step's result (sim/simulation.py, Simulation.step).
SYNCS_PER_STEP = 2
#: Adaptive rank reads its norms once more at the end of each interval: its decision changes tensor shapes,
#: so the host must know it (the test's interval is 1 step: every step).
RULE_SYNCS = 1
STEPS = 2
WORKERS, BATCH = 2, 4
TASKS = {"mlp": "digits-mlp", "cnn": "digits-cnn", "lstm": "charlm-lstm"}
RANKED = {"schedule": {"name": "powersgd", "rank_schedule": [[0, 1], [1, 2]]},
          "adaptive": {"name": "powersgd", "adaptive": {"rule": "accordion", "low_rank": 1, "high_rank": 2,
                                                        "interval": 1, "threshold": 0.5}}}


def feedback_modes(name: str) -> list[str]:
    """The error-feedback modes compressor ``name`` accepts (none for one without the option)."""
    if "error_feedback" not in inspect.signature(compressors.REGISTRY[name]).parameters:
        return [None]
    accepted = []
    for mode in ERROR_FEEDBACK_MODES:
        try:
            compressors.make(name, error_feedback=mode)
        except ValueError:
            continue
        accepted.append(mode)
    return accepted


def compressor_cases():
    cases = []
    for name in sorted(compressors.REGISTRY):
        for mode in feedback_modes(name):
            spec = {"name": name} if mode is None else {"name": name, "error_feedback": mode}
            cases.append(pytest.param("mlp", spec, id=f"mlp-{name}-{mode}"))
        for task in ("cnn", "lstm"):
            cases.append(pytest.param(task, {"name": name}, id=f"{task}-{name}"))
    for label, spec in RANKED.items():
        for task in TASKS:
            cases.append(pytest.param(task, spec, id=f"{task}-powersgd-{label}"))
    return cases


def experiment(task: str, spec: dict, device: str = "meta", **fields) -> sim.Experiment:
    options = {"hidden": 16, "embedding": 8, "seq_len": 4, "corpus_bytes": 1 << 15} if task == "lstm" else {}
    return sim.Experiment(task=TASKS[task], workers=WORKERS, batch_size=BATCH, steps=STEPS, seed=1, eval_every=0,
                          compressor=spec, device=device, task_options=options, **fields)


def run_checked(e: sim.Experiment, check: PlacementCheck, init=None):
    """Build the run and take its steps inside ``check``; per-step (syncs, uploaded elements) and the state."""
    with check:
        simulation = sim.Simulation(e)
        if init is not None:
            simulation.aggregator.init = init(simulation.aggregator.init)
        state = simulation.initial_state()
        per_step = []
        for _ in range(e.steps):
            syncs, uploaded = check.syncs, check.uploaded
            state, _ = simulation.step(state)
            per_step.append((check.syncs - syncs, check.uploaded - uploaded))
        simulation.evaluate(state)
    return per_step, state


def test_cases_cover_every_compressor_and_feedback_mode():
    ids = [c.id for c in compressor_cases()]
    assert {i.split("-")[1] for i in ids if i.startswith("mlp-")} == set(compressors.REGISTRY)
    assert {i.rsplit("-", 1)[1] for i in ids if i.startswith("mlp-powersgd-")} >= {"none", "local", "averaged"}
    assert len([i for i in ids if i.startswith("mlp-")]) > 2 * len(compressors.REGISTRY)


@pytest.mark.parametrize("task, spec", compressor_cases())
def test_a_meta_run_keeps_everything_on_the_device(task, spec):
    check = PlacementCheck("meta")
    per_step, state = run_checked(experiment(task, spec), check)
    assert check.mixed == [], check.mixed
    bound = SYNCS_PER_STEP + (RULE_SYNCS if "adaptive" in spec else 0)
    assert all(syncs <= bound for syncs, _ in per_step), (per_step, check.sync_sites)
    # nothing gradient-sized is copied onto the device each step (QSGD's W x d uniforms once were): the batch's
    # indices, and factor-sized draws (a sketch, PowerSGD's fresh columns when the rank grows)
    small = WORKERS * BATCH + sum(p.numel() for p in state.params.values()) // 4
    assert all(uploaded <= small for _, uploaded in per_step), (per_step, check.upload_sites)
    for name, p in state.params.items():
        assert p.device.type == "meta", name
    for _, t in compressors.state_tree.float_leaves(state.aggregator):
        assert t.device.type == "meta"


def test_the_check_catches_a_compressor_state_left_on_the_cpu():
    """Dropping ``device=`` from ``aggregator.init`` (the state then starts on the CPU) is found."""
    def without_device(init):
        def wrapped(shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):
            return init(shapes, workers, seed, dtype=dtype)
        return wrapped

    for spec in ({"name": "powersgd", "rank": 2}, {"name": "topk", "error_feedback": "local"}):
        check = PlacementCheck("meta")
        run_checked(experiment("mlp", spec), check, init=without_device)
        assert check.mixed, spec
        assert any("compressors/" in site for site in check.mixed), check.mixed


def test_host_reads_of_real_cpu_runs_are_within_the_bound():
    """The same count on the CPU with real values (what a CUDA run pays): the bound holds, evaluation aside."""
    for task, spec in [("mlp", {"name": "powersgd", "rank": 2}), ("cnn", {"name": "topk"}),
                       ("mlp", {"name": "qsgd", "error_feedback": "local"})]:
        check = PlacementCheck("cpu")
        per_step, _ = run_checked(experiment(task, spec, device="cpu"), check)
        assert [s for s, _ in per_step] == [SYNCS_PER_STEP] * STEPS, (task, spec, check.sync_sites)
        assert check.mixed == []


def test_the_check_records_mixing_and_answers_host_reads_with_zeros():
    x = torch.ones(3, device="meta")
    with PlacementCheck() as check:
        y = x + torch.ones(3)  # a CPU array mixed in: recorded, then carried on on the device
        z = x + torch.tensor(2.0)  # a 0-d CPU tensor mixes legally
        value, flag, values = float(x.sum()), bool(x.any()), x.tolist()
        moved = torch.arange(5).to("meta")
    assert (y.device.type, z.device.type) == ("meta", "meta")
    assert len(check.mixed) == 1 and "test_placement.py" in check.mixed[0]
    assert (value, flag, values) == (0.0, False, [0.0, 0.0, 0.0])
    assert check.syncs == 3 and check.uploaded == 5 and moved.device.type == "meta"
