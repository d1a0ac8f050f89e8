"""``slimkv serve``: an OpenAI-compatible HTTP server with per-request KV compression."""

from __future__ import annotations

import argparse
import logging
import signal

from ..errors import InputError
from .common import add_compressor_options, add_model_options, open_store

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. "
                    "Requests run together over one KV pool (continuous batching); each may choose its "
                    "own compression with the body field kv_compression, e.g. "
                    '{"method": "snapkv", "ratio": 0.75}; --compressor sets the default.',
    )
    add_model_options(p)
    add_compressor_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: --model)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV bytes the decoding requests may hold together, e.g. 2GiB (default: 40%% of the "
                        "memory available at start)")
    p.add_argument("--prefill-memory", default=None, metavar="SIZE",
                   help="KV bytes the request being prefilled may hold, uncompressed (default: twice the "
                        "model's longest prompt)")
    p.add_argument("--max-rows", type=int, default=64, metavar="N", help="requests running at once (default 64)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for admission before new ones get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds a request may run before it is cancelled (default 600)")
    p.add_argument("--store", default=None, metavar="SPEC",
                   help="reuse prompt KV (multi-turn chat, shared documents): memory, disk:PATH, redis://HOST:PORT "
                        "or a comma-separated stack")
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="require `Authorization: Bearer KEY`; FILE lists `KEY TENANT` per line (each tenant's "
                        "stored KV is its own)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import Engine
    from ..engine.service import EngineLoop
    from ..models import load_model
    from ..server.app import ServerSettings, create_app
    from ..server.auth import load_api_keys
    from ..server.schemas import KVCompression
    from ..store import parse_size
    from .common import build_compressor

    for name in ("port", "max_rows", "max_queue"):
        if getattr(args, name) < 1 or (name == "port" and args.port > 65535):
            raise InputError(f"--{name.replace('_', '-')} must be a positive number (a port up to 65535), "
                             f"got {getattr(args, name)}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be more than 0 seconds, got {args.timeout}")
    default = build_compressor(args)  # checked now, before the model loads
    keys = load_api_keys(args.api_keys) if args.api_keys else None
    kv_memory = parse_size(args.kv_memory) if args.kv_memory else None
    prefill_memory = parse_size(args.prefill_memory) if args.prefill_memory else None
    stack = open_store(args.store) if args.store else None
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, default, kv_memory=kv_memory, prefill_memory=prefill_memory,
                    max_rows=args.max_rows)
    if stack is not None:
        engine.use_store(stack)
    engine.bind(default)  # calibrations before the first request
    loop = EngineLoop(engine, max_queue=args.max_queue)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        default=KVCompression(method=args.compressor, ratio=args.ratio, budget=args.budget, phase=args.phase),
        api_keys=keys, timeout=args.timeout,
    )

    def drain() -> None:  # SIGTERM: uvicorn stops accepting and waits for responses; then the engine drains
        loop.close(drain=True)
        if stack is not None:
            stack.close()

    app = create_app(loop, settings, on_shutdown=drain)
    log.info("serving %s on http://%s:%d (KV pool %.0f MiB)", settings.model_name, args.host, args.port,
             engine.scheduler.pool.budget / 2**20)
    # uvicorn handles SIGINT/SIGTERM (stop accepting, answer what is in flight, then drain) and re-raises
    # the signal afterwards; with these handlers in place that re-raise is a no-op and we exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.timeout)
    log.info("stopped after answering every request in flight")
    return 0
