"""Compressors by name: ``register`` a class once, ``make_compressor("snapkv", ratio=0.5)`` anywhere.

Compositions are named by joining registered names with ``+`` in the order they act:
``make_compressor("snapkv+kivi2", ratio=0.5)`` (see ``compose.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Compressor

_REGISTRY: dict[str, type[Compressor]] = {}


@dataclass(frozen=True)
class MethodInfo:
    """What ``slimkv methods`` lists about a registered compressor."""

    name: str
    kind: str
    phases: tuple[str, ...]
    default_phase: str
    paper: str
    summary: str
    params: tuple[str, ...]


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make a compressor available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` class attribute to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"compressor name {cls.name!r} is already taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def method_info(name: str) -> MethodInfo:
    cls = _lookup(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    base = {f.name for f in dataclasses.fields(Compressor)}
    return MethodInfo(
        name=cls.name, kind=cls.kind, phases=cls.supported_phases, default_phase=cls.default_phase,
        paper=cls.paper, summary=doc[0] if doc else "",
        params=tuple(f.name for f in dataclasses.fields(cls) if f.name not in base and f.init),
    )


def methods() -> list[MethodInfo]:
    return [method_info(n) for n in names()]


def _lookup(name: str) -> type[Compressor]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown compressor {name!r}; valid compressors: {', '.join(names())} "
            "(`slimkv methods` lists them with their papers)"
        ) from None


def make_compressor(
    name: str, ratio: float | None = None, budget: int | None = None, phase: str | None = None,
    **params: object,
) -> Compressor:
    """Build a registered compressor, or a composition ``a+b`` of them (``compose.py``).

    Raises :class:`ConfigError` on any invalid setting, at configuration time.
    """
    if "+" in name:
        if params:
            raise ConfigError(
                f"{name}: method parameters ({', '.join(sorted(params))}) cannot be given to a composition "
                "by name; build a `Pipeline` of configured methods in Python"
            )
        from .compose import compose

        return compose([part.strip() for part in name.split("+")], ratio=ratio, budget=budget, phase=phase)
    cls = _lookup(name)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"{name} has no parameter {unknown[0]!r}; its parameters: "
            f"{', '.join(sorted(allowed - {'ratio', 'budget', 'phase'})) or 'none'}"
        )
    return cls(ratio=ratio, budget=budget, phase=phase, **params)  # type: ignore[arg-type]
