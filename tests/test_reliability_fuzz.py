"""Hostile configurations: every config is either accepted and runs a step with a finite loss, or rejected
with a ValueError that names the offending field. Never another exception, a hang or a NaN.

Configs are plain data, as from a JSON/YAML file (``Experiment.from_dict``): a few fields get arbitrary
types and values (None, strings, NaN/inf, huge integers, lists, dicts, unknown keys), the rest valid but
arbitrary values. Sizes are drawn small so an accepted config runs in milliseconds.
"""
import contextlib
import dataclasses
import json
import math
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressors
import sim
from sim.workflow import config as sim_config
from sim.cost import PRESETS
from sim.tasks import TASK_REGISTRY, task_options

RUNNABLE_TASKS = ("digits-mlp", "digits-cnn", "synthetic-lowrank")  # bundled data: no download, fast
HUGE = [2 ** 31, 2 ** 63, 2 ** 64, -2 ** 64, 10 ** 30]
CHOICE_WORDS = ["paper", "alternating", "qr", "gram_schmidt", "none", "local", "averaged", "ef21", "iid",
                "label_skew", "vmap", "loop", "float32", "float64", "raise", "skip_step", "ring"]
COST_KEYS = {"workers", "batch_size", "steps", "num_iters_per_step", "hidden", "dim_in", "dim_out", "samples",
             "test_samples", "embedding", "layers", "seq_len", "corpus_bytes", "max_train_tokens",
             "train_samples", "levels"}

hostile = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.sampled_from(CHOICE_WORDS),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.sampled_from(HUGE),
    st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(), st.sampled_from([b"bytes", 1j, float("nan")]),
)


def small_int(lo=-1, hi=6):
    return st.integers(lo, hi)


def cheap_hostile(key: str):
    """Arbitrary values, except that a size field never gets a huge valid integer (that would be a slow run
    the user asked for, not a validation gap)."""
    if key in COST_KEYS:
        return hostile.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v > 64))
    return hostile


positive_float = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)
unit_float = st.floats(min_value=0.0, max_value=1.0)
VALID = {
    "workers": small_int(1, 4), "steps": small_int(1, 3), "batch_size": small_int(1, 8), "lr": positive_float,
    "momentum": st.floats(0.0, 0.999), "nesterov": st.booleans(), "weight_decay": st.floats(0.0, 1.0),
    "lr_warmup_steps": small_int(0, 3), "lr_milestones": st.lists(small_int(0, 5), max_size=3),
    "lr_decay": st.floats(0.01, 1.0), "sharding": st.sampled_from(["iid", "label_skew"]),
    "label_skew_alpha": st.floats(1e-3, 1e3), "seed": st.one_of(small_int(0, 10), st.just(2 ** 63 - 1)),
    "eval_every": small_int(0, 3), "log_every": small_int(1, 3), "engine": st.sampled_from(["auto", "vmap", "loop"]),
    "dtype": st.sampled_from(["float32", "float64"]), "nonfinite": st.sampled_from(["raise", "skip_step"]),
    "keep_ledger": st.booleans(),
    "weight_decay_exclude": st.lists(st.sampled_from(["*bias", "*norm*", "weight", "0.*"]), max_size=2),
    "clip_grad_norm": st.one_of(st.none(), positive_float), "validation_fraction": st.floats(0.0, 0.9),
    "network": st.one_of(st.none(), st.sampled_from(sorted(PRESETS)),
                         st.fixed_dictionaries({"alpha": st.floats(0, 1e-3), "bandwidth": st.floats(1e6, 1e12)})),
}
TASK_VALID = {
    "split_seed": small_int(0, 5), "hidden": st.lists(small_int(1, 12), min_size=1, max_size=3),
    "dim_in": small_int(1, 12), "dim_out": small_int(1, 12), "spectrum_decay": st.floats(1e-3, 1.0),
    "noise": st.floats(0.0, 10.0), "samples": small_int(1, 64), "test_samples": small_int(1, 16),
}
NETWORK_FIELDS = ["alpha", "bandwidth", "algorithm", "devices_per_node", "intra_alpha", "intra_bandwidth",
                  "op_links", "name", "preset", "intra"]
