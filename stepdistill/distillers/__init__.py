"""Distillation methods, registered by name.

A method is one module defining a Distiller subclass decorated with @register("name").
Modules listed in METHOD_MODULES are imported on first lookup.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import REGISTRY, Distiller, DistillerConfig, register

METHOD_MODULES = ["diffusion", "consistency", "progressive", "rectified_flow"]


def _import_all() -> None:
    for mod in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def available_methods() -> list[str]:
    _import_all()
    return sorted(k for k, v in REGISTRY.items() if not v.hidden)


def family_methods(family: str) -> tuple[str, ...]:
    """The registered methods a family's training script runs (Distiller.family)."""
    return tuple(m for m in available_methods() if REGISTRY[m].family == family)


def get_distiller_class(name: str) -> type[Distiller]:
    _import_all()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return REGISTRY[name]


__all__ = ["Distiller", "DistillerConfig", "register", "get_distiller_class", "available_methods", "family_methods"]
