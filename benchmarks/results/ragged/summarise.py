"""Group needle eval rows (results.jsonl files) by setting, method, ratio, length: mean score and KV bytes."""
import json, sys, collections
rows = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
g = collections.defaultdict(list)
for r in rows:
    g[(r["question_aware"], r["method"], r["ratio"], r["length"])].append(r)
print("| setting | method | ratio | prompt | score | full-cache score | KV MB held (mean) | of full |")
print("|---|---|---|---|---:|---:|---:|---:|")
for (qa, m, ratio, n), rs in sorted(g.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1] != "none", kv[0][1], kv[0][2] or 0)):
    full = [x for x in g[(qa, "none", None, n)]]
    sc = sum(x["score"] for x in rs) / len(rs)
    fs = sum(x["score"] for x in full) / len(full)
    kb = sum(x["bytes_kept"] for x in rs) / len(rs); fb = sum(x["bytes_full"] for x in rs) / len(rs)
    print(f"| {'aware' if qa else 'agnostic'} | {m} | {ratio if ratio is not None else '-'} | {n} | {sc:.2f} ({len(rs)}) | {fs:.2f} | {kb/1e6:.2f} | {kb/fb:.3f} |")
