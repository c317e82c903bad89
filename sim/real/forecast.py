"""``sim.forecast``: wall-clock time to a target accuracy on real processes over a link, predicted, and measured.

    f = sim.forecast(experiment, target=0.80, link="100mbit", nproc=2, measure=True)
    f.predicted_seconds, f.measured_seconds, f.relative_error

The prediction multiplies two things the simulator knows without running the real processes:

    seconds to target = steps to target  x  predicted seconds per step

- steps to target: the first evaluated step of ``sim.run(experiment)`` whose ``metric`` reaches ``target``. Real
  processes follow the same trajectory (two processes sum exactly as the virtual collective; more processes
  differ by rounding only), so the simulator's step count is the real one's.
- seconds per step: measured local work + the cost model's price of the step's ledger on the link's calibrated
  network, without overlap (``Simulation.step`` computes every gradient, then aggregates):

      t_step = E[max over ranks of t_local] + sum_records price(record) + 2 price(vote) + sync x collectives

  t_local is measured here, in ``nproc`` processes at once (the cores shared as the real ranks share them):
  each runs the experiment's step with ``k = workers / nproc`` workers and no network (what one rank computes:
  gradients, the compressor's encode/decode, the optimizer), on the threads a rank gets; a synchronous step
  waits for its slowest rank (``expected_slowest``). The two votes are the step's control all-reduces (train
  loss and finiteness; 2 float64 each). ``sync`` (``Network.sync``, seconds per collective, default the
  network's) is what a collective costs inside a running loop beyond its alpha-beta time (docs/cost_model.md:
  1.2 ms per collective on this project's 2-core machine, fitted on real steps); ``fit_sync`` fits it on
  measured forecasts. Evaluation steps add the measured time of one evaluation.

The network: ``network`` (e.g. saved by ``python -m sim calibrate --link 100mbit``), or, by default, a
calibration run now on the shaped link with ``nproc`` processes (about a minute).

Caveats (what the model does not see): load that changes between the local-work measurement and the real run,
how the ranks' collectives interleave with each other's computation, TCP slow start after idle gaps, and the token bucket's burst (messages under it pass at loopback speed:
the calibration's knee). Set ``compression_error_every=0`` in experiments meant to be timed: measuring the
compression error costs an uncompressed all-reduce per step on real processes.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.distributed as dist

from compressors.comm import LedgerRecord
from ..cost.network import Network
from ..cost.step_time import step_time
from ..experiment import Experiment
from ..runner import run
from ..simulation import Simulation
from .calibrate import calibrate, sizes_for
from .calibrate import fit_sync as fit_sync_least_squares
from .distributed import run_distributed, spawn
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
    compute_seconds: float  # per step, the slowest of the nproc ranks' local work (k workers each)
    comm_seconds: float  # per step, the cost model's price of the ledger and the votes (with network.sync)
    eval_seconds: float  # per evaluation
    evaluations_to_target: int
    network: Network = field(repr=False)
    collectives: int = 0  # per step: the ledger's records and the votes (each pays network.sync)
    measured_seconds: float | None = None  # the real run's wall-clock to target (inf: never reached)
    measured_step_seconds: float | None = None  # the real run's median seconds per step
    real_steps_to_target: int | None = None
    measured_history: pd.DataFrame | None = field(default=None, repr=False)  # the real run's, with ``seconds``

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

    def with_sync(self, sync: float) -> "Forecast":
        """This forecast with ``sync`` seconds per collective in place of its network's (``fit_sync``)."""
        if not isinstance(sync, (int, float)) or not math.isfinite(sync) or sync < 0:
            raise ValueError(f"with_sync: sync={sync!r} is invalid; allowed: seconds >= 0")
        comm = self.comm_seconds + (sync - self.network.sync) * self.collectives
        return dataclasses.replace(self, comm_seconds=comm, network=dataclasses.replace(self.network, sync=sync))

    def summary(self) -> dict:
        return {"compressor": self.experiment.compressor.get("name"), "link": self.link, "nproc": self.nproc,
                "target": self.target, "steps_to_target": self.steps_to_target,
                "predicted_step_seconds": self.step_seconds, "compute_seconds": self.compute_seconds,
                "comm_seconds": self.comm_seconds, "sync_seconds": self.network.sync, "collectives": self.collectives,
                "predicted_seconds": self.predicted_seconds,
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


def expected_slowest(samples: list[float], p: int) -> float:
    """E[max of p independent draws] from the empirical distribution of ``samples``: a synchronous step
    waits for its slowest worker (Dutta et al., "Slow and Stale Gradients Can Win the Race", AISTATS 2018).

        E[max] = sum_i x_(i) ((i/n)^p - ((i-1)/n)^p),   x_(1) <= ... <= x_(n)

    p = 1 gives the mean; on a quiet machine (tight distribution) it is close to the median."""
    ordered, n = sorted(samples), len(samples)
    return sum(x * ((i / n) ** p - ((i - 1) / n) ** p) for i, x in enumerate(ordered, start=1))


def local_work(rank: int, world: int, experiment: Experiment, steps: int) -> tuple[list[float], float]:
    """One of ``world`` processes (``spawn``) timing ``steps`` steps of ``experiment`` with no network after a
    warm-up step, all processes at once (after a barrier), then one evaluation: (seconds per step, seconds of
    the evaluation)."""
    dist.barrier()
    simulation = Simulation(experiment)
    state = simulation.initial_state()
    state, _ = simulation.step(state)  # warm-up: allocation, first-call paths
    samples = []
    for _ in range(steps):
        started = time.perf_counter()
        state, _ = simulation.step(state)
        samples.append(time.perf_counter() - started)
    started = time.perf_counter()
    simulation.evaluate(state)
    return samples, time.perf_counter() - started


def measure_compute(experiment: Experiment, nproc: int) -> tuple[float, float]:
    """(seconds per step, seconds per evaluation) of what the ranks compute: ``workers / nproc`` workers per
    process, in ``nproc`` processes at once on the threads each gets (as ``sim.run_distributed`` starts them),
    so the samples carry the share of the cores the real ranks will get; a step costs the expected slowest of
    the ``nproc`` ranks' local work."""
    local = experiment.replace(workers=experiment.workers // nproc, steps=COMPUTE_STEPS + 1, eval_every=0,
                               network=None)
    runs = spawn(local_work, nproc, (local, COMPUTE_STEPS), timeout=600.0)
    samples = [t for run_samples, _ in runs for t in run_samples]
    return expected_slowest(samples, nproc), max(per_eval for _, per_eval in runs)


def with_wall_clock(history: pd.DataFrame, step_seconds: list[float]) -> pd.DataFrame:
    """``history`` with column ``seconds``: the real run's wall-clock at the end of each logged step, counted
    from the start of its first step (``step_seconds``: steps 2..N as ``run_distributed`` stamps them; the
    first step, which has no stamp before it, counts as a median step)."""
    first = statistics.median(step_seconds) if step_seconds else math.nan
    elapsed = [first]
    for seconds in step_seconds:
        elapsed.append(elapsed[-1] + seconds)
    return history.assign(seconds=[elapsed[int(step) - 1] if 1 <= step <= len(elapsed) else math.nan
                                   for step in history["step"]])


def fit_sync(forecasts: list[Forecast]) -> float:
    """``Network.sync`` (seconds per collective) fitted on measured forecasts: least squares through the origin
    of their measured minus predicted (without sync) seconds per step over their collectives per step
    (``sim.real.calibrate.fit_sync``). Fit it on some runs (e.g. the uncompressed ones) and judge the others
    with ``forecast.with_sync(sync)``."""
    measured = [f for f in forecasts if f.measured_step_seconds is not None]
    if not measured:
        raise ValueError("fit_sync: forecasts are invalid; allowed: forecasts made with measure=True")
    gaps = [f.measured_step_seconds - f.with_sync(0.0).step_seconds for f in measured]
    return fit_sync_least_squares(gaps, [f.collectives for f in measured])


def price_comm(network: Network, records: list[LedgerRecord], workers: int) -> tuple[float, int]:
    """(seconds of one step's collectives without overlap, the step's control votes included, with the
    network's ``sync`` per collective; how many collectives that is)."""
    vote = LedgerRecord(op="all_reduce", bits=VOTE_BYTES * 8, numel=2, dtype="float64", workers=workers, tag="vote")
    priced = step_time(network, [*records, *[vote] * VOTES_PER_STEP], workers, overlap="none")
    return priced.comm, priced.collectives


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
    comm, collectives = price_comm(network, records, experiment.workers)
    result = Forecast(experiment, float(target), metric, shaped.label() if shaped else None, nproc, step, compute,
                      comm, per_eval, evaluations_until(experiment, step), network, collectives)
    if measure:
        real = run_distributed(experiment, nproc=nproc, link=shaped, timeout=timeout)
        seconds = real.extras["step_seconds"]  # steps 2..N, each with its evaluation if any
        result.measured_step_seconds = statistics.median(seconds) if seconds else None
        result.measured_history = with_wall_clock(real.history, seconds)
        real_step = steps_to(real.history, target, metric)
        result.real_steps_to_target = real_step
        timed = result.measured_history.set_index("step")["seconds"]
        result.measured_seconds = float(timed[real_step]) if real_step is not None and seconds else math.inf
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
