"""An honest what-if: with seconds or an accelerator, no clock of this machine enters the table; every time
column says where it came from; identity's codec time is exactly 0; two identical calls are identical."""
from __future__ import annotations

import importlib
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import compressors
import sim
from compressors.degenerate import DenseConfigurationWarning
from sim.cost import compute as cost_compute
from sim.cost import whatif
from sim.cost.compute import ACCELERATORS, codec_flops, codec_from_flops
from sim.cost.whatif import does_it_pay, format_does_it_pay

whatif_module = importlib.import_module("sim.cost.whatif")  # the module (sim.cost.whatif is also the function)

SHAPES = {"w1": (128, 256), "b1": (128,), "w2": (10, 128)}
COMPRESSORS = ["identity", "powersgd:rank=2", "topk:ratio=0.05", "qsgd"]


@pytest.fixture
def no_clock(monkeypatch):
    """Any timing on this machine fails the test: the answer must not depend on it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a clock of this machine was read")
    monkeypatch.setattr(cost_compute, "_median_seconds", refuse)


@pytest.mark.parametrize("kwargs, codec_from", [
    ({"compute": 0.05}, "none"),
    ({"compute": 0.05, "accelerator": "v100"}, "flops@v100"),
    ({"compute": sim.cost.ComputeTime(0.01, 0.02), "accelerator": "a100"}, "flops@a100"),
])
def test_seconds_on_the_target_use_no_clock_and_repeat_exactly(no_clock, kwargs, codec_from):
    first = whatif(SHAPES, compressors=COMPRESSORS, workers=[4, 64], networks=["ethernet-10g", "nvlink"], **kwargs)
    second = whatif(SHAPES, compressors=COMPRESSORS, workers=[4, 64], networks=["ethernet-10g", "nvlink"], **kwargs)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert set(first.codec_source) == {codec_from} and set(first.compute_source) == {"given"}
    assert set(first.comm_source) == {"ledger+network"}
    assert (first[first.compressor == "identity"].codec_s == 0.0).all()
    compressed = first[first.compressor != "identity"]
    assert (compressed.codec_s > 0).all() if codec_from != "none" else (compressed.codec_s == 0).all()


def test_an_accelerator_prices_compute_and_codec_from_flops(no_clock):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    example = torch.empty(32, 64)
    table = whatif(model, compressors=["powersgd:rank=4"], workers=[8], networks=["ethernet-1g"], compute="t4",
                   example_input=example, precision="fp32")
    assert set(table.compute_source) == {"flops@t4"} and set(table.codec_source) == {"flops@t4"}
    rate = ACCELERATORS["t4"].fp32_tflops * 1e12 * 0.4
    forward = 2 * 32 * (64 * 128 + 128 * 10)  # 2 per multiply-add of each linear layer
    assert table.compute_s.iloc[0] == pytest.approx(3 * forward / rate, rel=1e-12)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    row = table.set_index("compressor").loc["powersgd(rank=4)"]
    assert row.codec_s == codec_from_flops(compressors.make("powersgd", rank=4), shapes, "t4")
    assert table.set_index("compressor").loc["identity", "codec_s"] == 0.0


def test_powersgd_codec_flops_are_the_analytic_count():
    # one worker, one (n, m) matrix: P = M Q, Q = M^T P, decompress P Q^T: 3 matmuls of 2 n m r FLOPs each
    # (orthogonalisation is not counted by the FLOP counter, and is priced through the memory passes instead)
    for n, m, r in [(64, 96, 1), (64, 96, 4), (33, 20, 3)]:
        assert codec_flops(compressors.make("powersgd", rank=r), {"w": (n, m)}) == 6 * n * m * r


def test_identity_codec_is_exactly_zero_even_when_measured():
    table = whatif(SHAPES, compressors=["identity"], workers=[4], compute=0.01, codec="measure")
    assert set(table.codec_source) == {"measured-cpu"} and (table.codec_s == 0.0).all()
    assert cost_compute.measure_codec(compressors.make("identity"), SHAPES) == 0.0


def test_compute_measured_here_keeps_the_codec_measured_here():
    e = sim.Experiment(task="digits-mlp", workers=4, steps=1, batch_size=16)
    table = whatif(e, compressors=["powersgd:rank=1"], workers=[4], networks=["ethernet-10g"])
    assert set(table.compute_source) == {"measured-cpu"} and set(table.codec_source) == {"measured-cpu"}


def test_codec_flops_needs_an_accelerator():
    with pytest.raises(ValueError, match="codec='flops' needs an accelerator"):
        whatif(SHAPES, compute=0.01, codec="flops")
    with pytest.raises(ValueError, match="accelerator"):
        whatif(SHAPES, compute=0.01, accelerator="tpu9")
    with pytest.raises(ValueError, match="example batch"):
        whatif(nn.Linear(3, 4), compute="v100")  # a module without example_input: no FLOPs to count


def test_resnet50_is_known_by_name_with_its_published_flops(no_clock):
    table = whatif("resnet50", compressors=["identity"], workers=[16], compute="v100", batch_size=32,
                   precision="fp32")
    assert table.mb_per_worker.iloc[0] * 1e6 == 25_557_032 * 4
    # torchvision: 4.09 G multiply-adds per 224x224 image; x2 FLOPs, x3 for training, 32 images, 40% of 15.7 TFLOP/s
    assert table.compute_s.iloc[0] == pytest.approx(3 * 2 * 4.09e9 * 32 / (0.4 * 15.7e12), rel=2e-3)
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        whatif("resnet5O")


def test_does_it_pay_is_the_speedup_pivot():
    table = whatif(SHAPES, compressors=COMPRESSORS, workers=[4, 64], networks=["ethernet-1g", "nvlink"], compute=0.01)
    wide = does_it_pay(table)
    assert list(wide.index) == ["identity", "powersgd(rank=2)", "topk(ratio=0.05)", "qsgd"]
    assert len(wide.columns) == 4
    for _, row in table.iterrows():
        assert wide.loc[row.compressor, (row.network, row.workers)] == row.speedup
    text = format_does_it_pay(table)
    assert "does it pay?" in text and "codec: none" in text and "compute: given" in text
    assert "nvlink x64" in text and "1.00x" in text


def test_a_degenerate_configuration_is_labelled_dense_and_warns_once():
    shapes = {"w": (8, 8), "v": (8, 6)}
    spec = {"name": "powersgd", "rank": 8, "min_compression_rate": 0.0}
    agg = compressors.make("powersgd", rank=8, min_compression_rate=0.0)
    assert agg.bits_per_step(shapes) >= sum(torch.Size(s).numel() for s in shapes.values()) * 32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = whatif(shapes, compressors=[spec, "powersgd:rank=1"], workers=[4], compute=0.01)
        whatif(shapes, compressors=[spec], workers=[4], compute=0.01)
    dense = [w for w in caught if issubclass(w.category, DenseConfigurationWarning)]
    assert len(dense) == 1 and "powersgd(rank=8, min_compression_rate=0.0)" in str(dense[0].message)
    assert set(table.compressor) == {"identity", "powersgd(rank=8, min_compression_rate=0.0) (dense)",
                                     "powersgd(rank=1)"}


def test_a_degenerate_run_warns_once_and_its_sweep_label_says_dense():
    base = sim.Experiment(task="synthetic-lowrank", workers=2, steps=2, batch_size=8, eval_every=0,
                          task_options={"dim_in": 13, "dim_out": 7, "samples": 64, "test_samples": 16},
                          compressor={"name": "powersgd", "rank": 1, "min_compression_rate": 0.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = sim.sweep(base, grid={"compressor.rank": [1, 7]}, seeds=[0, 1], progress=False)
    dense = [w for w in caught if issubclass(w.category, DenseConfigurationWarning)]
    assert len(dense) == 1 and "'rank': 7" in str(dense[0].message)  # two seeds, one warning
    assert list(dict.fromkeys(table.run)) == ["compressor.rank=1", "compressor.rank=7 (dense)"]
    result = sim.run(base.replace(compressor={"name": "powersgd", "rank": 7, "min_compression_rate": 0.0}))
    assert result.bits_per_step > result.dense_bits_per_step  # rank 7 on a 7 x 13 matrix: worse than dense
    assert sim.workflow.store.label({}, result.experiment, dense=sim.workflow.store.sends_dense(result)) == \
        "powersgd(rank=7, min_compression_rate=0.0) (dense)"


def test_precision_defaults_to_the_accelerators_mixed_precision_and_is_printed(no_clock):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    example = torch.empty(32, 64)
    forward = 2 * 32 * (64 * 128 + 128 * 10)
    for name, expected in [("v100", "fp16"), ("a100", "bf16")]:
        table = whatif(model, compressors=["powersgd:rank=4"], workers=[8], compute=name, example_input=example)
        assert set(table.precision) == {expected}
        rate = ACCELERATORS[name].half_tflops * 1e12 * 0.4
        assert table.compute_s.iloc[0] == pytest.approx(3 * forward / rate, rel=1e-12)
        # mixed precision keeps fp32 gradients: the compressor's encode/decode is priced at the fp32 rate
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        row = table.set_index("compressor").loc["powersgd(rank=4)"]
        assert row.codec_s == codec_from_flops(compressors.make("powersgd", rank=4), shapes, name, "fp32")
        assert f"FLOPs priced at {expected} (mixed precision" in format_does_it_pay(table)
    fp32 = whatif(model, compressors=["identity"], workers=[8], compute="v100", example_input=example,
                  precision="fp32")
    assert set(fp32.precision) == {"fp32"} and "FLOPs priced at fp32" in format_does_it_pay(fp32)
    assert set(whatif(SHAPES, compressors=["identity"], compute=0.01).precision) == {"none"}  # nothing priced


@pytest.mark.parametrize("argument, value", [("precision", "half"), ("utilization", 0.0), ("overlap", "some"),
                                             ("batch_size", 0), ("compute", "v1000"), ("compressors", ["powersgd:rnak=2"]),
                                             ("seed", -1), ("compressors", "powersgd")])
def test_every_argument_is_checked_before_the_model_is_built(monkeypatch, argument, value):
    def built(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(whatif_module, "resolve_source", built)
    name = "rnak" if argument == "compressors" and value != "powersgd" else argument
    with pytest.raises(ValueError, match=name):
        whatif("gpt2", **{"compute": "a100", argument: value})


def test_cli_precision(capsys):
    from sim.cli.main import main

    assert main(["whatif", "--model", "resnet18_cifar", "--rank", "2", "--compute", "v100", "--codec", "none",
                 "--precision", "fp32"]) == 0
    assert "FLOPs priced at fp32" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["whatif", "--precision", "half"])
    assert "--precision" in capsys.readouterr().err
