"""The registry: ``compressors.make(name, **options)`` builds any registered aggregator.

A factory is a function of keyword-only options with defaults; its signature is the list of allowed
options, so unknown names are caught (with the closest suggestion) before the factory runs, and the
factory validates values. ``REGISTRY`` maps name -> factory.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

from .base import Aggregator
from .options import check_known_options, closest

Factory = Callable[..., Aggregator]
REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    def decorate(factory: Factory) -> Factory:
        if name in REGISTRY:
            raise ValueError(f"compressor {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory
    return decorate


def options_of(name: str) -> dict[str, object]:
    """The options a compressor accepts, with their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY}


def make(name: str, **options) -> Aggregator:
    """Build a registered aggregator; every invalid name or option raises ValueError naming it."""
    factory = _factory(name)
    check_known_options(f"compressor {name!r}", options, options_of(name))
    return factory(**options)


def _factory(name: str) -> Factory:
    if not isinstance(name, str) or name not in REGISTRY:
        hint = closest(name, REGISTRY) if isinstance(name, str) else ""
        raise ValueError(f"compressor: name={name!r} is invalid{hint}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
