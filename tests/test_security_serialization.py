"""State records as plain data: every state type a compressor or the loop produces is registered, round trips
exactly through torch.save/torch.load(weights_only=True), and anything but registered records is refused."""
from __future__ import annotations

import dataclasses
import io
import itertools
from typing import NamedTuple

import pytest
import torch

import compressors
import sim
from compressors import serialization
from compressors.error_feedback import ERROR_FEEDBACK_MODES
from compressors.serialization import check_same_structure, digest, from_plain, register_record, registered_records, to_plain
from compressors.comm import VirtualCollective

SHAPES = {"conv": (4, 3, 2, 2), "fc": (6, 5), "bias": (5,), "scale": ()}
BASE = {"randomk": {"ratio": 0.5}, "random_block": {"ratio": 0.5}, "topk": {"ratio": 0.5}, "powersgd": {"rank": 2}}
VARIANTS = [{}, {"start_compressing_after_num_steps": 1}, {"min_compression_rate": 3.0},
            {"compress_vectors": True}, {"warm_start": False, "variant": "alternating"}]


def _configurations():
    """(name, options) of every registered compressor with each error-feedback mode and policy it accepts."""
    for name in sorted(compressors.REGISTRY):
        accepted = compressors.options_of(name)
        modes = ERROR_FEEDBACK_MODES if "error_feedback" in accepted else [None]
        for mode, variant in itertools.product(modes, VARIANTS):
            options = {**BASE.get(name, {}), **{k: v for k, v in variant.items() if k in accepted}}
            if mode is not None:
                options["error_feedback"] = mode
            try:
                compressors.make(name, **options)
            except ValueError:  # a mode this compressor refuses (e.g. ef21 with a biased operator)
                continue
            yield name, options


CONFIGURATIONS = list({repr(c): c for c in _configurations()}.values())


