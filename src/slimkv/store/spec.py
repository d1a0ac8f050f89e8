"""The command-line syntax of a store: tiers fastest first, separated by commas.

Grammar (options after ``?`` are ``name=value`` pairs joined by ``&``)::

    memory[?capacity=SIZE]
    disk:PATH[?capacity=SIZE&fsync=true]
    redis://HOST[:PORT][/DB][?capacity=SIZE&prefix=NAME&timeout=SECONDS]   (also rediss://)

Examples: ``memory``, ``memory?capacity=2GiB,disk:/var/cache/slimkv``,
``memory,disk:/tmp/kv?capacity=50GB,redis://127.0.0.1:6379/0?prefix=team``. SIZE is a number of
bytes with an optional unit (B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in powers of
1024). Paths may not contain ``,`` or ``?``. :func:`parse_tier_configs` only parses (no I/O);
:func:`parse_store_spec` also builds the :class:`~slimkv.store.stack.TierStack`. Every mistake raises a
:class:`~slimkv.errors.ConfigError` that names the offending part and shows the expected syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigError
from .stack import TierStack
from .tiers.base import Tier
from .tiers.disk import DiskTier
from .tiers.memory import MemoryTier
from .tiers.redis import RedisTier

SYNTAX = "memory[?capacity=SIZE], disk:PATH[?capacity=SIZE&fsync=true], redis://HOST:PORT[/DB][?capacity=SIZE]"
DEFAULT_CAPACITY = {"memory": 1 << 30, "disk": 10 << 30, "redis": 1 << 30}
_OPTIONS = {"memory": {"capacity"}, "disk": {"capacity", "fsync"}, "redis": {"capacity", "prefix", "timeout"}}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``"512MiB"``, ``"2GB"``, ``"1000"``; raises :class:`ConfigError` otherwise."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f"invalid size {text!r}: expected a number with an optional unit, e.g. 512MiB or 2GB"
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"invalid size {text!r}: must be more than 0 bytes")
    return size


@dataclass(frozen=True)
class TierConfig:
    """One parsed tier.

    kind: ``"memory"``, ``"disk"`` or ``"redis"``
    location: the disk folder or the Redis URL (without the options above); empty for memory
    capacity_bytes: byte capacity of the tier
    fsync: disk only, fsync every written file
    prefix, timeout: redis only, key prefix and socket timeout in seconds
    """

    kind: str
    location: str = ""
    capacity_bytes: int = 1 << 30
    fsync: bool = False
    prefix: str = "slimkv"
    timeout: float = 0.25

    def build(self) -> Tier:
        if self.kind == "memory":
            return MemoryTier(self.capacity_bytes)
        if self.kind == "disk":
            return DiskTier(self.location, self.capacity_bytes, fsync=self.fsync)
        return RedisTier(self.location, self.capacity_bytes, prefix=self.prefix, timeout=self.timeout)


def _options(item: str, kind: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=True) if query else []
    except ValueError as exc:
        raise ConfigError(
            f"store tier {item!r}: malformed options {query!r}; expected name=value&..."
        ) from exc
    options = dict(pairs)
    unknown = set(options) - _OPTIONS[kind]
    if unknown or len(options) != len(pairs):
        raise ConfigError(
            f"store tier {item!r}: unknown or repeated option(s) {sorted(unknown) or query!r}; "
            f"{kind} accepts {sorted(_OPTIONS[kind])}"
        )
    return options


def _parse_tier(item: str) -> TierConfig:
    head, _, query = item.partition("?")
    if head == "memory":
        kind, location = "memory", ""
    elif head.startswith("disk:"):
        kind, location = "disk", head.removeprefix("disk:").strip()
        if not location:
            raise ConfigError(
                f"store tier {item!r}: the disk tier needs a folder, e.g. disk:/var/cache/slimkv"
            )
    elif head.startswith(("redis://", "rediss://")):
        kind, location = "redis", head
        try:
            parts = urlsplit(head)
            host, _port = parts.hostname, parts.port
        except ValueError as exc:
            raise ConfigError(f"store tier {item!r}: invalid Redis URL: {exc}") from exc
        if not host:
            raise ConfigError(f"store tier {item!r}: the Redis URL needs a host, e.g. redis://127.0.0.1:6379")
    else:
        raise ConfigError(f"unknown store tier {item!r}; expected one of: {SYNTAX}")
    options = _options(item, kind, query)
    config = TierConfig(kind, location, parse_size(options.get("capacity", str(DEFAULT_CAPACITY[kind]))))
    if "fsync" in options:
        value = options["fsync"].lower()
        if value not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"store tier {item!r}: fsync must be true or false, got {options['fsync']!r}")
        config = replace(config, fsync=value in ("1", "true", "yes"))
    if "prefix" in options:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", options["prefix"]):
            raise ConfigError(
                f"store tier {item!r}: the Redis key prefix must be 1-64 characters from [A-Za-z0-9_.-]"
            )
        config = replace(config, prefix=options["prefix"])
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 60:
            raise ConfigError(
                f"store tier {item!r}: timeout must be seconds in (0, 60], got {options['timeout']!r}"
            )
        config = replace(config, timeout=timeout)
    return config


def parse_tier_configs(spec: str) -> list[TierConfig]:
    """Parse a store spec (see the module docstring) into tier configs, fastest first; no I/O."""
    items = [item.strip() for item in spec.split(",")] if spec else []
    if not items or any(not item for item in items):
        raise ConfigError(
            f"invalid store spec {spec!r}: expected comma-separated tiers, e.g. memory,disk:/path"
        )
    configs = [_parse_tier(item) for item in items]
    kinds = [c.kind for c in configs]
    if kinds.count("memory") > 1:
        raise ConfigError(f"invalid store spec {spec!r}: at most one memory tier")
    locations = [(c.kind, c.location) for c in configs if c.kind != "memory"]
    if len(set(locations)) != len(locations):
        raise ConfigError(f"invalid store spec {spec!r}: the same disk folder or Redis URL appears twice")
    return configs


def parse_store_spec(spec: str, queue_size: int = 256) -> TierStack:
    """Build the :class:`TierStack` a spec describes (creates folders, connects to Redis)."""
    return TierStack([config.build() for config in parse_tier_configs(spec)], queue_size=queue_size)
