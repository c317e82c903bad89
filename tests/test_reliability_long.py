"""Long runs keep flat memory: the ledger keeps totals instead of records (Experiment.keep_ledger=False, the
default) and the history grows only by the rows logged (log_every).

Memory is measured as Python's allocated-block count (``sys.getallocatedblocks``: every ledger record, row or
leaked object is blocks) and the process RSS (tensors live outside Python's allocator). tracemalloc would see
the same thing but slows this loop of tiny steps more than tenfold.
"""
import gc
import sys

import pytest

import sim
from compressors.comm import Ledger, LedgerRecord

TINY = {"dim_in": 4, "dim_out": 3, "samples": 64, "test_samples": 8}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def growth(steps: int, start: int, log_every: int, keep_ledger: bool = False):
    """(allocated blocks, RSS bytes) gained between step ``start`` and the end, and the run's simulation/result."""
    e = sim.Experiment(task="synthetic-lowrank", task_options=TINY, workers=2, steps=steps, batch_size=4,
                       eval_every=0, log_every=log_every, keep_ledger=keep_ledger, lr=0.02, momentum=0.0,
                       compressor={"name": "powersgd", "rank": 1, "min_compression_rate": 0.0})
    simulation = sim.Simulation(e)
    marks = {}

    def on_step(_, state):
        if state.step in (start, steps):
            gc.collect()
            marks[state.step] = (sys.getallocatedblocks(), rss_bytes())

    result = sim.run(e, simulation=simulation, on_step=on_step)
    blocks = marks[steps][0] - marks[start][0]
    rss = marks[steps][1] - marks[start][1]
    return blocks, rss, simulation, result


BLOCKS_PER_ROW = 60  # a logged row: a dict of ~10 floats, generously


def check_flat(steps: int, start: int, log_every: int):
    blocks, rss, simulation, result = growth(steps, start, log_every)
    rows = (steps - start) // log_every
    assert len(result.history) == steps // log_every  # one row per logged step, nothing else
    ledger = simulation.comm.ledger
    assert ledger.records == [] and ledger.calls == 2 * steps  # P and Q all-reduces: counted, not kept
    assert ledger.total_bits == result.history["bits"].iloc[-1]
    assert blocks < rows * BLOCKS_PER_ROW + 1000, blocks
    assert rss < 4 * 2 ** 20, rss
    return blocks


def test_flat_memory_small():
    check_flat(steps=1000, start=250, log_every=250)


def test_keeping_ledger_records_is_what_grows():
    """The same measurement sees the growth when every record is kept (so the flat test could fail)."""
    blocks, _, simulation, _ = growth(steps=500, start=100, log_every=250, keep_ledger=True)
    assert len(simulation.comm.ledger.records) == 1000
    assert blocks > 800 * 2, blocks  # two collectives a step, each record at least two blocks


@pytest.mark.slow
def test_flat_memory_20000_steps():
    check_flat(steps=20_000, start=5_000, log_every=1_000)


def test_totals_equal_the_sum_of_the_records():
    kept, totals = Ledger(keep_records=True), Ledger(keep_records=False)
    for i in range(50):
        record = LedgerRecord("all_reduce", bits=32 * (i + 1), numel=i + 1, dtype="float32", workers=4)
        kept.add(record)
        totals.add(record)
    assert totals.total_bits == kept.total_bits == sum(r.bits for r in kept.records)
    assert totals.calls == len(totals) == len(kept) == 50 and totals.records == []


def test_the_default_run_keeps_no_records_but_keep_ledger_does():
    e = sim.Experiment(task="synthetic-lowrank", task_options=TINY, workers=2, steps=3, batch_size=4, eval_every=0)
    assert e.keep_ledger is False
    assert sim.Simulation(e).comm.ledger.keep_records is False
    assert sim.Simulation(e.replace(keep_ledger=True)).comm.ledger.keep_records is True
    with pytest.raises(ValueError, match="keep_ledger"):
        e.replace(keep_ledger="yes")