def _records(tree):
    """Every NamedTuple or dataclass instance in a nested state."""
    if serialization.is_record(tree):
        yield tree
        values = tree if isinstance(tree, tuple) else [getattr(tree, f.name) for f in dataclasses.fields(tree)]
        for value in values:
            yield from _records(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _records(value)
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _records(value)


def _states(name, options, steps=3):
    """The initial state and the state after each of ``steps`` aggregations (2 workers, float32)."""
    aggregator = compressors.make(name, **options)
    generator = torch.Generator().manual_seed(0)
    state = aggregator.init(SHAPES, workers=2, seed=0)
    states = [state]
    comm = VirtualCollective(2)
    for _ in range(steps):
        grads = {n: torch.randn(2, *s, generator=generator) for n, s in SHAPES.items()}  # (W, *shape)
        _, state = aggregator.aggregate(grads, state, comm)
        states.append(state)
    return states


def _roundtrip(value):
    buffer = io.BytesIO()
    torch.save(to_plain(value), buffer)
    buffer.seek(0)
    return from_plain(torch.load(buffer, weights_only=True))


def test_the_configurations_cover_every_compressor_and_mode():
    assert {name for name, _ in CONFIGURATIONS} == set(compressors.REGISTRY)
    modes = {options.get("error_feedback") for _, options in CONFIGURATIONS}
    assert set(ERROR_FEEDBACK_MODES) <= modes


@pytest.mark.parametrize("name, options", CONFIGURATIONS, ids=[f"{n}-{o}" for n, o in CONFIGURATIONS])
def test_every_state_record_is_registered_and_round_trips(name, options):
    """A new state type without ``@register_record`` fails here (and could not be checkpointed)."""
    states = _states(name, options)
    registered = set(registered_records().values())
    for state in states:
        for record in _records(state):
            assert type(record) in registered, f"{type(record).__qualname__} in {name} {options} is not registered"
        restored = _roundtrip(state)
        check_same_structure(restored, states[0])  # shapes and types never change over steps
        assert digest(to_plain(restored)) == digest(to_plain(state))
        _assert_equal(restored, state)


def test_the_loop_state_is_registered_and_round_trips():
    e = sim.Experiment(task="synthetic-lowrank", task_options={"dim_in": 6, "dim_out": 4, "samples": 16,
                                                               "test_samples": 4},
                       workers=2, steps=2, batch_size=2, compressor={"name": "powersgd", "rank": 1})
    simulation = sim.Simulation(e)
    fresh = simulation.initial_state()
    stepped, _ = simulation.step(fresh)
    for state in (fresh, stepped):
        assert all(type(r) in set(registered_records().values()) for r in _records(state))
        restored = _roundtrip(state)
        assert type(restored) is sim.TrainState
        check_same_structure(restored, fresh)
        _assert_equal(restored, state)


def _assert_equal(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def test_register_record_refuses_a_taken_name_and_non_records():
    with pytest.raises(ValueError, match="already taken"):
        @register_record(record_name="PowerSGDState")
        class Impostor(NamedTuple):
            x: int
    with pytest.raises(ValueError, match="NamedTuple or a frozen dataclass"):
        register_record(dict)

    @dataclasses.dataclass
    class Mutable:
        x: int
    with pytest.raises(ValueError, match="frozen dataclass"):
        register_record(Mutable)


def test_a_frozen_dataclass_record_round_trips_under_its_explicit_name():
    @register_record(record_name="tests.SecurityProbeRecord")
    @dataclasses.dataclass(frozen=True)
    class Probe:
        weights: dict
        step: int
    value = Probe({"w": torch.arange(3.0)}, 4)
    plain = to_plain(value)
    assert plain["__record__"] == "tests.SecurityProbeRecord"
    restored = _roundtrip(value)
    assert type(restored) is Probe and restored.step == 4 and torch.equal(restored.weights["w"], value.weights["w"])


def test_an_unregistered_record_cannot_be_saved():
    class Unregistered(NamedTuple):
        x: int
    with pytest.raises(ValueError, match=r"\$\.inner: type .*Unregistered is not a registered record"):
        to_plain({"inner": Unregistered(1)})


@pytest.mark.parametrize("plain, where, what", [
    ({"__record__": "os:system", "fields": {"command": "true"}}, r"\$", "record type 'os:system' is invalid"),
    ({"a": [{"__record__": "SGDState", "fields": {"momentum": {}, "extra": 1}}]}, r"\$\.a\[0\]",
     r"unexpected fields \['extra'\]"),
    ({"__record__": "SGDState", "fields": {}}, r"\$", r"missing fields \['momentum'\]"),
    ({"__record__": "SGDState", "fields": {"momentum": {}}, "more": 1}, r"\$", "a record holds keys"),
    ({"__record__": ["SGDState"], "fields": {}}, r"\$", "record type '<list>' is invalid"),
    ({"__namedtuple__": "sim.workflow.store:subprocess.run", "fields": {}}, r"\$", "older version"),
    ({1: torch.zeros(1)}, r"\$", r"dict keys \[1\] are invalid"),
    ({"x": {1.5, 2.5}}, r"\$\.x", "type set is invalid"),
    ({"x": torch.zeros(2).to_sparse()}, r"\$\.x", "sparse_coo tensor is invalid"),
])
def test_from_plain_refuses_what_is_not_plain_data_or_a_registered_record(plain, where, what):
    with pytest.raises(ValueError, match=rf"state at {where}: .*{what}"):
        from_plain(plain)


def test_nesting_deeper_than_the_limit_is_refused_by_decoding_and_digest():
    deep = []
    for _ in range(serialization.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than"):
        from_plain(deep)
    with pytest.raises(ValueError, match="nested deeper than"):
        digest(deep)
    fine = []
    for _ in range(serialization.MAX_DEPTH - 1):
        fine = [fine]
    assert from_plain(fine) == fine


def test_digest_sees_every_bit_and_every_container_kind():
    base = {"a": torch.tensor([1.0, 2.0]), "b": [1, 2.0, "x", None, True], "c": (1,)}
    reference = digest(base)
    assert digest({"a": torch.tensor([1.0, 2.0]), "b": [1, 2.0, "x", None, True], "c": (1,)}) == reference
    flipped = base["a"].clone()
    flipped.view(torch.int32)[0] ^= 1  # one bit of one float
    variants = [
        {**base, "a": flipped},
        {**base, "a": base["a"].double()},  # same values, another dtype
        {**base, "a": base["a"].reshape(2, 1)},  # same bytes, another shape
        {**base, "b": [1.0, 2.0, "x", None, True]},  # int vs float
        {**base, "b": [1, 2.0, "x", None, 1]},  # bool vs int
        {**base, "c": [1]},  # tuple vs list
        {"b": base["b"], "a": base["a"], "c": (1,)},  # key order
    ]
    digests = {digest(v) for v in variants}
    assert reference not in digests and len(digests) == len(variants)


def test_the_package_api_state_is_registered_and_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Linear(32, 5))
    powersgd = compressors.PowerSGD(list(model.parameters()),
                                    config=compressors.Config(rank=1, start_compressing_after_num_steps=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(8, 20, generator=generator)).square().mean().backward()
        compressors.optimizer_step(optimizer, powersgd)
    assert any(isinstance(r, compressors.PowerSGDState) for r in _records(powersgd.state))
    assert all(type(r) in set(registered_records().values()) for r in _records(powersgd.state))
    _assert_equal(_roundtrip(powersgd.state), powersgd.state)
