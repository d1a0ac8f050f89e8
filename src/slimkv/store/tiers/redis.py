"""Remote tier on a Redis server, shareable by every engine replica (see ``base.py`` for the contract).

Keys: ``<prefix>:<namespace>:<digest>`` hold blobs; ``<prefix>:_meta:lru`` (sorted set, score = last
use) and ``<prefix>:_meta:bytes`` (counter) track recency and size. Namespaces cannot contain ``:`` or
start with ``_``, so a namespace's ``SCAN`` pattern matches only its own keys. Writes, deletes and
evictions run as Lua scripts, so the size counter stays consistent with the stored values across
clients. The byte capacity is enforced by this accounting (the server's own ``maxmemory`` is left
alone: it is the operator's setting); eviction drops least recently used entries until the total is
under ``evict_to * capacity_bytes``. The scripts touch keys they compute, which standalone Redis
allows and Redis Cluster does not.

Failure policy: the tier never raises out of ``get``/``put``/``contains``/``delete``. A connection
error or timeout (short socket timeouts, no client retries) logs one warning, marks the tier
unhealthy and turns every operation into a miss or a dropped write without touching the network for
``retry_after`` seconds; the next call after that tries again and, on success, marks it healthy. A
server error reply (e.g. out of memory) is logged and counted, and only that operation fails. Every
read is verified; a corrupt value is deleted and reported as a miss.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import ConfigError
from .. import frame
from ..errors import CorruptChunk, StoreError
from ..keys import ChunkKey
from .base import Tier

log = logging.getLogger(__name__)
T = TypeVar("T")

_PUT = """
local old = redis.call('STRLEN', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
return redis.call('INCRBY', KEYS[3], string.len(ARGV[1]) - old)
"""
_DELETE = """
local size = redis.call('STRLEN', KEYS[1])
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
if n > 0 then redis.call('DECRBY', KEYS[3], size) end
return n
"""
_EVICT = """
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local target = tonumber(ARGV[1])
local evicted = {}
while used > target and #evicted < tonumber(ARGV[2]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then
    redis.call('SET', KEYS[2], 0)
    break
  end
  local size = redis.call('STRLEN', oldest[1])
  redis.call('DEL', oldest[1])
  redis.call('ZREM', KEYS[1], oldest[1])
  used = redis.call('DECRBY', KEYS[2], size)
  table.insert(evicted, oldest[1])
end
return evicted
"""
SCAN_COUNT = 500
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # no glob characters: SCAN patterns stay exact
MAX_EVICTIONS_PER_PUT = 10_000


class RedisTier(Tier):
    """Blobs on a Redis server at ``url`` (e.g. ``redis://127.0.0.1:6379/0``).

    prefix: first part of every key, so several stores can share one server
    timeout: socket connect and read timeout in seconds (keep it short: a slow remote is a miss)
    retry_after: seconds an unhealthy tier waits before touching the network again
    """

    name = "redis"
    verifies_reads = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", capacity_bytes: int = 1 << 30,
                 prefix: str = "slimkv", timeout: float = 0.25, retry_after: float = 5.0,
                 evict_to: float = 0.9) -> None:
        super().__init__(capacity_bytes)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise StoreError("the redis tier needs the redis client: pip install redis") from exc
        if not _PREFIX.match(prefix):
            raise ConfigError(
                f"invalid redis key prefix {prefix!r}: expected 1-64 characters from [A-Za-z0-9_.-]"
            )
        if not 0.0 < evict_to <= 1.0:
            raise ConfigError(f"evict_to must lie in (0, 1], got {evict_to}")
        self.url, self.prefix, self.retry_after, self.evict_to = url, prefix, retry_after, evict_to
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._reply_error = redis.exceptions.RedisError
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0,
        )
        self._put_script = self._client.register_script(_PUT)
        self._delete_script = self._client.register_script(_DELETE)
        self._evict_script = self._client.register_script(_EVICT)
        self._lru, self._bytes = f"{prefix}:_meta:lru", f"{prefix}:_meta:bytes"
        self._healthy, self._retry_at = True, 0.0
        self._call(self._client.ping, None)

    # ------------------------------------------------------------------ failure policy
    @property
    def healthy(self) -> bool:
        """False after a connection error or timeout, until a later call succeeds."""
        return self._healthy

    def _call(self, fn: Callable[[], T], default: T, namespace: str | None = None) -> T:
        """Run one server interaction; any failure becomes ``default`` (and a warning)."""
        if not self._healthy and time.monotonic() < self._retry_at:
            return default
        try:
            result = fn()
        except self._errors as exc:
            if self._healthy:
                log.warning("redis tier %s unreachable (%s); reads miss and writes are dropped, retrying "
                            "every %.1fs", self.url, exc, self.retry_after)
            self._healthy, self._retry_at = False, time.monotonic() + self.retry_after
            if namespace is not None:
                self.counters.add(namespace, "errors")
            return default
        except self._reply_error as exc:
            log.warning("redis tier %s: server error: %s", self.url, exc)
            if namespace is not None:
                self.counters.add(namespace, "errors")
            return default
        if not self._healthy:
            log.info("redis tier %s reachable again", self.url)
            self._healthy = True
        return result

    # ------------------------------------------------------------------ operations
    def _key(self, key: ChunkKey) -> str:
        return f"{self.prefix}:{key.namespace}:{key.digest}"

    def put(self, key: ChunkKey, blob: bytes) -> bool:
        if len(blob) > self.capacity_bytes:
            return False
        keys = [self._key(key), self._lru, self._bytes]
        used = self._call(lambda: self._put_script(keys=keys, args=[bytes(blob), time.time()]), None,
                          key.namespace)
        if used is None:
            return False
        self.counters.add(key.namespace, "puts")
        if int(used) > self.capacity_bytes:
            target = int(self.capacity_bytes * self.evict_to)
            evicted = self._call(lambda: self._evict_script(
                keys=[self._lru, self._bytes], args=[target, MAX_EVICTIONS_PER_PUT]), [])
            for name in evicted:
                self.counters.add(name.decode().split(":")[1], "evictions")
        return True

    def get(self, key: ChunkKey) -> bytes | None:
        name = self._key(key)

        def fetch() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(name)
            pipe.zadd(self._lru, {name: time.time()}, xx=True)  # refresh recency if present
            return pipe.execute()[0]

        blob = self._call(fetch, None, key.namespace)
        if blob is None:
            self.counters.add(key.namespace, "misses")
            return None
        try:
            frame.verify(blob)
        except CorruptChunk as exc:
            log.warning("redis tier: deleting corrupt entry %s: %s", name, exc)
            self.delete(key)
            self.counters.add(key.namespace, "corrupt")
            self.counters.add(key.namespace, "misses")
            return None
        self.counters.add(key.namespace, "hits")
        return blob

    def contains(self, key: ChunkKey) -> bool:
        return bool(self._call(lambda: self._client.exists(self._key(key)), 0, key.namespace))

    def delete(self, key: ChunkKey) -> bool:
        keys = [self._key(key), self._lru, self._bytes]
        return bool(self._call(lambda: self._delete_script(keys=keys), 0, key.namespace))

    def _names(self, namespace: str | None) -> list[bytes]:
        pattern = f"{self.prefix}:{namespace}:*" if namespace else f"{self.prefix}:*"
        names = self._call(lambda: list(self._client.scan_iter(match=pattern, count=SCAN_COUNT)), [])
        return [n for n in names if not n.startswith(f"{self.prefix}:_meta:".encode())]

    def list(self, namespace: str) -> list[str]:
        return [n.decode().rsplit(":", 1)[1] for n in self._names(namespace)]

    def _usage(self, namespace: str) -> tuple[int, int]:
        names = self._names(namespace)

        def sizes() -> list[int]:
            pipe = self._client.pipeline(transaction=False)
            for n in names:
                pipe.strlen(n)
            return pipe.execute()

        return len(names), sum(self._call(sizes, []) if names else [])

    def _clear(self, namespace: str | None) -> int:
        removed = 0
        for name in self._names(namespace):
            keys = [name, self._lru, self._bytes]
            removed += int(self._call(lambda keys=keys: self._delete_script(keys=keys), 0))
        if namespace is None:
            self._call(lambda: self._client.delete(self._lru, self._bytes), 0)
        return removed

    def used_bytes(self) -> int:
        return int(self._call(lambda: self._client.get(self._bytes), None) or 0)

    def close(self) -> None:
        self._call(self._client.close, None)
