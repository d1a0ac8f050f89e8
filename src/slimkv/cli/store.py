"""``slimkv store stats|verify|clear``: look after a KV store from the command line."""

from __future__ import annotations

import argparse
import json

from .common import human_bytes, open_store


def add_parser(sub) -> None:
    p = sub.add_parser("store", help="inspect, verify or clear a KV store",
                       description="Inspect (stats), check every entry's checksum (verify) or empty (clear) "
                                   "a KV store, one tenant at a time.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("stats", "entries and bytes per tier"), ("verify", "read every entry and check it"),
                       ("clear", "delete the tenant's entries")):
        a = actions.add_parser(name, help=text)
        a.add_argument("--store", required=True, metavar="SPEC", help="memory, disk:PATH, redis://HOST:PORT, ...")
        a.add_argument("--tenant", default="default", help="namespace (default 'default')")
        a.add_argument("--json", action="store_true", help="print JSON")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..store import ChunkKey, CorruptChunk, decode_cache, decode_chunk
    from ..store.keys import check_namespace

    namespace = check_namespace(args.tenant)
    with open_store(args.store) as stack:
        if args.action == "stats":
            stats = stack.stats(namespace)
            data = {"tenant": namespace, "pending_writes": stats.pending_writes, "dropped_writes": stats.dropped_writes,
                    "tiers": [{"tier": t.tier, "entries": t.entries, "bytes": t.bytes, "errors": t.errors}
                              for t in stats.tiers]}
            if args.json:
                print(json.dumps(data))
            else:
                for t in data["tiers"]:
                    state = f" ({t['errors']} errors)" if t["errors"] else ""
                    print(f"{t['tier']:<40} {t['entries']:>7} entries  {human_bytes(t['bytes'])}{state}")
            return 0
        if args.action == "clear":
            removed = stack.clear(namespace)
            print(json.dumps({"tenant": namespace, "removed": removed}) if args.json
                  else f"removed {removed} entries of tenant {namespace!r}")
            return 0
        good = bad = 0
        for digest in stack.list(namespace):
            key = ChunkKey(namespace, digest, 0)
            blob = stack.get(key)
            if blob is None:
                continue
            try:
                try:
                    decode_chunk(blob)
                except CorruptChunk as exc:
                    if "kind" not in str(exc):
                        raise
                    decode_cache(blob)
                good += 1
            except CorruptChunk:
                bad += 1
                stack.delete(key)
        print(json.dumps({"tenant": namespace, "ok": good, "corrupt_removed": bad}) if args.json
              else f"{good} entries ok, {bad} corrupt entries removed")
        return 1 if bad else 0
