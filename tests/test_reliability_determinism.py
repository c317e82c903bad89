"""Determinism: the same experiment twice gives bitwise-identical histories and final states, for every
registered compressor (the registry is read at collection time, so new compressors are covered)."""
import pandas as pd
import pytest

import compressors
import sim
from reference import assert_identical_leaves


@pytest.mark.parametrize("name", sorted(compressors.REGISTRY))
def test_same_experiment_twice_is_bitwise_identical(name):
    # digits-mlp with a small hidden layer: matrices (compressed) and bias vectors (the dense path);
    # label-skewed shards, warm-up and a network exercise the rest of the loop.
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": [16]}, workers=3, steps=5, batch_size=8,
                       eval_every=2, sharding="label_skew", lr=0.05, momentum=0.9, seed=3,
                       compressor={"name": name}, network="ethernet-10g")
    first, second = sim.run(e), sim.run(e)
    pd.testing.assert_frame_equal(first.history, second.history, check_exact=True)
    assert first.history["train_loss"].notna().all()
    assert_identical_leaves(first.extras["final_state"], second.extras["final_state"])


def test_a_different_seed_changes_the_history():
    """So the comparison above is not vacuous: the history does depend on the seed."""
    e = sim.Experiment(task="digits-mlp", task_options={"hidden": [16]}, workers=3, steps=3, batch_size=8,
                       eval_every=0, compressor={"name": "powersgd", "rank": 1})
    assert not sim.run(e).history.equals(sim.run(e.replace(seed=1)).history)
