"""Chunk keys: what makes stored KV reusable, hashed deterministically.

Contract: the engine builds one :class:`KeySpec` per (tenant, model, cache layout) and calls
:func:`chunk_keys` on a prompt's token ids to get one :class:`ChunkKey` per *full* chunk, or
:func:`prompt_key` for one entry covering a whole prompt (a compressed cache stored once and queried
many times). Tiers only see ``key.namespace`` (isolation and scoping) and ``key.digest`` (identity).

Hashing (after vLLM's chained block hashes): the chain starts from a seed that hashes every
compatibility field (key format version, model fingerprint, KV dtype, codec, chunk size); chunk ``i``'s
digest is ``blake2b(digest[i-1] || tokens[i * size : (i + 1) * size] as little-endian int64)``. Equal
digests therefore mean the same model, dtype, layout *and* the same whole token prefix, not just the
same chunk. Python's salted ``hash()`` is never used: digests are stable across processes and hosts.

Isolation: a key's ``namespace`` is its tenant, unless the spec names a ``shared_namespace``; then
every tenant configured with that same shared namespace reads and writes the same entries. Tiers scope
``get``/``contains``/``list``/``stats``/``clear`` by namespace and never cross one, so a tenant cannot
read, list or probe (time) another tenant's prefixes unless both opted into one shared namespace. The
namespace is *not* part of the digest: sharing is decided by where an entry lives, not by what it is.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError

#: Bumped when the key derivation changes, so old entries stop matching instead of being misread.
KEY_VERSION = "slimkv-key-v1"
DIGEST_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DIGEST = re.compile(rf"^[0-9a-f]{{{2 * DIGEST_BYTES}}}$")


def check_namespace(name: str) -> str:
    """Return ``name`` if it is a valid namespace (safe as a folder name and inside a Redis key)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid namespace {name!r}: expected 1-64 characters from [A-Za-z0-9_.-], starting with a "
            "letter or digit (it becomes a folder name and part of a Redis key)"
        )
    return name


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a lowercase hex digest of :data:`DIGEST_BYTES` bytes."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InputError(f"invalid chunk digest {digest!r}: expected {2 * DIGEST_BYTES} lowercase hex digits")
    return digest


@dataclass(frozen=True)
class KeySpec:
    """Everything besides the tokens that decides whether stored KV can be reused.

    tenant:           who owns the entries (a namespace name, see :func:`check_namespace`)
    model:            model fingerprint given by the caller, e.g. sha256 of config + weights manifest
    dtype:            dtype of the stored keys and values, e.g. ``"bfloat16"``
    codec:            layout / codec of the payload: ``"raw"`` for plain KV, or the compressor and its
                      parameters for compressed entries, e.g. ``"snapkv:ratio=0.5,window=32"``
    chunk_size:       tokens per chunk (> 0)
    shared_namespace: if set, keys live in this namespace instead of the tenant's own, so tenants that
                      name the same shared namespace reuse each other's entries (opt-in sharing)
    """

    tenant: str
    model: str
    dtype: str
    codec: str = "raw"
    chunk_size: int = 256
    shared_namespace: str | None = None

    def __post_init__(self) -> None:
        check_namespace(self.tenant)
        if self.shared_namespace is not None:
            check_namespace(self.shared_namespace)
        for name in ("model", "dtype", "codec"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"KeySpec.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ConfigError(f"KeySpec.chunk_size must be a positive integer, got {self.chunk_size!r}")

    @property
    def namespace(self) -> str:
        """Where this spec's entries live: the shared namespace if one is set, else the tenant."""
        return self.shared_namespace or self.tenant

    def seed(self, kind: str = "chunk") -> bytes:
        """Root of the hash chain: a digest of every compatibility field (and the entry kind)."""
        fields = (KEY_VERSION, kind, self.model, self.dtype, self.codec, str(self.chunk_size))
        # length-prefix every field so that no two field lists serialise to the same bytes
        data = b"".join(len(f.encode()).to_bytes(4, "little") + f.encode() for f in fields)
        return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True)
class ChunkKey:
    """The identity of one stored entry.

    namespace: tenant (or shared) namespace the entry lives in; tiers scope everything by it
    digest:    hex chained hash of the compatibility fields and the whole token prefix
    tokens:    number of prompt tokens the entry covers, counted from the start of the prompt
    """

    namespace: str
    digest: str
    tokens: int

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_digest(self.digest)

    @property
    def id(self) -> str:
        """``"<namespace>/<digest>"``: the tenant is a prefix so tiers can list and evict per tenant."""
        return f"{self.namespace}/{self.digest}"


def _as_ids(token_ids: Sequence[int]) -> np.ndarray:
    """Token ids as an int64 numpy array (tensors on any device are copied to the CPU first)."""
    if hasattr(token_ids, "cpu"):
        token_ids = token_ids.cpu()
    return np.asarray(token_ids, dtype=np.int64)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    arr = _as_ids(token_ids)
    if arr.ndim != 1:
        raise InputError(f"token ids must be one flat sequence, got shape {tuple(arr.shape)}")
    return arr.astype("<i8", copy=False).tobytes()


def chain_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """One link of the chain: ``blake2b(parent || token ids as little-endian int64)``."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
    h.update(_token_bytes(token_ids))
    return h.digest()


def chunk_keys(token_ids: Sequence[int], spec: KeySpec) -> list[ChunkKey]:
    """Keys of the full chunks of ``token_ids`` (a trailing partial chunk gets no key).

    token_ids: the prompt's token ids (a list, a 1-D numpy array or a 1-D tensor)
    Returns ``len(token_ids) // spec.chunk_size`` keys; key ``i`` covers tokens ``[0, (i+1)*size)``.
    """
    ids = _as_ids(token_ids)
    size = spec.chunk_size
    parent = spec.seed("chunk")
    keys = []
    for i in range(len(ids) // size):
        parent = chain_digest(parent, ids[i * size : (i + 1) * size])
        keys.append(ChunkKey(spec.namespace, parent.hex(), (i + 1) * size))
    return keys


def prompt_key(token_ids: Sequence[int], spec: KeySpec) -> ChunkKey:
    """One key for a whole prompt (e.g. its compressed cache), chained like :func:`chunk_keys`.

    The chain uses a different seed kind than chunks, so a prompt key never equals a chunk key, and
    it hashes the prompt chunk by chunk plus the trailing partial chunk, so the digest depends on the
    exact length of the prompt.
    """
    ids = _as_ids(token_ids)
    size = spec.chunk_size
    parent = spec.seed("prompt")
    for start in range(0, len(ids), size):
        parent = chain_digest(parent, ids[start : start + size])
    if len(ids) == 0:
        parent = chain_digest(parent, ids)
    return ChunkKey(spec.namespace, parent.hex(), len(ids))
