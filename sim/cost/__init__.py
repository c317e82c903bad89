"""The cost model: from a step's ledger to seconds, on a network of alpha-beta links.

    net = sim.cost.resolve_network("ethernet-10g")           # a preset, a dict, a .json path or a Network
    seconds = sim.cost.price_step(net, ledger.step_records, workers=16, compute_seconds=0.05)
    table = sim.whatif(shapes, compressors=["identity", {"name": "powersgd", "rank": 2}], workers=[16], networks=[net])

Modules: ``network`` (Network, hierarchical topology, JSON), ``presets`` (named networks with sources),
``step_time`` (overlap of communication with backward), ``compute`` (compute and encode/decode time),
``whatif`` (tables over compressors x workers x networks, each time column with its source; ``does_it_pay``
the compact speedup view), ``calibrate`` (fit alpha, beta to real gloo runs).
"""
from .compute import ACCELERATORS, ComputeTime, compute_from_flops, measure_codec, measure_compute
from .network import ALGORITHMS, Network
from .presets import PRESETS, preset, resolve_network
from .step_time import OVERLAPS, StepTime, price_step, step_time
from .whatif import MODELS, does_it_pay, format_does_it_pay, time_to_accuracy, whatif

__all__ = ["ACCELERATORS", "ComputeTime", "compute_from_flops", "measure_codec", "measure_compute",
           "ALGORITHMS", "Network", "PRESETS", "preset", "resolve_network", "OVERLAPS", "StepTime",
           "price_step", "step_time", "whatif", "time_to_accuracy", "MODELS", "does_it_pay", "format_does_it_pay"]

