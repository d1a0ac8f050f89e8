"""The envelope around every stored blob: magic, version, lengths, a JSON header and a checksum.

Contract: the codec calls :func:`pack` to wrap a JSON-able header and a body, and :func:`unpack` to
get them back; tiers that keep bytes outside this process (disk, Redis) call :func:`verify` on every
read. Any mismatch raises :class:`~slimkv.store.errors.CorruptChunk`. Nothing here knows about tensors.

Layout (little-endian)::

    0   magic       4 bytes  b"SKVF"
    4   version     uint16   FORMAT_VERSION
    6   flags       uint16   0 (reserved)
    8   header_len  uint32   bytes of the UTF-8 JSON header
    12  body_len    uint64   bytes of the body
    20  checksum    16 bytes blake2b-128 over bytes [0, 20) + header + body
    36  header, then body
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import Any

from .errors import CorruptChunk

MAGIC = b"SKVF"
FORMAT_VERSION = 1
CHECKSUM_BYTES = 16
#: Headers describe tensors, not data; anything larger is not a header we wrote.
MAX_HEADER_BYTES = 1 << 20
_PREFIX = struct.Struct("<4sHHIQ")
PREFIX_BYTES = _PREFIX.size + CHECKSUM_BYTES  # 36

Buffer = bytes | bytearray | memoryview


def _checksum(prefix: Buffer, parts: Iterable[Buffer]) -> bytes:
    h = hashlib.blake2b(prefix, digest_size=CHECKSUM_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


def pack(header: dict[str, Any], body: Iterable[Buffer]) -> bytes:
    """One blob from a JSON-able ``header`` and the body parts (concatenated in order)."""
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    parts = [memoryview(p).cast("B") for p in body]
    body_len = sum(p.nbytes for p in parts)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), body_len)
    checksum = _checksum(prefix, [head, *parts])
    return b"".join([prefix, checksum, head, *parts])


def _split(blob: Buffer) -> tuple[memoryview, memoryview, memoryview, bytes]:
    """Prefix, header, body and stored checksum of a blob whose lengths are consistent."""
    view = memoryview(blob).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise CorruptChunk(
            f"stored entry of {view.nbytes} bytes is shorter than the {PREFIX_BYTES}-byte prefix"
        )
    magic, version, _flags, head_len, body_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptChunk(f"stored entry has magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"stored entry has format version {version}, this slimkv reads {FORMAT_VERSION}")
    if head_len > MAX_HEADER_BYTES or PREFIX_BYTES + head_len + body_len != view.nbytes:
        raise CorruptChunk(
            f"stored entry is {view.nbytes} bytes but its prefix announces a {head_len}-byte header "
            f"and a {body_len}-byte body"
        )
    stored = bytes(view[_PREFIX.size : PREFIX_BYTES])
    head = view[PREFIX_BYTES : PREFIX_BYTES + head_len]
    return view[: _PREFIX.size], head, view[PREFIX_BYTES + head_len :], stored


def verify(blob: Buffer) -> None:
    """Raise :class:`CorruptChunk` unless ``blob`` is a complete blob with a matching checksum."""
    prefix, head, body, stored = _split(blob)
    if _checksum(prefix, [head, body]) != stored:
        raise CorruptChunk("stored entry fails its checksum")


def unpack(blob: Buffer, check: bool = True) -> tuple[dict[str, Any], memoryview]:
    """The header and a zero-copy view of the body (checksum verified unless ``check=False``)."""
    prefix, head, body, stored = _split(blob)
    if check and _checksum(prefix, [head, body]) != stored:
        raise CorruptChunk("stored entry fails its checksum")
    try:
        header = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptChunk(f"stored entry has an unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptChunk("stored entry header is not a JSON object")
    return header, body
