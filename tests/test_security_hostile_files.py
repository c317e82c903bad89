"""Hostile and corrupt checkpoint files: every entry point that loads one (``sim.run(resume_from=)``,
``sim.run_distributed(resume_from=)``, ``python -m sim.launch --resume-from``, ``HookState.load_state_dict``,
``compressors.PowerSGD.load_state_dict``) refuses it with a ValueError naming what is wrong, and runs nothing
named in it: each crafted payload would create a marker file if executed, and the marker never appears.

Payloads carry a valid checksum (an attacker can recompute it) unless the test is about the checksum."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import compressors
import sim
from compressors.serialization import LEGACY_TAG, RECORD, digest
from reference import CHECKPOINTED as EXPERIMENT  # its written/copy fixtures: tests/conftest.py
from sim import checkpoint
from sim.checkpoint_schema import KEYS, body_of

ROOT = Path(__file__).resolve().parents[1]


def _payloads(marker: Path) -> dict[str, dict]:
    """Type tags that would run a command (creating ``marker``) if a loader imported and called them."""
    command = ["touch", str(marker)]
    return {
        "subprocess.run via sim.workflow.store": {"name": "sim.workflow.store:subprocess.run", "fields": {"args": command}},
        "os.system": {"name": "os:system", "fields": {"command": f"touch {marker}"}},
        "builtins.eval": {"name": "builtins:eval", "fields": {"source": f"open({str(marker)!r}, 'w')"}},
        "dotted through an import": {"name": "compressors.ddp.hook:importlib.import_module.__globals__",
                                     "fields": {"name": "os"}},
        "plain dotted name": {"name": "subprocess.run", "fields": {"args": command}},
        "registered name, extra field": {"name": "SGDState", "fields": {"momentum": {}, "args": command}},
    }


def _tagged(tag: str, payload: dict) -> dict:
    return {tag: payload["name"], "fields": payload["fields"]}


PAYLOADS = list(_payloads(Path("m")))
TAGS = [RECORD, LEGACY_TAG]


def _rewrite(path: Path, mutate, reseal: bool = True) -> None:
    """Load the file, apply ``mutate(payload)``, recompute the checksum (unless ``reseal=False``), save."""
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    if reseal and isinstance(payload, dict) and all(k in payload for k in KEYS):
        try:
            payload["checksum"] = digest(body_of(payload))
        except ValueError:  # digest refuses the payload itself (deep nesting, a non-string key): so will loading
            pass
    torch.save(payload, path)


def _newest(directory: Path) -> Path:
    return checkpoint.latest(directory)


# -- crafted type names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("where", ["state.aggregator", "experiment", "rows"])
def test_crafted_type_names_run_nothing_on_sim_run(copy, tmp_path, kind, tag, where):
    marker = tmp_path / "pwned"
    crafted = _tagged(tag, _payloads(marker)[kind])

    def plant(payload):
        if where == "state.aggregator":
            payload["state"]["fields"]["aggregator"] = crafted
        elif where == "experiment":
            payload["experiment"]["compressor"] = crafted
        else:
            payload["rows"].append(crafted)
    _rewrite(_newest(copy), plant)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-000000006\.pt.*(record|older version|"
                                         r"another configuration|rows)"):
        sim.run(EXPERIMENT, resume_from=_newest(copy))
    assert not marker.exists()


def test_the_exact_reported_payload_is_refused_naming_its_place(copy, tmp_path):
    marker = tmp_path / "pwned"
    _rewrite(_newest(copy), lambda p: p["state"]["fields"].__setitem__(
        "aggregator", {LEGACY_TAG: "sim.workflow.store:subprocess.run", "fields": {"args": ["touch", str(marker)]}}))
    with pytest.raises(ValueError, match=r"state at \$\.state\.aggregator: a '__namedtuple__' type tag is invalid"):
        sim.run(EXPERIMENT, resume_from=_newest(copy))
    assert not marker.exists()


def test_a_directory_whose_every_file_is_hostile_is_refused_listing_each(copy, tmp_path):
    marker = tmp_path / "pwned"
    for _, path in checkpoint.checkpoints(copy, range(2), 2):
        _rewrite(path, lambda p: p["state"]["fields"].__setitem__(
            "aggregator", _tagged(RECORD, _payloads(marker)["os.system"])))
    with pytest.raises(ValueError, match=r"found none; .*000000006.*'os:system' is invalid.*000000004.*os:system"):
        sim.run(EXPERIMENT, resume_from=copy)
    assert not marker.exists()


# -- structure: nesting, shapes, dtypes, keys, step, rows, ledger ---------------------------------------------
def _deep(levels: int):
    value = torch.zeros(1)
    for _ in range(levels):
        value = [value]
    return value


def _set_state_field(field, value):
    return lambda p: p["state"]["fields"].__setitem__(field, value)


def _set_param(tensor):
    return lambda p: p["state"]["fields"]["params"].__setitem__("weight", tensor)


CORRUPTIONS = {
    "deep nesting": (_set_state_field("buffers", {"x": _deep(200)}), "nested deeper than 32"),
    "wrong shape": (_set_param(torch.zeros(3, 3)), r"\$\.state\.params\.weight: .*shape \(3, 3\).*allowed"),
    "wrong dtype": (_set_param(torch.zeros(10, 12, dtype=torch.float64)), r"params\.weight: .*float64.*float32"),
    "NaN parameter": (_set_param(torch.full((10, 12), float("nan"))), r"params\.weight holds NaN"),
    "missing param": (lambda p: p["state"]["fields"]["params"].pop("weight"), r"missing keys \['weight'\]"),
    "extra state key": (_set_state_field("params", {"weight": torch.zeros(10, 12), "evil": torch.zeros(1)}),
                        r"unexpected keys \['evil'\]"),
    "tensor for an int": (_set_state_field("bits", torch.zeros(1)), r"\$\.state\.bits: .*tensor.*allowed: a int"),
    "state of another record": (_set_state_field("optimizer", {RECORD: "SketchState", "fields": {"rng": torch.zeros(1)}}),
                                r"\$\.state\.optimizer: a record 'SketchState' is invalid"),
    "step past the end": (lambda p: p.__setitem__("step", 999), r"step=999 is invalid; allowed: an integer in \[0, 6\]"),
    "negative step": (lambda p: p.__setitem__("step", -1), r"step=-1 is invalid"),
    "step differs from state": (lambda p: p.__setitem__("step", 5), r"state\.step=6 differs from step=5"),
    "a row dropped": (lambda p: p["rows"].pop(2), r"rows hold steps \[1, 2, 4, 5, 6\]; allowed: .*\[1, 2, 3, 4, 5, 6\]"),
    "the last row dropped": (lambda p: p["rows"].pop(), r"rows hold steps \[1, 2, 3, 4, 5\]; allowed"),
    "a row added": (lambda p: p["rows"].append({"step": 7}), r"rows hold steps \[1, 2, 3, 4, 5, 6, 7\]; allowed"),
    "a row of text": (lambda p: p["rows"][0].__setitem__("train_loss", "low"), r"rows\[0\]\.train_loss='low'"),
    "skipped > steps": (_set_state_field("skipped_steps", 7), r"skipped_steps=7 is invalid"),
    "negative ledger": (lambda p: p["ledger"].__setitem__("calls", -3), r"ledger\.calls=-3 is invalid"),
    "ledger of text": (lambda p: p.__setitem__("ledger", "many"), r"ledger is invalid"),
    "missing key": (lambda p: p.pop("ledger"), r"missing keys \['ledger'\]"),
    "unexpected key": (lambda p: p.__setitem__("hook", 1), r"unexpected keys \['hook'\]"),
    "other local workers": (lambda p: p.__setitem__("local_workers", [0, 1]), r"local workers range\(0, 1\)"),
    "another configuration": (lambda p: p["experiment"].__setitem__("lr", 0.5),
                              r"differing fields: lr \(lr: checkpoint 0\.5, experiment 0\.1\)"),
    "old format version": (lambda p: p.__setitem__("format_version", 1), r"format_version=1 is invalid"),
    "non-string key": (lambda p: p["state"]["fields"]["params"].__setitem__(3, torch.zeros(1)),
                       r"dict keys \[3\] are invalid"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_structure_is_refused_naming_it(copy, corruption):
    mutate, message = CORRUPTIONS[corruption]
    _rewrite(_newest(copy), mutate)
    with pytest.raises(ValueError, match=message):
        sim.run(EXPERIMENT, resume_from=_newest(copy))


def test_a_non_dict_top_level_is_refused(copy):
    torch.save([1, 2, 3], _newest(copy))
    with pytest.raises(ValueError, match="a list at the top level is invalid; allowed: a dict"):
        sim.run(EXPERIMENT, resume_from=_newest(copy))


# -- integrity: flipped bits and truncation ---------------------------------------------------------------------
def test_a_changed_value_without_a_new_checksum_is_caught(copy):
    def nudge(payload):
        weight = payload["state"]["fields"]["params"]["weight"]
        weight.view(torch.int32)[0, 0] ^= 1  # one bit of one parameter
    _rewrite(_newest(copy), nudge, reseal=False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        sim.run(EXPERIMENT, resume_from=_newest(copy))


def test_a_flipped_bit_anywhere_in_the_file_is_refused_or_changes_nothing(copy):
    """Some bytes of a torch zip file carry no content (alignment padding, timestamps): a flip there loads the
    very same checkpoint. Every other flip is refused. Flips at 40 spread positions, including tensor data."""
    path = _newest(copy)
    original = path.read_bytes()
    expected = digest(body_of(torch.load(path, weights_only=True)))
    refused = 0
    for i in range(40):
        data = bytearray(original)
        data[(len(data) * i) // 40 + 7] ^= 0x10
        path.write_bytes(bytes(data))
        try:
            loaded = checkpoint.load(path, EXPERIMENT)
        except ValueError as error:
            assert any(word in str(error) for word in ("checksum mismatch", "unreadable", "invalid")), error
            refused += 1
            continue
        payload = torch.load(path, weights_only=True)
        assert digest(body_of(payload)) == expected and loaded.step == 6
    assert refused >= 20  # most of the file is content


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_a_truncated_file_is_refused(copy, keep):
    path = _newest(copy)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else -1])
    with pytest.raises(ValueError, match="unreadable"):
        sim.run(EXPERIMENT, resume_from=path)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_valid_one(copy):
    newest = _newest(copy)
    newest.write_bytes(newest.read_bytes()[:-50])
    with pytest.warns(UserWarning, match=r"resuming from .*checkpoint-000000004\.pt.*step 4.*skipped checkpoint "
                                         r".*checkpoint-000000006\.pt.* is unreadable"):
        resumed = sim.run(EXPERIMENT, resume_from=copy)
    pd.testing.assert_frame_equal(resumed.history, sim.run(EXPERIMENT).history, check_exact=True)


# -- the directory: one configuration, writable, no stale temporary files -----------------------------------------
def test_a_directory_of_another_configuration_is_refused_before_any_work(copy):
    steps = []
    other = EXPERIMENT.replace(lr=0.2, seed=2)
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(ValueError, match=r"checkpoint_dir=.* belongs to another one; differing fields: lr, seed"):
        sim.run(other, checkpoint_dir=copy, checkpoint_every=2, on_step=lambda s, state: steps.append(state.step))
    assert steps == [] and sorted(p.name for p in copy.iterdir()) == before  # nothing ran, nothing pruned
    with pytest.raises(ValueError, match=r"resume_from=.* belongs to another one; differing fields: lr, seed"):
        sim.run(other, resume_from=copy)


def test_a_corrupt_manifest_or_foreign_checkpoints_are_refused(copy, tmp_path):
    (copy / checkpoint.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest .* is invalid"):
        sim.run(EXPERIMENT, checkpoint_dir=copy, checkpoint_every=2)
    (copy / checkpoint.MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"holds \['checkpoint-.*'\] but no experiment\.json"):
        sim.run(EXPERIMENT, checkpoint_dir=copy, checkpoint_every=2)


def test_an_unwritable_checkpoint_dir_is_refused_before_the_first_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    steps = []
    with pytest.raises(ValueError, match=r"checkpoint_dir=.*a-file/ckpt.* is invalid; allowed: a writable directory"):
        sim.run(EXPERIMENT, checkpoint_dir=blocker / "ckpt", checkpoint_every=2,
                on_step=lambda s, state: steps.append(state.step))
    assert steps == []


def test_stale_temporary_files_of_killed_writes_are_removed(tmp_path):
    stale = tmp_path / ".checkpoint-000000002.pt.4242.tmp"
    others = [tmp_path / ".checkpoint-000000002-w0-1.pt.4242.tmp",  # another process's workers: not ours
              tmp_path / ".notes.tmp", tmp_path / "checkpoint-notes.tmp"]  # not our pattern
    for path in [stale, *others]:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 60, time.time() - 60))
    sim.run(EXPERIMENT, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert not stale.exists() and all(p.exists() for p in others)


# -- the other entry points ----------------------------------------------------------------------------------------
DISTRIBUTED = EXPERIMENT  # 2 workers: 1 per process with nproc=2


def _distributed_dir(directory: Path, mutate_rank0) -> Path:
    """Valid per-process checkpoints (step 3) of both processes, then ``mutate_rank0`` on process 0's file."""
    rows = [{"step": s} for s in range(1, 4)]
    for rank in range(2):
        local = range(rank, rank + 1)
        state = sim.Simulation(DISTRIBUTED, local_workers=local).initial_state()._replace(step=3)
        path = checkpoint.save(directory, DISTRIBUTED, state, rows, local_workers=local)
        if rank == 0:
            _rewrite(path, mutate_rank0)
    return directory


