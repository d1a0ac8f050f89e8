"""API keys: who may call the server, and which tenant (store namespace) each key acts for.

The key file (``--api-keys FILE``) holds one ``KEY TENANT`` pair per line; blank lines and lines
starting with ``#`` are ignored. A tenant's reused KV lives in its own store namespace: no other
tenant can hit, list or time its entries.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from ..errors import ConfigError
from ..store.keys import check_namespace


def load_api_keys(path: str | Path) -> dict[str, str]:
    """``{key: tenant}`` from a key file; :class:`ConfigError` saying which line is wrong otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {str(p)!r}: {exc}") from exc
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{p}:{number}: expected `KEY TENANT`, got {len(parts)} field(s)")
        key, tenant = parts
        if len(key) < 8:
            raise ConfigError(f"{p}:{number}: an API key needs at least 8 characters")
        try:
            check_namespace(tenant)
        except ConfigError as exc:
            raise ConfigError(f"{p}:{number}: {exc}") from exc
        if key in keys:
            raise ConfigError(f"{p}:{number}: the same key is listed twice")
        keys[key] = tenant
    if not keys:
        raise ConfigError(f"the API key file {str(p)!r} lists no key")
    return keys


def tenant_of(keys: dict[str, str], authorization: str | None) -> str | None:
    """The tenant of a ``Bearer KEY`` header, or None when the key is missing or unknown."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    given = authorization.removeprefix("Bearer ").strip()
    found = None
    for key, tenant in keys.items():  # compare every key in constant time
        if hmac.compare_digest(key.encode(), given.encode()):
            found = tenant
    return found
