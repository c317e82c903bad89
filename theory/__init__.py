"""Formulas of compressed SGD as pure functions, each with its equation, assumptions and source.

Modules: ``operators`` (delta/omega classes), ``bits`` (bits per step, ratios), ``lowrank`` (Eckart-Young,
PowerSGD projections, subspace iteration), ``error_feedback`` (memory bound, EF-SGD/EF21 rates),
``collectives`` (alpha-beta costs of all-reduce, all-gather, ...).
"""
from . import bits, collectives, error_feedback, lowrank, operators  # noqa: F401

__all__ = ["bits", "collectives", "error_feedback", "lowrank", "operators"]
