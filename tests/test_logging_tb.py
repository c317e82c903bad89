"""The TensorBoard logger writes what the run's history holds: read the event file back and compare."""
from __future__ import annotations

import math

import pytest

import sim

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from sim.workflow.loggers import TAGS, TensorBoardLogger  # noqa: E402

TINY = dict(task="synthetic-lowrank", task_options={"dim_in": 6, "dim_out": 4, "samples": 64, "test_samples": 16},
            workers=2, steps=7, batch_size=4, eval_every=3, compressor={"name": "powersgd", "rank": 1},
            network="ethernet-10g")


def read_back(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_event_file_holds_the_history_step_by_step(tmp_path):
    experiment = sim.Experiment(**TINY)
    with TensorBoardLogger(tmp_path / "tb") as logger:
        result = sim.run(experiment, on_step=logger)
    events = read_back(tmp_path / "tb")
    history = result.history.set_index("step")
    for metric in ("train_loss", "lr", "bits", "compression_error", "memory_norm", "sim_time", "test_loss"):
        scalars = events.Scalars(TAGS[metric])
        expected = history[metric].dropna()
        assert [s.step for s in scalars] == expected.index.tolist(), metric
        for s, value in zip(scalars, expected):
            assert math.isclose(s.value, value, rel_tol=1e-6), (metric, s.step)  # stored as float32
    assert [s.step for s in events.Scalars("test/loss")] == [3, 6, 7]  # evaluated steps only
    text = events.Tensors("experiment/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"task": "synthetic-lowrank"' in text and '"rank": 1' in text  # what produced the run


def test_every_n_steps_keeps_evaluated_steps(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", every=4)
    sim.run(sim.Experiment(**TINY), on_step=logger)
    logger.close()
    events = read_back(tmp_path / "tb")
    assert [s.step for s in events.Scalars("train/loss")] == [3, 4, 6, 7]
    with pytest.raises(ValueError, match="every"):
        TensorBoardLogger(tmp_path / "x", every=0)