@pytest.mark.parametrize("kind", ["subprocess.run via sim.workflow.store", "os.system", "registered name, extra field"])
def test_run_distributed_refuses_hostile_files_before_spawning(tmp_path, kind):
    marker = tmp_path / "pwned"
    directory = _distributed_dir(tmp_path / "ckpt", lambda p: p["state"]["fields"].__setitem__(
        "aggregator", _tagged(RECORD, _payloads(marker)[kind])))
    with pytest.raises(ValueError, match=r"every process holds a valid checkpoint.*\[\[\], \[3\]\].*-w0-1\.pt.*"
                                         r"(record type|unexpected fields)"):
        sim.run_distributed(DISTRIBUTED, nproc=2, resume_from=directory, timeout=60)
    assert not marker.exists()


def test_the_per_process_vote_counts_only_valid_files(tmp_path):
    """What each spawned process runs first on resume: its valid steps (here checked in this process)."""
    directory = _distributed_dir(tmp_path / "ckpt", lambda p: p.__setitem__("step", 99))
    with pytest.warns(UserWarning, match="step=99 is invalid"):
        assert checkpoint.valid_checkpoints(directory, DISTRIBUTED, range(0, 1)) == []
    assert [s for s, _, _ in checkpoint.valid_checkpoints(directory, DISTRIBUTED, range(1, 2))] == [3]


