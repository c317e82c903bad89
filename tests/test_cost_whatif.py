"""sim.whatif: measured payloads, identity's speedup, the paper's volumes, 'compression does not pay'."""
import dataclasses
import math

import pandas as pd
import pytest
import torch

import compressors
import sim
from sim.cost import ComputeTime, whatif
from sim.cost.whatif import compressor_spec, probe_ledger

SHAPES = {"w1": (256, 512), "b1": (256,), "w2": (10, 256)}


def test_identity_speedup_is_exactly_one():
    table = whatif(SHAPES, compressors=["identity", "powersgd:rank=2"], workers=[1, 4, 32],
                   networks=["ethernet-1g", "nvlink", "dgx1-ethernet-10g"], compute=0.01, codec="none")
    ident = table[table.compressor == "identity"]
    assert (ident.speedup == 1.0).all() and len(ident) == 9
    assert set(table.compressor) == {"identity", "powersgd(rank=2)"}


@pytest.mark.parametrize("name", sorted(compressors.REGISTRY))
def test_payload_does_not_depend_on_worker_count(name):
    # whatif prices a 2-worker probe for any p: valid only if one worker's payload ignores W
    agg = compressors.make(name)
    shapes = {"w1": (24, 40), "b1": (24,), "w2": (10, 24)}
    two = probe_ledger(agg, shapes, workers=2)
    three = probe_ledger(compressors.make(name), shapes, workers=3)
    strip = [dataclasses.replace(r, workers=0) for r in two], [dataclasses.replace(r, workers=0) for r in three]
    assert strip[0] == strip[1]
    assert sum(r.bits for r in two) == pytest.approx(agg.bits_per_step(shapes))


def test_compression_does_not_pay_on_a_fast_network_and_pays_on_a_slow_one():
    shapes = {"w": (1024, 1024)}
    table = whatif(shapes, compressors=["powersgd:rank=4"], workers=[8], networks=["nvlink", "ethernet-1g"],
                   compute=ComputeTime(0.01, 0.02), codec="none").set_index(["compressor", "network"])
    assert table.loc[("powersgd(rank=4)", "nvlink"), "speedup"] < 1.0  # 3 collectives' latency > bytes saved
    assert table.loc[("powersgd(rank=4)", "ethernet-1g"), "speedup"] > 1.5


def _resnet18_table(ranks, compute=0.0, precision="auto"):
    return whatif("resnet18_cifar", compressors=[f"powersgd:rank={r}" for r in ranks], workers=[16],
                  networks=["ethernet-10g"], compute=compute, codec="none", precision=precision).set_index("compressor")


PAPER_RATIOS = {1: 243, 2: 136, 4: 72, 7: 42}  # PowerSGD paper, Table 3 (vectors sent uncompressed)


def _check_volumes(table, ranks):
    dense = table.loc["identity", "mb_per_worker"]
    assert dense * 1e6 == 11_173_962 * 4
    for rank in ranks:
        assert round(dense / table.loc[f"powersgd(rank={rank})", "mb_per_worker"]) == PAPER_RATIOS[rank]
    # dense SGD: 1023 MB per worker per epoch, 16 workers x 128 images, 50,000 images (24 full steps, MiB)
    assert round(dense * 1e6 * (50_000 // (16 * 128)) / 2**20) == 1023


def test_paper_resnet18_volumes_and_compute_preset():
    table = _resnet18_table([2], compute="v100", precision="fp32")
    _check_volumes(table, [2])
    # 1.11 GFLOP forward per 32x32 image, x3 for training, x128 images at 40% of 15.7 TFLOP/s
    assert table.compute_s.iloc[0] == pytest.approx(3 * 1.1108e9 * 128 / (0.4 * 15.7e12), rel=1e-3)


@pytest.mark.slow
def test_paper_resnet18_volumes_all_ranks():
    _check_volumes(_resnet18_table([1, 2, 4, 7]), [1, 2, 4, 7])


def test_an_experiment_is_measured_here():
    e = sim.Experiment(task="digits-mlp", workers=4, steps=1, batch_size=16)
    table = whatif(e, compressors=["powersgd:rank=1"], workers=[4], networks=["ethernet-10g"])
    assert (table.compute_s > 0).all() and (table.step_s >= table.compute_s).all()


def test_time_to_accuracy():
    history = pd.DataFrame({"step": [10, 20, 30], "test_accuracy": [0.5, 0.8, 0.9]})
    assert sim.time_to_accuracy(history, 0.75, 0.1) == pytest.approx(2.0)
    assert sim.time_to_accuracy(history, 0.95, 0.1) == math.inf
    with pytest.raises(ValueError, match="accuracy"):
        sim.time_to_accuracy(history, 0.5, 0.1, metric="accuracy")
    with pytest.raises(ValueError, match="step_time"):
        sim.time_to_accuracy(history, 0.5, -1.0)


def test_experiment_network_adds_sim_time():
    e = sim.Experiment(task="digits-mlp", workers=2, steps=3, batch_size=8, eval_every=0, network="ethernet-1g")
    history = sim.run(e).history
    increments = history.sim_time.diff().dropna()
    assert (increments > 0).all()
    assert history.sim_time.iloc[0] == pytest.approx(increments.iloc[0])  # compute 0: each step the same


@pytest.mark.parametrize("kwargs, field", [
    ({"workers": [0]}, "workers"),
    ({"networks": ["token-ring"]}, "preset"),
    ({"compressors": [{"rank": 2}]}, "compressors"),
    ({"compressors": ["powersgd:rank=0"]}, "rank"),
    ({"compute": -1.0}, "compute"),
    ({"compute": "tpu9"}, "compute"),
    ({"codec": "guess"}, "codec"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        whatif(SHAPES, **kwargs)
    with pytest.raises(ValueError, match="experiment_or_shapes"):
        whatif(42)


def test_compressor_spec_parsing():
    assert compressor_spec("powersgd:rank=2,warm_start=False") == {"name": "powersgd", "rank": 2, "warm_start": False}
    assert compressor_spec("identity") == {"name": "identity"}
