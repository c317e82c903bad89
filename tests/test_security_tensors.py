"""Every tensor read from a file is checked on its metadata before anything reads or copies it, and every number
in a loaded state is range-checked: a checkpoint or a DDP hook state holding an expanded (stride-0) tensor of
terabytes, a meta tensor, a tensor requiring gradients, an ``nn.Parameter``, NaN error-feedback memory, an
out-of-range counter, rank or seed, or a bucket declaring a huge shape is refused with a ValueError naming it,
allocating nothing for it; in a checkpoint directory the next older valid checkpoint is resumed instead."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch

import compressors
import sim
from reference import CHECKPOINTED as EXPERIMENT
from compressors.state_tree import iter_states
from compressors.serialization import check_tensor, check_values, digest, from_plain, to_plain
from sim import checkpoint
from sim.checkpoint_schema import body_of

TIB = 2**40



def _rewrite(path: Path, mutate) -> None:
    """Apply ``mutate(payload)`` and recompute the checksum where ``digest`` accepts the payload (an attacker
    can); ``digest`` refusing it is what loading does too."""
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    try:
        payload["checksum"] = digest(body_of(payload))
    except ValueError:
        pass
    torch.save(payload, path)


def _memory(payload) -> dict:
    return payload["state"]["fields"]["aggregator"]["fields"]["compressed"]["fields"]["memory"]


def _params(payload) -> dict:
    return payload["state"]["fields"]["params"]


HOSTILE = {
    # 2^40 float32 elements (4 TiB) viewing a single stored float: an 11 KB file
    "expanded to 4 TiB": (lambda p: _memory(p).__setitem__("weight", torch.zeros(1, 1, 1).expand(2**14, 2**13, 2**13)),
                          r"strides \(0, 0, 0\) \(expanded or overlapping\)"),
    "expanded to the right shape": (lambda p: _memory(p).__setitem__("weight", torch.zeros(1, 1, 1).expand(2, 10, 12)),
                                    r"expanded or overlapping"),
    "overlapping rows": (lambda p: _params(p).__setitem__("weight", torch.zeros(21).as_strided((10, 12), (1, 1))),
                         r"expanded or overlapping"),
    "meta tensor": (lambda p: _memory(p).__setitem__("weight", torch.zeros(2, 10, 12, device="meta")),
                    r"on device 'meta'"),
    "sparse tensor": (lambda p: _params(p).__setitem__("weight", torch.zeros(10, 12).to_sparse()),
                      r"sparse_coo tensor is invalid"),
    "requires_grad": (lambda p: _params(p).__setitem__("weight", torch.zeros(10, 12, requires_grad=True)),
                      r"requiring gradients is invalid"),
    "nn.Parameter": (lambda p: _params(p).__setitem__("weight", torch.nn.Parameter(torch.zeros(10, 12))),
                     r"a Parameter is invalid"),
    "NaN error-feedback memory": (lambda p: _memory(p)["weight"].__setitem__((0, 0, 0), float("nan")),
                                  r"memory\.weight: holds NaN/Inf"),
    "Inf warm-start factor": (
        lambda p: p["state"]["fields"]["aggregator"]["fields"]["compressed"]["fields"]["inner"]["fields"]["q"][
            "10x12"].__setitem__((0, 0, 0), float("inf")), r"q\.10x12: holds NaN/Inf"),
    "compressor step beyond the run": (
        lambda p: p["state"]["fields"]["aggregator"]["fields"]["compressed"]["fields"]["inner"]["fields"].__setitem__(
            "step", 10**6), r"inner\.step: 1000000 is invalid; allowed: a step count within the run"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_newest_checkpoint_is_skipped_for_the_older_valid_one(copy, case):
    mutate, message = HOSTILE[case]
    newest = checkpoint.latest(copy)
    _rewrite(newest, mutate)
    assert newest.stat().st_size < 64 * 1024
    with pytest.raises(ValueError, match=message):  # the file alone: refused, naming what is wrong
        checkpoint.load(newest, EXPERIMENT)
    with pytest.warns(UserWarning, match=message):  # the directory: the next older valid one is resumed
        resumed = checkpoint.load(copy, EXPERIMENT)
    assert resumed.step == 4
    uninterrupted = sim.run(EXPERIMENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = sim.run(EXPERIMENT, resume_from=copy)
    assert again.history.equals(uninterrupted.history)


def test_any_exception_while_reading_a_candidate_falls_back(copy, monkeypatch):
    real = checkpoint.validate

    def explode(payload, experiment, local, where):
        if "000000006" in where:
            raise RuntimeError("an unexpected failure inside a reader")
        return real(payload, experiment, local, where)
    monkeypatch.setattr(checkpoint, "validate", explode)
    with pytest.warns(UserWarning, match="RuntimeError: an unexpected failure"):
        assert checkpoint.load(copy, EXPERIMENT).step == 4


def test_check_tensor_reads_metadata_only():
    check_tensor(torch.zeros(3, 4))
    check_tensor(torch.zeros(4, 3).t())  # a transposed (column-major) factor: each element stored once
    check_tensor(torch.zeros(0, 5))
    big = torch.zeros(1).expand(TIB)
    with pytest.raises(ValueError, match="expanded or overlapping"):
        check_tensor(big)
    with pytest.raises(ValueError, match="expanded or overlapping"):
        digest({"x": big})  # the checksum never copies it


# -- DDP hook states -------------------------------------------------------------------------------------------
def _hook(**options):
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    state, _ = compressors.ddp_comm_hook("powersgd", rank=1, model=model, **options)
    return model, state


def _hook_saved(**options) -> dict:
    model, state = _hook(**options)
    names = ("0.bias", "0.weight")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state.buckets[names] = {"shapes": tuple(shapes[n] for n in names), "params": None,
                            "state": state.aggregator.init({n: shapes[n] for n in names}, workers=1, seed=0)}
    state.calls = state.steps = 3
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _reseal(saved: dict) -> dict:
    saved["checksum"] = digest({k: saved[k] for k in ("format_version", "seed", "calls", "steps", "buckets")})
    return saved


def test_a_hook_state_declaring_a_huge_bucket_is_refused_before_any_allocation():
    saved = _hook_saved()
    saved["buckets"][0]["shapes"] = [[4], [10**6, 10**6]]  # 10^12 elements: 4 TB of error-feedback memory
    _, state = _hook()
    with pytest.raises(ValueError, match=r"buckets\[0\]\.shapes declare 1000000000004 elements"):
        state.load_state_dict(_reseal(saved))
    saved["buckets"][0]["shapes"] = [[4], [40000, 40000]]  # within the cap: compared on the meta device
    with pytest.raises(ValueError, match=r"allowed: a torch.strided tensor of shape \(1, 40000, 40000\)"):
        state.load_state_dict(_reseal(saved))


def _inner(saved) -> dict:
    return saved["buckets"][0]["state"]["fields"]["inner"]["fields"]


HOOK_NUMBERS = {
    "warm-up step of -10^6": ({"start_compressing_after_num_steps": 2},
                              lambda s: s["buckets"][0]["state"]["fields"].__setitem__("step", -10**6),
                              r"state\.step: -1000000 is invalid; allowed: a step count within the run"),
    "seed beyond 64 bits": ({}, lambda s: s.__setitem__("seed", 2**70), r"seed=\d+ is invalid; allowed: an integer in"),
    "negative calls": ({}, lambda s: s.__setitem__("calls", -1), r"calls=-1 is invalid"),
    "NaN memory": ({}, lambda s: s["buckets"][0]["state"]["fields"]["compressed"]["fields"]["memory"][
        "0.weight"].__setitem__((0, 0, 0), float("nan")), r"memory\.0\.weight: holds NaN/Inf"),
    "expanded memory": ({}, lambda s: s["buckets"][0]["state"]["fields"]["compressed"]["fields"]["memory"]
                        .__setitem__("0.weight", torch.zeros(1, 1, 1).expand(1, 4, 5)), r"expanded or overlapping"),
    "requires_grad": ({}, lambda s: s["buckets"][0]["state"]["fields"]["compressed"]["fields"]["memory"]
                      .__setitem__("0.weight", torch.zeros(1, 4, 5, requires_grad=True)), r"requiring gradients"),
}


@pytest.mark.parametrize("case", list(HOOK_NUMBERS))
def test_hook_state_numbers_and_tensors_are_checked(case):
    options, mutate, message = HOOK_NUMBERS[case]
    saved = _hook_saved(**options)
    _, state = _hook(**options)
    state.load_state_dict(saved)  # the unaltered state loads
    mutate(saved)
    try:
        _reseal(saved)
    except ValueError:
        pass
    _, state = _hook(**options)
    with pytest.raises(ValueError, match=message):
        state.load_state_dict(saved)


def test_ranks_are_at_least_one_and_seeds_within_64_bits():
    shapes = {"w": (4, 5)}
    adaptive = compressors.make("powersgd", adaptive={"rule": "accordion-global", "low_rank": 1, "high_rank": 2,
                                                      "interval": 2, "threshold": 0.5})
    fresh = adaptive.init(shapes, workers=1, seed=0)
    check_values(from_plain(to_plain(fresh)), fresh, 0)
    with pytest.raises(ValueError, match=r"rank: -5 is invalid; allowed: a rank, in \[1, "):
        check_values(_replace_record(fresh, "AccordionState", rank=-5), fresh, 0)
    with pytest.raises(ValueError, match=r"decisions: 9 is invalid; allowed: a step count within the run"):
        check_values(_replace_record(fresh, "AccordionState", decisions=9), fresh, 5)
    per_layer = compressors.make("powersgd", adaptive={"rule": "accordion", "low_rank": 1, "high_rank": 2,
                                                       "interval": 2, "threshold": 0.5})
    fresh = per_layer.init({"w": (32, 24)}, workers=1, seed=0)  # big enough to be compressed: a rank per layer
    check_values(from_plain(to_plain(fresh)), fresh, 0)
    with pytest.raises(ValueError, match=r"ranks.w: -5 is invalid; allowed: a rank, in \[1, "):
        check_values(_replace_record(fresh, "AccordionLayersState", ranks={"w": -5}), fresh, 0)
    qsgd = compressors.make("qsgd")
    fresh = qsgd.init(shapes, workers=1, seed=0)
    assert any(type(s).__name__ == "PrivateRngState" for s in iter_states(fresh))
    check_values(_replace_record(fresh, "PrivateRngState", seed=2**64 - 1), fresh, 0)
    with pytest.raises(ValueError, match="a seed within 64 bits"):
        check_values(_replace_record(fresh, "PrivateRngState", seed=2**64), fresh, 0)



def _replace_record(tree, name, **changes):
    if hasattr(tree, "_fields"):
        if type(tree).__name__ == name:
            return tree._replace(**changes)
        return type(tree)(*(_replace_record(v, name, **changes) for v in tree))
    if isinstance(tree, dict):
        return {k: _replace_record(v, name, **changes) for k, v in tree.items()}
    return tree


def test_the_package_api_state_is_checked_against_its_own_structure():
    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    powersgd = compressors.PowerSGD(params, config=compressors.Config(rank=1, start_compressing_after_num_steps=0))
    buffer = io.BytesIO()
    torch.save(powersgd.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    powersgd.load_state_dict(saved)  # the round trip loads

    def memory(s):
        return s["state"]["fields"]["compressed"]["fields"]["memory"]
    before = powersgd.state
    wrong = {"state": saved["state"]}
    memory(wrong)["0"] = torch.zeros(1, 40, 30)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 3\)"):
        powersgd.load_state_dict(wrong)
    memory(wrong)["0"] = torch.full((1, 4, 3), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        powersgd.load_state_dict(wrong)
    assert powersgd.state is before  # nothing changed
