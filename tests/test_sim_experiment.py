"""Experiments validate at construction, shard data as documented, sweep over grids."""
import pytest
import torch

import sim
from sim.sharding import BatchSampler, make_shards


@pytest.mark.parametrize("field, value", [
    ("workers", 0), ("workers", 2.5), ("steps", 0), ("batch_size", -1), ("lr", -0.1), ("lr", float("nan")),
    ("momentum", 1.0), ("weight_decay", -1.0), ("task", "digits-mpl"), ("sharding", "dirichlet"),
    ("engine", "jax"), ("dtype", "float16"), ("nonfinite", "ignore"), ("lr_milestones", (-1,)),
    ("label_skew_alpha", 0.0), ("seed", -1), ("eval_every", -2), ("nesterov", "yes"),
])
def test_invalid_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=field):
        sim.Experiment(**{field: value})


@pytest.mark.parametrize("compressor, word", [
    ({"name": "powersgd", "rank": 0}, "rank"), ({"name": "powersdg"}, "powersgd"),
    ({"name": "powersgd", "rnak": 1}, "rank"), ({"rank": 1}, "compressor"),
    ({"name": "powersgd", "variant": "fast"}, "variant"), ({"name": "powersgd", "error_feedback": "yes"},
                                                            "error_feedback"),
])
def test_invalid_compressor_is_caught_before_any_work(compressor, word):
    with pytest.raises(ValueError, match=word):
        sim.Experiment(compressor=compressor)


def test_unknown_task_option_suggests_the_closest():
    with pytest.raises(ValueError, match="spectrum_decay"):
        sim.Experiment(task="synthetic-lowrank", task_options={"spectrum_decy": 0.3})


def test_with_overrides_dotted_keys():
    e = sim.Experiment(compressor={"name": "powersgd", "rank": 1})
    f = e.with_overrides({"compressor.rank": 4, "lr": 0.3})
    assert f.compressor == {"name": "powersgd", "rank": 4} and f.lr == 0.3
    assert e.compressor["rank"] == 1  # the original is untouched
    with pytest.raises(ValueError, match="lrr"):
        e.with_overrides({"lrr": 1})
    with pytest.raises(ValueError, match="rank"):
        e.with_overrides({"compressor.rank": 0})


@pytest.mark.parametrize("mode", ["iid", "label_skew"])
def test_shards_partition_the_training_set(mode):
    labels = torch.arange(1000) % 10
    shards = make_shards(labels, 7, mode, alpha=0.3, seed=0)
    together = torch.cat(shards).sort().values
    assert torch.equal(together, torch.arange(1000))
    assert all(len(s) > 0 for s in shards)
    if mode == "iid":
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_label_skew_concentrates_classes():
    labels = torch.arange(2000) % 10
    iid = make_shards(labels, 10, "iid", 0.1, seed=0)
    skew = make_shards(labels, 10, "label_skew", 0.1, seed=0)
    def top_class_share(shards):
        return sum(float(torch.bincount(labels[s], minlength=10).max()) / len(s) for s in shards) / len(shards)
    assert top_class_share(skew) > 2 * top_class_share(iid)


def test_batches_are_epochs_without_replacement_and_a_pure_function_of_the_step():
    shards = [torch.arange(0, 40), torch.arange(40, 43)]
    sampler = BatchSampler(shards, batch_size=8, seed=3)
    epoch = torch.cat([sampler.worker_batch(0, s) for s in range(5)])
    assert torch.equal(epoch.sort().values, torch.arange(40))
    small = sampler.worker_batch(1, 0)  # 3 samples, batch of 8: with replacement
    assert len(small) == 8 and set(small.tolist()) <= {40, 41, 42}
    fresh = BatchSampler(shards, batch_size=8, seed=3)
    assert torch.equal(fresh.worker_batch(0, 7), sampler.worker_batch(0, 7))


def test_sweep_tables_every_grid_point_and_seed():
    base = sim.Experiment(task="digits-mlp", workers=2, steps=3, batch_size=4, eval_every=0,
                          compressor={"name": "powersgd", "rank": 1})
    table = sim.sweep(base, grid={"compressor.rank": [1, 2]}, seeds=[0, 1], progress=False)
    assert len(table) == 2 * 2 * 3
    assert set(table["compressor.rank"]) == {1, 2} and set(table["seed"]) == {0, 1}
    with pytest.raises(ValueError, match="rank"):
        sim.sweep(base, grid={"compressor.rank": [0]}, seeds=[0], progress=False)
