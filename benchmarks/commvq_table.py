"""Summarise `slimkv eval needle --out` JSON lines of CommVQ runs: score, full-cache score and bits per element.

    python benchmarks/commvq_table.py needle2.jsonl [needle1.jsonl ...]

bits per element = bytes_kept * 8 / (tokens * layers * kv_heads * 2 * head_dim) = 32 * bytes_kept / bytes_full
for the float32 embedded model (bytes_full counts float32 keys and values only), measured after the
context is compressed and the question appended in full precision.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            cells[(row["method"], row["length"])].append(row)
    print("| method | length | samples | score | bits/element (KV held after compression) |")
    print("|---|---:|---:|---:|---:|")
    for (method, length), rows in sorted(cells.items()):
        score = sum(r["score"] for r in rows)
        bits = sum(32 * r["bytes_kept"] / r["bytes_full"] for r in rows) / len(rows)
        print(f"| {method} | {length} | {len(rows)} | {score:g}/{len(rows)} | {bits:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