def test_launch_command_line_refuses_a_hostile_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    directory = _distributed_dir(tmp_path / "ckpt", lambda p: p["state"]["fields"].__setitem__(
        "aggregator", {LEGACY_TAG: "sim.workflow.store:subprocess.run", "fields": {"args": ["touch", str(marker)]}}))
    spec = json.dumps({k: getattr(DISTRIBUTED, k) for k in ("task", "task_options", "workers", "steps",
                                                              "batch_size", "eval_every", "compressor", "seed")})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "sim.launch", "--experiment", spec, "--nproc", "2",
                           "--resume-from", str(directory)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert done.returncode == 2  # the command line's bad-input status: one line, no traceback
    assert "__namedtuple__" in done.stderr and "older version" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def _hook_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, model=model)
    names = ("0.weight", "0.bias", "1.weight", "1.bias")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state.buckets[names] = {"shapes": tuple(shapes[n] for n in names), "params": None,
                            "state": state.aggregator.init({n: shapes[n] for n in names}, workers=1, seed=0)}
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    return model, torch.load(buffer, weights_only=True)


def _reseal(saved):
    try:
        saved["checksum"] = digest({k: saved[k] for k in ("format_version", "seed", "calls", "steps", "buckets")})
    except ValueError:  # digest refuses the payload itself: so will loading
        pass
    return saved