option_value = st.one_of(small_int(-1, 6), st.floats(-1.0, 3.0), st.booleans(), st.none(),
                         st.sampled_from(CHOICE_WORDS), st.floats(0.01, 1.0))


def rarely(draw, one_in: int) -> bool:
    """True about once in ``one_in`` draws (index 0, hypothesis's favourite, is False)."""
    return draw(st.sampled_from([False] * (one_in - 1) + [True]))


@st.composite
def compressor_specs(draw):
    name = draw(hostile) if rarely(draw, 10) else draw(st.sampled_from(sorted(compressors.REGISTRY)))
    spec = {} if rarely(draw, 20) else {"name": name}
    known = list(compressors.options_of(name)) if isinstance(name, str) and name in compressors.REGISTRY else []
    for key in draw(st.lists(st.sampled_from(known), unique=True, max_size=4)) if known else []:
        spec[key] = draw(cheap_hostile(key) if rarely(draw, 6) else option_value)
    if rarely(draw, 8):  # an unknown or non-string key
        spec[draw(st.one_of(st.text(max_size=8), st.integers(), st.none()))] = draw(hostile)
    return spec


@st.composite
def task_and_options(draw):
    # weighted towards the fastest: digits-cnn is a fixed 130k-parameter model (~0.5 s a step with compression)
    task = draw(st.sampled_from(["synthetic-lowrank"] * 4 + ["digits-mlp"] * 2 + sorted(TASK_REGISTRY)))
    if rarely(draw, 12):
        task = draw(hostile)
    known = list(task_options(task)) if isinstance(task, str) and task in TASK_REGISTRY else []
    options = {}
    for key in draw(st.lists(st.sampled_from(known), unique=True, max_size=4)) if known else []:
        valid = TASK_VALID.get(key)
        options[key] = draw(cheap_hostile(key) if valid is None or rarely(draw, 6) else valid)
    if task == "synthetic-lowrank":  # keep it tiny unless the draw chose the sizes
        options.setdefault("samples", 32)
        options.setdefault("test_samples", 8)
        options.setdefault("dim_in", 6)
        options.setdefault("dim_out", 5)
    if task == "digits-mlp":
        options.setdefault("hidden", [8])
    if rarely(draw, 10):
        options[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(hostile)
    if rarely(draw, 20):
        options = draw(hostile)  # not a mapping at all
    return task, options


@st.composite
def configs(draw):
    config = {key: draw(strategy) for key, strategy in VALID.items() if draw(st.booleans())}
    task, options = draw(task_and_options())
    config.update(task=task, task_options=options, compressor=draw(compressor_specs()))
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=2)) if rarely(draw, 3) else []:
        config[key] = draw(cheap_hostile(key))  # corrupt a field or two
    if isinstance(config.get("network"), dict) and rarely(draw, 2):
        config["network"][draw(st.sampled_from(NETWORK_FIELDS + ["bandwith"]))] = draw(hostile)
    if rarely(draw, 15):
        config[draw(st.sampled_from(["lrr", "worker", "compresor", "stepz"]))] = 1
    if rarely(draw, 6):  # a config file's [sweep] table (only sim.workflow.config accepts it)
        key = draw(st.sampled_from(["compressor.rank", "lr", "task_options.hidden", "compressor.bogus", "lr.x", ""]))
        config["sweep"] = {"grid": {key: draw(st.one_of(st.lists(option_value, max_size=3), hostile))},
                           "seeds": draw(st.one_of(st.lists(small_int(-1, 3), max_size=2), hostile))}
    return config


