"""Prefix reuse through the KV store: a ~4k-token document and five follow-up questions.

For each store configuration (none, disk, Redis) the five questions are asked in order in one
process; question 1 fills the store, questions 2-5 reuse the document's KV. Reported: time to first
token per question and its ratio to cold prefill (measured in the same run without a store), store read
and write throughput, and, for compressed contexts ("compress once, query many"), the bytes stored per
document per compressor. Starts its own redis-server on a free loopback port.

    python benchmarks/prefix_reuse.py [--tokens 4000] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import slimkv
from slimkv.engine import Engine, GenerationConfig, Request
from slimkv.evals.needle import needle_sample
from slimkv.engine import Segments
from slimkv.store import ChunkKey, encode_cache, parse_store_spec
from slimkv.store.convert import cache_to_payload

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "\n\nQuestion: What is the special magic number? Answer: The special magic number is",
    "\n\nQuestion: What colour is the sky in the text? Answer: The sky is",
    "\n\nQuestion: What colour is the grass in the text? Answer: The grass is",
    "\n\nQuestion: What colour is the sun in the text? Answer: The sun is",
    "\n\nQuestion: Repeat the special magic number. Answer:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def ask_all(engine: Engine, doc: str) -> list[dict]:
    out = []
    for q in QUESTIONS:
        r = engine.generate(Request(doc, q), GenerationConfig(max_new_tokens=6))
        s = r.store
        out.append({"ttft_s": r.timing.ttft_s, "text": r.text,
                    "hit_tokens": s.hit_tokens if s else 0, "load_s": s.load_s if s else 0.0})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "prefix_reuse"))
    args = parser.parse_args()
    model, tokenizer = slimkv.load_model()
    doc = needle_sample(tokenizer, args.tokens, depth=0.5, seed=3).context
    tmp = Path(tempfile.mkdtemp(prefix="slimkv-bench-"))
    port = free_port()
    redis = start_redis(port)
    runs: dict[str, list[dict]] = {}
    throughput: dict[str, dict] = {}
    try:
        runs["cold"] = ask_all(Engine(model, tokenizer), doc)
        for name, spec in (("disk", f"disk:{tmp / 'disk'}"), ("redis", f"redis://127.0.0.1:{port}?capacity=2GiB")):
            stack = parse_store_spec(spec)
            engine = Engine(model, tokenizer)
            engine.use_store(stack, tenant="bench", chunk_size=args.chunk)
            runs[name] = ask_all(engine, doc)
            # raw tier throughput on the stored chunks
            keys = stack.list("bench")
            blobs = [stack.get(ChunkKey("bench", d, 0)) for d in keys]
            size = sum(len(b) for b in blobs if b)
            tier = stack.tiers[0]
            t0 = time.perf_counter()
            for d, b in zip(keys, blobs):
                tier.put(ChunkKey("bench-copy", d, 0), b)  # a fresh namespace: real writes
            write = time.perf_counter() - t0
            t0 = time.perf_counter()
            for d in keys:
                tier.get(ChunkKey("bench-copy", d, 0))
            read = time.perf_counter() - t0
            tier.clear("bench-copy")
            throughput[name] = {"bytes": size, "write_mb_s": size / write / 1e6, "read_mb_s": size / read / 1e6}
            stack.close()
        compressed = {}
        for comp_name, ratio in (("snapkv", 0.5), ("snapkv", 0.875), ("knorm", 0.75), ("streaming_llm", 0.875)):
            engine = Engine(model, tokenizer, slimkv.make_compressor(comp_name, ratio=ratio))
            with engine.adapter.attached():
                cache, _ = engine.prepare(Segments(tokenizer.encode(doc), []))
            compressed[f"{comp_name}@{ratio}"] = len(encode_cache(cache_to_payload(cache)))
        full_bytes = len(tokenizer.encode(doc)) * Engine(model, tokenizer).adapter.spec.bytes_per_token
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    cold = runs["cold"][0]["ttft_s"]
    command = "python " + " ".join(sys.argv)
    lines = [f"# Prefix reuse ({time.strftime('%Y-%m-%d')}, CPU, embedded SmolLM2-135M fp32)", "",
             f"Command: `{command}`", "",
             f"Document: {len(tokenizer.encode(doc))} tokens; chunk size {args.chunk}; five questions asked in order.",
             "Cold = no store (every question prefills the whole document).", "",
             "| question | cold TTFT s | disk TTFT s | disk speed-up | redis TTFT s | redis speed-up | reused tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(len(QUESTIONS)):
        c, d, r = runs["cold"][i], runs["disk"][i], runs["redis"][i]
        lines.append(f"| {i + 1} | {c['ttft_s']:.2f} | {d['ttft_s']:.2f} | {c['ttft_s'] / d['ttft_s']:.1f}x | "
                     f"{r['ttft_s']:.2f} | {c['ttft_s'] / r['ttft_s']:.1f}x | {d['hit_tokens']} |")
    lines += ["", "| tier | MB stored | write MB/s | read MB/s |", "|---|---:|---:|---:|"]
    for name, t in throughput.items():
        lines.append(f"| {name} | {t['bytes'] / 1e6:.1f} | {t['write_mb_s']:.0f} | {t['read_mb_s']:.0f} |")
    lines += ["", f"Compressed contexts stored once per document (full-cache KV {full_bytes / 1e6:.1f} MB):", "",
              "| compressor | MB stored | share of full |", "|---|---:|---:|"]
    for name, n in compressed.items():
        lines.append(f"| {name} | {n / 1e6:.1f} | {n / full_bytes:.0%} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs, "throughput": throughput,
                                                    "compressed_bytes": compressed, "full_bytes": full_bytes,
                                                    "cold_ttft_s": cold}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