def test_hook_state_round_trips():
    model, saved = _hook_state_dict()
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, model=model)
    state.load_state_dict(saved)
    assert list(state.buckets) == [("0.weight", "0.bias", "1.weight", "1.bias")]
    assert digest(state.state_dict()) == digest(saved)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_hook_load_state_dict_runs_nothing(tmp_path, kind, tag):
    marker = tmp_path / "pwned"
    model, saved = _hook_state_dict()
    saved["buckets"][0]["state"]["fields"]["compressed"] = _tagged(tag, _payloads(marker)[kind])
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, model=model)
    with pytest.raises(ValueError, match=r"HookState\.load_state_dict: state at buckets\[0\]\.state\.compressed"):
        state.load_state_dict(_reseal(saved))
    assert not marker.exists() and state.buckets == {}  # nothing changed


def _first_float_tensor(tree):
    if isinstance(tree, torch.Tensor) and tree.is_floating_point() and tree.numel():
        return tree
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return next((t for t in map(_first_float_tensor, children) if t is not None), None)


HOOK_CORRUPTIONS = {
    "no checksum (older state dict)": (lambda s: s.pop("checksum"), r"keys .* are invalid", False),
    "flipped bit": (lambda s: _first_float_tensor(s).view(torch.int32).view(-1)[0].bitwise_xor_(1),
                    "checksum mismatch", False),
    "not a dict": (lambda s: None, "a list is invalid", False),
    "wrong shape": (lambda s: s["buckets"][0].__setitem__("shapes", [[4, 6], [4], [3, 4], [3]]),
                    r"buckets\[0\]\.state.*shape", True),
    "bucket key of ints": (lambda s: s["buckets"][0].__setitem__("key", 0), r"buckets\[0\]\.key=0 is invalid", True),
    "negative calls": (lambda s: s.__setitem__("calls", -1), r"calls=-1 is invalid", True),
    "deep nesting": (lambda s: s["buckets"][0].__setitem__("state", _deep(100)), "nested deeper", True),
    "duplicate bucket": (lambda s: s["buckets"].append(s["buckets"][0]), "a key not used before", True),
}