def keys_of(config) -> set[str]:
    """Every key a message may name: top-level fields and the keys of nested option mappings."""
    keys = ["config", *(f.name for f in dataclasses.fields(sim.Experiment))]

    def walk(tree):
        if isinstance(tree, dict):
            for key, value in tree.items():
                keys.append(key)
                if isinstance(key, str):  # a dotted sweep key "compressor.rank" names "rank"
                    keys.extend(key.split("."))
                walk(value)

    walk(config)
    if isinstance(config, dict):
        task, spec = config.get("task"), config.get("compressor")
        if isinstance(task, str) and task in TASK_REGISTRY:  # a required option left out is named too
            keys.extend(task_options(task))
        if isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"] in compressors.REGISTRY:
            keys.extend(compressors.options_of(spec["name"]))
    return keys


def names_a_field(message: str, config) -> bool:
    """The message names a key of the config as ``key=``, ``'key'``, ``option key`` or ``key[``."""
    return any(pattern in message for key in keys_of(config)
               for pattern in (f"{key}=", f"{key!r}", f"{key}[", f"option {key!r}", f"option {key};"))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail instead of hanging (POSIX timers; the test runs in the main thread)."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_config_file(config) -> None:
    """The same config through a JSON file's path (sim.workflow.config): accepted or a ValueError naming a key."""
    try:
        text = json.dumps(config)
    except (TypeError, ValueError):  # bytes, complex, non-string keys...: no JSON file can hold these
        return
    try:
        sim_config.from_mapping(json.loads(text))
    except ValueError as error:
        assert names_a_field(str(error), json.loads(text)), f"{error} names no field of {text}"


def check_config(config) -> str:
    """'rejected' or 'ran' (or 'accepted' for tasks that need a download); anything else fails the test."""
    with time_limit(60):
        check_config_file(config)
        try:
            experiment = sim.Experiment.from_dict(config)
        except ValueError as error:
            assert names_a_field(str(error), config), f"{error} names no field of {config!r}"
            return "rejected"
        if experiment.task not in RUNNABLE_TASKS:
            return "accepted"
        try:
            simulation = sim.Simulation(experiment)
        except ValueError as error:  # only what needs the data: more workers than samples, an empty validation split
            assert "workers=" in str(error) or "validation_fraction=" in str(error), error
            return "rejected"
        state, metrics = simulation.step(simulation.initial_state())
        assert math.isfinite(metrics["train_loss"]), (config, metrics)
        assert state.step == 1
        return "ran"


def test_arbitrary_configs_are_accepted_and_run_or_rejected_naming_the_field():
    outcomes = []

    @settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(config=configs())
    def check(config):
        outcomes.append(check_config(config))

    check()
    # guard against a generator that only ever rejects (or only ever accepts): both paths must be exercised
    assert outcomes.count("ran") >= 6 and outcomes.count("rejected") >= 6, outcomes


@pytest.mark.parametrize("config, word", [
    ({"lrr": 0.1}, "lrr"), ({"seed": 2 ** 64}, "seed"),
    ({"compressor": {"name": "powersgd", "seed": 2 ** 64}}, "seed"), ({"compressor": {"name": "qsgd", 3: 1}}, "compressor"),
    ({"task_options": [1, 2]}, "task_options"), ({"task": "synthetic-lowrank", "task_options": {"noise": 1e300}}, "noise"),
    ({"network": {"alpha": 1e-6, "bandwith": 1e9}}, "bandwith"), ({"network": "nowhere.json"}, "network"),
    (["not", "a", "mapping"], "config"),
    ({"task": "synthetic-lowrank", "task_options": {"split_seed": 2 ** 64}}, "split_seed"),
])
def test_known_hostile_configs(config, word):
    with pytest.raises(ValueError, match=word):
        sim.Experiment.from_dict(config)


def test_more_workers_than_samples_is_rejected_before_running():
    e = sim.Experiment(task="synthetic-lowrank", task_options={"samples": 3, "dim_in": 2, "dim_out": 2}, workers=4)
    with pytest.raises(ValueError, match="workers=4 is invalid .* at most its 3 training samples"):
        sim.Simulation(e)
