"""Tenant isolation, the same for every tier: no get, contains, list, stats or clear across tenants."""

from __future__ import annotations

import pytest

from slimkv.store import DiskTier, MemoryTier, RedisTier, TierStack, frame

from .conftest import NO_REDIS
from .helpers import make_key


@pytest.fixture(params=["memory", "disk", "redis", "stack"])
def tier(request, tmp_path):
    if request.param == "memory":
        yield MemoryTier()
    elif request.param == "disk":
        yield DiskTier(tmp_path / "disk")
    elif request.param == "redis":
        if NO_REDIS:
            pytest.skip(NO_REDIS)
        yield RedisTier(request.getfixturevalue("redis_server").url)
    else:
        stack = TierStack([MemoryTier(), DiskTier(tmp_path / "disk")])
        yield _FlushingStack(stack)
        stack.close()


class _FlushingStack:
    """A stack whose puts land in every tier before returning, so lower tiers are checked too."""

    def __init__(self, stack: TierStack) -> None:
        self.stack = stack

    def put(self, key, blob):
        ok = self.stack.put(key, blob)
        self.stack.flush()
        return ok

    def __getattr__(self, name):
        return getattr(self.stack, name)


def _blob(text: bytes) -> bytes:
    return frame.pack({}, [text])  # tiers outside the process only return verified envelopes


def _entries(tier, namespace):
    stats = tier.stats(namespace)
    return sum(s.entries for s in stats.tiers) if hasattr(stats, "tiers") else stats.entries


def test_tenants_never_see_each_other(tier):
    acme, globex = make_key(0, tenant="acme"), make_key(0, tenant="globex")  # same tokens, same model
    assert acme.digest == globex.digest and acme.id != globex.id
    tier.put(acme, _blob(b"secret of acme"))
    assert tier.get(globex) is None and not tier.contains(globex)
    assert tier.list("globex") == [] and tier.list("acme") == [acme.digest]
    assert _entries(tier, "globex") == 0 and _entries(tier, "acme") >= 1
    tier.put(globex, _blob(b"secret of globex"))
    tier.clear("globex")
    assert tier.get(acme) == _blob(b"secret of acme") and tier.get(globex) is None


def test_a_shared_namespace_is_shared_only_by_those_who_name_it(tier):
    writer = make_key(1, tenant="acme", shared="team")
    reader = make_key(1, tenant="globex", shared="team")
    outsider = make_key(1, tenant="initech")
    tier.put(writer, _blob(b"shared prefix"))
    assert tier.get(reader) == _blob(b"shared prefix")
    assert tier.get(outsider) is None and _entries(tier, "initech") == 0