@pytest.mark.parametrize("corruption", list(HOOK_CORRUPTIONS))
def test_hook_load_state_dict_refuses_corrupt_state(corruption):
    mutate, message, reseal = HOOK_CORRUPTIONS[corruption]
    model, saved = _hook_state_dict()
    mutate(saved)
    if corruption == "not a dict":
        saved = [saved]
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, model=model)
    with pytest.raises(ValueError, match=r"HookState\.load_state_dict: .*" + message):
        state.load_state_dict(_reseal(saved) if reseal else saved)


def test_package_api_load_state_dict_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    powersgd = compressors.PowerSGD(params, config=compressors.Config(rank=1))
    with pytest.raises(ValueError, match="record type 'os:system' is invalid"):
        powersgd.load_state_dict({"state": _tagged(RECORD, _payloads(marker)["os.system"])})
    assert not marker.exists()


def test_no_warning_on_a_clean_resume(copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sim.run(EXPERIMENT, resume_from=copy)


def test_a_run_continued_from_a_given_state_writes_resumable_checkpoints(tmp_path):
    """Its rows start after the given state's step: a suffix of the logged steps, accepted."""
    simulation = sim.Simulation(EXPERIMENT)
    state = simulation.initial_state()
    for _ in range(2):
        state, _ = simulation.step(state)
    continued = sim.run(EXPERIMENT, state=state, checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed = sim.run(EXPERIMENT, resume_from=tmp_path)
    pd.testing.assert_frame_equal(resumed.history, continued.history, check_exact=True)
    assert resumed.history.step.tolist() == [3, 4, 5, 6]


def test_rows_that_could_not_be_loaded_are_never_written(tmp_path):
    import numpy as np

    state = sim.Simulation(EXPERIMENT).initial_state()._replace(step=1)
    with pytest.raises(ValueError, match=r"rows\[0\]\.train_loss=.* is invalid; allowed: a number"):
        checkpoint.save(tmp_path, EXPERIMENT, state, [{"step": 1, "train_loss": np.float64(0.5)}])
    assert not list(tmp_path.glob("checkpoint-*"))


def test_hook_state_keyed_by_bucket_index_round_trips_and_must_match_the_hook():
    state, _ = compressors.ddp_comm_hook("topk", ratio=0.5)  # no model=: buckets keyed by index
    shapes = ((4, 3), (3,))
    state.buckets[0] = {"shapes": shapes, "params": None,
                        "state": state.aggregator.init({"0": shapes[0], "1": shapes[1]}, workers=1, seed=0)}
    saved = state.state_dict()
    fresh, _ = compressors.ddp_comm_hook("topk", ratio=0.5)
    fresh.load_state_dict(saved)
    assert list(fresh.buckets) == [0] and fresh.buckets[0]["shapes"] == shapes
    named, _ = compressors.ddp_comm_hook("topk", ratio=0.5, model=torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"buckets\[0\]\.key=0 is invalid; allowed: a non-empty list of distinct "
                                         r"parameter names \(the hook was built with model=\)"):
        named.load_state_dict(saved)
    other, _ = compressors.ddp_comm_hook("powersgd", rank=1)  # another aggregator: another state structure
    with pytest.raises(ValueError, match=r"buckets\[0\]\.state"):
        other.load_state_dict(saved)


def test_run_distributed_refuses_another_configurations_directory_before_spawning(copy):
    other = DISTRIBUTED.replace(lr=0.3)
    with pytest.raises(ValueError, match=r"checkpoint_dir=.* belongs to another one; differing fields: lr"):
        sim.run_distributed(other, nproc=2, checkpoint_dir=copy, checkpoint_every=2, timeout=60)
