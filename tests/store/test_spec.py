"""The --store syntax: valid specs parse to the expected tiers, mistakes are ConfigErrors."""

from __future__ import annotations

import pytest

from slimkv.errors import ConfigError
from slimkv.store import DiskTier, MemoryTier, TierConfig, parse_size, parse_store_spec, parse_tier_configs


def test_a_full_spec_parses():
    configs = parse_tier_configs(
        "memory?capacity=2GiB, disk:/var/cache/kv?capacity=50GB&fsync=true, redis://127.0.0.1:6379/2?prefix=team&timeout=0.5"
    )
    assert configs == [
        TierConfig("memory", "", 2 << 30),
        TierConfig("disk", "/var/cache/kv", 50 * 10**9, fsync=True),
        TierConfig("redis", "redis://127.0.0.1:6379/2", 1 << 30, prefix="team", timeout=0.5),
    ]


def test_the_brief_example_and_defaults():
    kinds = [c.kind for c in parse_tier_configs("memory,disk:/path,redis://127.0.0.1:6379")]
    assert kinds == ["memory", "disk", "redis"]


@pytest.mark.parametrize(
    "text, size", [("1000", 1000), ("512MiB", 512 << 20), ("2gb", 2 * 10**9), ("1.5KiB", 1536)]
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("spec, message", [
    ("", "comma-separated"),
    ("memory,,disk:/x", "comma-separated"),
    ("tape", "unknown store tier"),
    ("disk:", "needs a folder"),
    ("disk:/x?capacity=lots", "invalid size"),
    ("disk:/x?capacity=0", "more than 0"),
    ("memory?colour=red", "unknown or repeated"),
    ("memory?capacity", "malformed options"),
    ("redis://", "needs a host"),
    ("redis://host:port", "invalid Redis URL"),
    ("redis://h?timeout=-1", "timeout"),
    ("redis://h?prefix=a:b", "prefix"),
    ("disk:/x?fsync=maybe", "fsync"),
    ("memory,memory", "at most one memory"),
    ("disk:/x,disk:/x", "twice"),
])
def test_mistakes_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_tier_configs(spec)


def test_parse_store_spec_builds_the_stack(tmp_path):
    with parse_store_spec(f"memory?capacity=1MiB,disk:{tmp_path}") as stack:
        assert [type(t) for t in stack.tiers] == [MemoryTier, DiskTier]
        assert stack.tiers[0].capacity_bytes == 1 << 20 and stack.tiers[1].root == tmp_path
