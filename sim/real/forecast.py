"""``sim.forecast``: wall-clock time to a target accuracy on real processes over a link, predicted, and measured.

    f = sim.forecast(experiment, target=0.80, link="100mbit", nproc=2, measure=True)
    f.predicted_seconds, f.measured_seconds, f.relative_error

The prediction multiplies two things the simulator knows without running the real processes:

    seconds to target = steps to target  x  predicted seconds per step

- steps to target: the first evaluated step of ``sim.run(experiment)`` whose ``metric`` reaches ``target``. Real
  processes follow the same trajectory (two processes sum exactly as the virtual collective; more processes
  differ by rounding only), so the simulator's step count is the real one's.
- seconds per step: measured compute + the cost model's price of the step's ledger on the link's calibrated
  network, without overlap (``Simulation.step`` computes every gradient, then aggregates):

      t_step = t_compute(k workers, threads per process) + sum_records price(record) + 2 price(vote)

  t_compute is measured here: the same experiment with ``k = workers / nproc`` workers in one process (what
  one rank computes), on the threads each rank gets. The two votes are the step's control all-reduces
  (train loss and finiteness; 2 float64 each). Evaluation steps add the measured time of one evaluation.

The network: ``network`` (e.g. saved by ``python -m sim calibrate --link 100mbit``), or, by default, a
calibration run now on the shaped link with ``nproc`` processes (about a minute).

Caveats (what the model does not see): ranks sharing this machine's cores with each other and with anything
else, TCP slow start after idle gaps, and the token bucket's burst (messages under it pass at loopback speed:
the calibration's knee). Set ``compression_error_every=0`` in experiments meant to be timed: measuring the
compression error costs an uncompressed all-reduce per step on real processes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from compressors.comm import LedgerRecord
from ..cost.network import Network
from ..cost.step_time import step_time
from ..experiment import Experiment
from ..runner import run
from ..simulation import Simulation
from .calibrate import calibrate, sizes_for
from .distributed import run_distributed
from .link import ShapedLink

VOTES_PER_STEP = 2  # Simulation.step's control all-reduces (mean loss + finiteness; memory norm + finiteness)
VOTE_BYTES = 2 * 8  # two float64 values each
COMPUTE_STEPS = 20  # steps timed for the compute measurement (after one warm-up step)


@dataclass
class Forecast:
    """A prediction of wall-clock time to ``target``, and the measurement beside it when asked for."""

    experiment: Experiment
    target: float
    metric: str
    link: str | None
    nproc: int
    steps_to_target: int | None  # None: the simulated run never reached the target
    compute_seconds: float  # per step, one rank's k workers
    comm_seconds: float  # per step, the cost model's price of the ledger and the votes
    eval_seconds: float  # per evaluation
    evaluations_to_target: int
    network: Network = field(repr=False)
    measured_seconds: float | None = None  # the real run's wall-clock to target (None: not measured/reached)
    measured_step_seconds: float | None = None  # the real run's median seconds per step
    real_steps_to_target: int | None = None

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.comm_seconds

    @property
    def predicted_seconds(self) -> float:
        if self.steps_to_target is None:
            return math.inf
        return self.steps_to_target * self.step_seconds + self.evaluations_to_target * self.eval_seconds

    @property
    def relative_error(self) -> float | None:
        """(predicted - measured) / measured, or None without a finite measurement."""
        if self.measured_seconds is None or not math.isfinite(self.measured_seconds) or self.measured_seconds <= 0:
            return None
        return (self.predicted_seconds - self.measured_seconds) / self.measured_seconds

    def summary(self) -> dict:
        return {"compressor": self.experiment.compressor.get("name"), "link": self.link, "nproc": self.nproc,
                "target": self.target, "steps_to_target": self.steps_to_target,
                "predicted_step_seconds": self.step_seconds, "compute_seconds": self.compute_seconds,
                "comm_seconds": self.comm_seconds, "predicted_seconds": self.predicted_seconds,
                "measured_step_seconds": self.measured_step_seconds, "measured_seconds": self.measured_seconds,
                "relative_error": self.relative_error}


def steps_to(history, target: float, metric: str) -> int | None:
    """The first logged step whose ``metric`` reaches ``target`` (None if none does)."""
    if metric not in history.columns:
        raise ValueError(f"forecast: metric={metric!r} is not in the run's history; allowed: "
                         f"{', '.join(c for c in history.columns if c != 'step')}")
    reached = history[history[metric] >= target]
    return int(reached["step"].iloc[0]) if not reached.empty else None


def evaluations_until(experiment: Experiment, step: int | None) -> int:
    if step is None or experiment.eval_every <= 0:
        return 0 if step is None or step < experiment.steps else 1
    return step // experiment.eval_every


def measure_compute(experiment: Experiment, nproc: int) -> tuple[float, float]:
    """(seconds per step, seconds per evaluation) of what one rank computes: ``workers / nproc`` workers in one
    process on the threads a rank gets (``sim.real.distributed.spawn``'s default: the cores shared out)."""
    k = experiment.workers // nproc
    local = experiment.replace(workers=k, steps=COMPUTE_STEPS + 1, eval_every=0, network=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        simulation = Simulation(local)
        state = simulation.initial_state()
        state, _ = simulation.step(state)  # warm-up: allocation, first-call paths
        started = time.perf_counter()
        for _ in range(COMPUTE_STEPS):
            state, _ = simulation.step(state)
        per_step = (time.perf_counter() - started) / COMPUTE_STEPS
        started = time.perf_counter()
        simulation.evaluate(state)
        per_eval = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return per_step, per_eval


def price_comm(network: Network, records: list[LedgerRecord], workers: int) -> float:
    """Seconds of one step's collectives without overlap, plus the step's control votes."""
    vote = LedgerRecord(op="all_reduce", bits=VOTE_BYTES * 8, numel=2, dtype="float64", workers=workers, tag="vote")
    return step_time(network, [*records, *[vote] * VOTES_PER_STEP], workers, overlap="none").comm


def forecast(experiment: Experiment, target: float, *, link: str | ShapedLink | None = None, nproc: int = 2,
             metric: str = "test_accuracy", network: Network | None = None, measure: bool = False,
             timeout: float = 1800.0) -> Forecast:
    """Predicted wall-clock seconds for ``experiment`` to reach ``metric >= target`` on ``nproc`` real gloo
    processes over ``link`` (a shaped link, see ``sim.run_distributed``; None: this machine's loopback), and with
    ``measure=True`` the real run's time beside it. ``network``: the link's calibrated Network (default: calibrate
    now, over the same link and process count)."""
    if not isinstance(experiment, Experiment):
        raise ValueError(f"forecast: experiment={experiment!r} is invalid; allowed: a sim.Experiment")
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 2 or experiment.workers % nproc:
        raise ValueError(f"forecast: nproc={nproc!r} is invalid; allowed: an integer >= 2 dividing "
                         f"workers={experiment.workers}")
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"forecast: target={target!r} is invalid; allowed: a finite number")
    shaped = ShapedLink.parse(link) if link is not None else None
    if network is None:
        network = calibrate((nproc,), "gloo", sizes_for(shaped), link=shaped).networks[nproc]
    if not isinstance(network, Network):
        raise ValueError(f"forecast: network={network!r} is invalid; allowed: a sim.cost.Network")
    step = steps_to(run(experiment).history, target, metric)
    compute, per_eval = measure_compute(experiment, nproc)
    records = one_step_records(experiment)
    result = Forecast(experiment, float(target), metric, shaped.label() if shaped else None, nproc, step, compute,
                      price_comm(network, records, experiment.workers), per_eval,
                      evaluations_until(experiment, step), network)
    if measure:
        real = run_distributed(experiment, nproc=nproc, link=shaped, timeout=timeout)
        seconds = real.extras["step_seconds"]  # steps 2..N, each with its evaluation if any
        result.measured_step_seconds = float(sorted(seconds)[len(seconds) // 2]) if seconds else None
        real_step = steps_to(real.history, target, metric)
        result.real_steps_to_target = real_step
        if real_step is not None and seconds:
            first = result.measured_step_seconds  # step 1 has no stamp before it: count it as a median step
            result.measured_seconds = first + float(sum(seconds[:real_step - 1]))
        else:
            result.measured_seconds = math.inf
    return result


def one_step_records(experiment: Experiment) -> list[LedgerRecord]:
    """The ledger records of one compressed step (the first step after any warm-up: the step the run repeats;
    a rank schedule or adaptive rank changes it later, which this forecast does not follow)."""
    warmup = int(experiment.compressor.get("start_compressing_after_num_steps", 0) or 0)
    simulation = Simulation(experiment.replace(keep_ledger=True, network=None))
    state = simulation.initial_state()
    for _ in range(warmup + 1):
        state, _ = simulation.step(state)
    return list(simulation.comm.ledger.step_records)
