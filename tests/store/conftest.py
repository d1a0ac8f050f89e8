"""Store fixtures: a real ``redis-server`` on a free loopback port (skipped when not installed)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
HAS_CLIENT = importlib.util.find_spec("redis") is not None
NO_REDIS = (
    "redis-server is not on PATH (install it: apt-get install -y redis-server)" if REDIS_SERVER is None
    else "the redis client is not installed (pip install redis)" if not HAS_CLIENT else ""
)
needs_redis = pytest.mark.skipif(bool(NO_REDIS), reason=NO_REDIS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A throw-away redis-server (no persistence) on 127.0.0.1:``port``; ``stop``/``start`` at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):  # up to ~10 s
            if _answers_ping(self.port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if NO_REDIS:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spawn_pool():
    """Two fresh Python processes (spawned, not forked) for cross-process tests."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        yield pool
