"""``slimkv methods``: the registered compressors with their kind, phases and paper."""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the compression methods",
                       description="List every registered compressor with its kind, phases and paper.")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compressors import methods

    infos = methods()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in infos], indent=1))
        return 0
    width = max(len(m.name) for m in infos)
    for m in infos:
        phases = "+".join(m.phases) or "-"
        params = f" [{', '.join(m.params)}]" if m.params else ""
        print(f"{m.name:<{width}}  {m.kind:<12} {phases:<15} {m.summary}{params}")
        print(f"{'':<{width}}  paper: {m.paper}")
    print("\nCompose with '+' in the order eviction, merging, quantization: --compressor snapkv+kivi2 "
          "--ratio 0.5; snapkv+kvmerger merges what SnapKV frees instead of dropping it")
    return 0
