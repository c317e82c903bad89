"""The four training options together (lr_schedule, weight_decay_exclude, clip_grad_norm, validation_fraction):
against a torch training loop, resumed bitwise, from config files and --set, on real processes."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch.optim import lr_scheduler

import sim
from reference import assert_resume_is_bitwise, run_interrupted
from sim.checkpoint_schema import LATER_FIELDS, experiment_differences
from sim.cli.main import main
from sim.simulation import Simulation
from sim.workflow.config import apply_overrides, from_mapping, load_config, parse_assignment, read_mapping
from sim.workflow.store import RECORD, ResultsStore, run_id

OPTIONS = dict(lr_schedule="cosine", lr_warmup_steps=3, weight_decay=0.05, weight_decay_exclude=["*bias"],
               clip_grad_norm=0.5, validation_fraction=0.2)


def test_identity_with_w_workers_equals_a_torch_loop_with_every_option():
    """Identity aggregation of 4 workers' gradients == torch on the concatenated batch (the workers' mean
    gradient) with clip_grad_norm_, SGD with a no-decay parameter group, and SequentialLR(LinearLR,
    CosineAnnealingLR), trained on the same training part of the split."""
    e = sim.Experiment(task="digits-mlp", workers=4, steps=25, batch_size=8, lr=0.3, momentum=0.9,
                       task_options={"hidden": (32,)}, eval_every=0, dtype="float64", **OPTIONS)
    result = sim.run(e)
    assert (result.history["update_norm"] > e.clip_grad_norm).sum() >= 5  # clipping is active on many steps

    simulation = Simulation(e)
    model = simulation.task.model().to(torch.float64)
    model.load_state_dict(simulation.initial_state().params)
    named = dict(model.named_parameters())
    optimizer = torch.optim.SGD([
        {"params": [p for n, p in named.items() if not n.endswith("bias")], "weight_decay": e.weight_decay},
        {"params": [p for n, p in named.items() if n.endswith("bias")], "weight_decay": 0.0}],
        lr=e.lr, momentum=e.momentum, foreach=False)
    w = e.lr_warmup_steps
    schedule = lr_scheduler.SequentialLR(optimizer, [lr_scheduler.LinearLR(optimizer, 1 / w, 1.0, w - 1),
                                                     lr_scheduler.CosineAnnealingLR(optimizer, e.steps - w)], [w])
    for step in range(e.steps):
        indices = simulation.sampler.batch(range(e.workers), step).reshape(-1)  # the concatenated 4 x 8 batch
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(simulation.task.train_x[indices]),
                                          simulation.task.train_y[indices]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), e.clip_grad_norm)
        optimizer.step()
        schedule.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result.params[name], p.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, optimizer):
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (16,)}, workers=3, steps=12, batch_size=4,
                       eval_every=4, lr=0.05, optimizer=optimizer, compressor={"name": "powersgd", "rank": 1},
                       seed=1, **{**OPTIONS, "lr_schedule": "poly", "lr_poly_power": 2.0})
    full = sim.run(e)
    assert full.history["val_accuracy"].notna().sum() == 3
    run_interrupted(e, tmp_path / "ckpt", stop_at=6, every=5)
    manifest = json.loads((tmp_path / "ckpt" / "experiment.json").read_text())
    assert {k: manifest[k] for k in ("lr_schedule", "lr_poly_power", "weight_decay_exclude", "clip_grad_norm",
                                     "validation_fraction")} == {
        "lr_schedule": "poly", "lr_poly_power": 2.0, "weight_decay_exclude": ["*bias"], "clip_grad_norm": 0.5,
        "validation_fraction": 0.2}
    assert_resume_is_bitwise(e, full, tmp_path / "ckpt")


def test_a_checkpoint_refuses_a_run_with_other_option_values(tmp_path):
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (8,)}, workers=2, steps=4, batch_size=4,
                       eval_every=0, **OPTIONS)
    sim.run(e, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    with pytest.raises(ValueError, match="differing fields: validation_fraction"):
        sim.run(e.replace(validation_fraction=0.1), resume_from=tmp_path / "ckpt")


def test_a_file_written_before_these_fields_existed_means_their_defaults():
    """A stored experiment without the fields was run with their default behaviour: it matches the defaults
    and differs from any other value."""
    e = sim.Experiment(task="digits-mlp", steps=4)
    later = ("lr_schedule", "lr_poly_power", "weight_decay_exclude", "clip_grad_norm", "validation_fraction")
    saved = {k: v for k, v in e.to_dict().items() if k not in later}
    assert experiment_differences(saved, e) == ""
    assert "clip_grad_norm" in experiment_differences(saved, e.replace(clip_grad_norm=1.0))
    assert "lr_schedule" in experiment_differences(saved, e.replace(lr_schedule="cosine"))
    missing_task = {k: v for k, v in e.to_dict().items() if k != "task"}
    assert "task" in experiment_differences(missing_task, e)  # only fields added later default when absent


def test_a_results_store_keeps_the_ids_and_records_of_runs_stored_before_these_fields(tmp_path):
    e = sim.Experiment(task="synthetic-lowrank", workers=2, steps=2, batch_size=4,
                       task_options={"dim_in": 6, "dim_out": 4, "samples": 32, "test_samples": 8})
    store = ResultsStore(tmp_path)
    folder = store.write(e, sim.run(e))
    record = json.loads((folder / RECORD).read_text())
    assert record["config"]["lr_schedule"] == "step"  # the record holds every field...
    before = {k: v for k, v in record["config"].items() if k not in LATER_FIELDS}
    # ...but the id hashes the config as it was before the fields existed, so older folders are found again
    assert folder.name.endswith(hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12])
    (folder / RECORD).write_text(json.dumps({**record, "config": before}))  # a record written back then
    assert store.is_complete(e)
    assert len({run_id(e), run_id(e.replace(clip_grad_norm=1.0)), run_id(e.replace(validation_fraction=0.5)),
                run_id(e.replace(lr_schedule="cosine"))}) == 4


TOML = """
task = "synthetic-lowrank"
steps = 4
lr_schedule = "cosine"
lr_warmup_steps = 1
weight_decay_exclude = ["*bias", "*norm*"]
clip_grad_norm = 1
validation_fraction = 0.25
[task_options]
samples = 64
"""


def test_config_files_and_set_give_the_options(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(TOML)
    e = load_config(config).experiment
    assert (e.lr_schedule, e.weight_decay_exclude, e.clip_grad_norm, e.validation_fraction) == (
        "cosine", ("*bias", "*norm*"), 1, 0.25)
    data = read_mapping(config)  # what --set applies to
    sets = ["lr_schedule=poly", "lr_poly_power=0.5", 'weight_decay_exclude=["*.bias"]', "clip_grad_norm=none",
            "validation_fraction=0.1"]
    changed = from_mapping(apply_overrides(data, dict(parse_assignment(a, many=False) for a in sets))).experiment
    assert (changed.lr_schedule, changed.lr_poly_power, changed.weight_decay_exclude, changed.clip_grad_norm,
            changed.validation_fraction) == ("poly", 0.5, ("*.bias",), None, 0.1)
    for assignment, field in (("lr_milestones=[2]", "lr_milestones"), ("validation_fraction=1", "validation_fraction"),
                              ("weight_decay_exclude=*bias", "weight_decay_exclude")):
        with pytest.raises(ValueError, match=f"Experiment: {field}="):
            from_mapping(apply_overrides(data, dict([parse_assignment(assignment, many=False)])))


def test_the_command_line_refuses_a_bad_value_naming_the_field(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TOML)
    assert main(["run", str(config), "--set", "lr_schedule=cosinus", "--no-progress", "--out",
                 str(tmp_path / "out")]) == 2
    assert "lr_schedule='cosinus' is invalid" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_real_processes_equal_the_simulator_with_every_option():
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": (16,)}, workers=2, steps=10, batch_size=8,
                       lr=0.1, eval_every=5, compressor={"name": "powersgd", "rank": 2}, seed=0, **OPTIONS)
    real = sim.run_distributed(e, nproc=2, timeout=300)
    virtual = sim.run(e)
    assert (virtual.history["update_norm"] > e.clip_grad_norm).any()  # clipping is active
    # W = 2: every mean is (x0 + x1) / 2 on both sides and the sum commutes exactly
    for name, p in virtual.params.items():
        torch.testing.assert_close(real.params[name], p, rtol=1e-6, atol=1e-7)
    assert real.history["lr"].tolist() == virtual.history["lr"].tolist()
    assert real.history["update_norm"].tolist() == pytest.approx(virtual.history["update_norm"].tolist(), rel=1e-6)
    assert real.history["val_accuracy"].dropna().tolist() == virtual.history["val_accuracy"].dropna().tolist()
    assert real.history["val_loss"].dropna().tolist() == pytest.approx(
        virtual.history["val_loss"].dropna().tolist(), rel=1e-6)
