"""sim.plot: one line per configuration, mean over seeds, a band over seeds; PNG files on disk."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sim
from sim.workflow.plot import curves, plot_grid, plot_metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table() -> pd.DataFrame:
    """Two configurations x three seeds x four steps, test accuracy logged every other step."""
    rows = []
    for run, offset in (("rank=1", 0.0), ("rank=2", 0.1)):
        for seed in range(3):
            for step in range(1, 5):
                rows.append({"run": run, "seed": seed, "step": step, "bits": 1000.0 * step * (1 + offset),
                             "sim_time": 0.5 * step, "train_loss": 1.0 / step + 0.01 * seed,
                             "test_accuracy": offset + 0.1 * step + 0.02 * seed if step % 2 == 0 else np.nan})
    return pd.DataFrame(rows)


def test_curves_are_the_mean_and_band_over_seeds():
    data = table()
    by_run = curves(data, "test_accuracy", x="bits")
    assert list(by_run) == ["rank=1", "rank=2"]
    c = by_run["rank=2"]
    assert len(c) == 2  # only the evaluated steps 2 and 4
    np.testing.assert_allclose(c["mean"], [0.1 + 0.2 + 0.02, 0.1 + 0.4 + 0.02])  # seeds add 0, .02, .04
    np.testing.assert_allclose(c["low"], [0.3, 0.5])
    np.testing.assert_allclose(c["high"], [0.34, 0.54])
    np.testing.assert_allclose(c["x"], [2000 * 1.1 / 8e6, 4000 * 1.1 / 8e6])  # megabytes
    std = curves(data, "train_loss", band="std")["rank=1"]
    spread = np.std([0.0, 0.01, 0.02], ddof=1)
    np.testing.assert_allclose(std["high"] - std["mean"], spread)
    np.testing.assert_allclose(std["mean"] - std["low"], spread)


def test_plots_write_png_files(tmp_path):
    path = tmp_path / "plots" / "accuracy.png"
    fig = plot_grid(table(), metrics=("test_accuracy", "train_loss"), xs=("step", "bits", "sim_time"), path=path)
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5000
    assert len(fig.axes) == 6
    ax = plot_metric(table(), "train_loss", x="sim_time")
    assert [line.get_label() for line in ax.get_lines()] == ["rank=1", "rank=2"]
    assert ax.get_xlabel() == "simulated wall-clock (s)"
    sim.plot.save_png(ax.figure, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("**/.*"))  # no temporary files left behind


def test_plot_of_a_real_sweep(tmp_path):
    base = sim.Experiment(task="synthetic-lowrank", workers=2, steps=4, batch_size=8, eval_every=2,
                          task_options={"dim_in": 6, "dim_out": 4, "samples": 32, "test_samples": 8},
                          compressor={"name": "powersgd", "rank": 1}, network="ethernet-1g")
    results = sim.workflow.sweep.sweep_to_dir(base, tmp_path / "r", grid={"compressor.rank": [1, 2]}, seeds=[0, 1],
                                     progress=False)
    assert results["sim_time"].notna().all()
    plot_grid(results, metrics=("test_loss",), xs=("step", "bits", "sim_time"), path=tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("kwargs, named", [({"metric": "accuracy"}, "accuracy"), ({"x": "epoch"}, "epoch"),
                                           ({"band": "iqr"}, "band"), ({"by": "compressor"}, "compressor")])
def test_bad_arguments_name_the_field(kwargs, named):
    options = {"metric": "test_accuracy", **kwargs}
    with pytest.raises(ValueError, match=named):
        curves(table(), **options)
    with pytest.raises(ValueError, match="sim_time needs Experiment.network"):
        curves(table().drop(columns="sim_time"), "test_accuracy", x="sim_time")
