"""`slimkv serve` against the official openai client, on loopback ports, with a tiny random model and
the embedded model's tokenizer (a real chat template)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from .conftest import tiny_model

MODEL = "tiny"
KEYS = {"key-alice-0001": "alice", "key-bob-00002": "bob"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from slimkv.models import embedded

    return AutoTokenizer.from_pretrained(embedded.converted_folder())


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)


class Served:
    """A server on a loopback port in this process (uvicorn on a thread), stopped by ``close``."""

    def __init__(self, model, tokenizer, api_keys=None, store=None, **engine_kw) -> None:
        import uvicorn

        from slimkv.engine import Engine
        from slimkv.engine.service import EngineLoop
        from slimkv.server.app import ServerSettings, create_app

        engine = Engine(model, tokenizer, kv_memory=engine_kw.pop("kv_memory", 1 << 30), **engine_kw)
        if store is not None:
            engine.use_store(store)
        self.engine = engine
        self.loop = EngineLoop(engine, max_queue=engine_kw.get("max_queue", 64))
        self.app = create_app(self.loop, ServerSettings(model_name=MODEL, api_keys=api_keys, timeout=60))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert found, name
        return float(found.group(1))

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def served(model, tokenizer):
    s = Served(model, tokenizer)
    yield s
    s.close()


def prompt(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "river", "stone", "garden", "seven", "blue", "north", "lamp", "quiet", "paper"]
    return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))


def test_completion_with_usage_kv_and_finish_reason(served):
    out = served.client().completions.create(model=MODEL, prompt=prompt(40), max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    kv = out.model_extra["kv"]
    assert kv["method"] == "none" and kv["bytes_kept"] >= kv["bytes_full"]


def test_per_request_compression_holds_fewer_bytes_and_bad_methods_name_the_valid_ones(served):
    client = served.client()
    text = prompt(200, seed=1)
    full = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0)
    snap = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0,
                                     extra_body={"kv_compression": {"method": "snapkv", "ratio": 0.75}})
    assert snap.model_extra["kv"]["bytes_kept"] < full.model_extra["kv"]["bytes_kept"] / 3
    assert snap.model_extra["kv"]["method"].startswith("snapkv")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=text, max_tokens=4,
                                  extra_body={"kv_compression": {"method": "nope"}})
    assert "valid compressors" in str(err.value) and "snapkv" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="ratio"):
        client.completions.create(model=MODEL, prompt=text, extra_body={"kv_compression": {"method": "snapkv",
                                                                                          "ratio": 1.5}})


def test_streaming_pieces_add_up_and_the_usage_chunk_comes_last(served):
    client = served.client()
    kwargs = dict(model=MODEL, prompt=prompt(30, seed=2), max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_uses_the_template_and_streams(served, tokenizer):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 8
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content


def test_stop_strings_and_seeds(served):
    client = served.client()
    kwargs = dict(model=MODEL, prompt=prompt(30, seed=3), max_tokens=24, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kwargs).choices[0].text
    stop = greedy[6:9]
    cut = client.completions.create(temperature=0, stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[: greedy.find(stop)]
    a = client.completions.create(temperature=1.0, seed=11, **kwargs).choices[0].text
    b = client.completions.create(temperature=1.0, seed=11, **kwargs).choices[0].text
    c = client.completions.create(temperature=1.0, seed=12, **kwargs).choices[0].text
    assert a == b and a != c


def test_sixteen_concurrent_clients_get_what_each_gets_alone(served):
    client = served.client()
    reqs = [dict(model=MODEL, prompt=prompt(20 + 7 * i, seed=10 + i), max_tokens=10, temperature=0,
                 extra_body={"ignore_eos": True}) for i in range(16)]
    alone = [client.completions.create(**r).choices[0].text for r in reqs]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: client.completions.create(**r).choices[0].text, reqs))
    assert together == alone


def post(served, body, headers=None):
    return httpx.post(served.url + "/v1/completions", content=body if isinstance(body, str) else json.dumps(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, 400, "at most"),
    ({"model": MODEL, "prompt": "hi " * 2000}, 400, "context"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "unsupported field 'logprobs'"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "gpt-9", "prompt": "hi"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "hi", "kv_compression": {"method": "kivi2", "ratio": 0.5}}, 400, "no ratio"),
])
def test_bad_requests_get_openai_errors_that_say_what_to_fix(served, body, status, fragment):
    response = post(served, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_a_client_that_disconnects_frees_its_kv(served):
    body = {"model": MODEL, "prompt": prompt(60, seed=5), "max_tokens": 400, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert any(line.startswith("data:") for line in (next(lines), next(lines), next(lines)))
        assert served.metric("slimkv_kv_pool_bytes") > 0
    deadline = time.time() + 20
    while time.time() < deadline and (served.metric("slimkv_kv_pool_bytes") or served.metric("slimkv_requests_running")):
        time.sleep(0.1)
    assert served.metric("slimkv_kv_pool_bytes") == 0 and served.metric("slimkv_requests_running") == 0


def test_metrics_count_requests_tokens_and_latency(served):
    served.client().completions.create(model=MODEL, prompt=prompt(20), max_tokens=3, temperature=0)
    text = httpx.get(served.url + "/metrics").text
    for name in ("slimkv_requests_total", "slimkv_prompt_tokens_total", "slimkv_generated_tokens_total",
                 "slimkv_time_to_first_token_seconds_bucket", "slimkv_inter_token_latency_seconds_count",
                 "slimkv_kv_pool_budget_bytes", "slimkv_kv_bytes_saved_total", "slimkv_store_hit_tokens_total",
                 "slimkv_requests_waiting"):
        assert name in text, name
    assert 'status="200"' in text and httpx.get(served.url + "/health").json() == {"status": "ok"}
    assert served.client().models.list().data[0].id == MODEL


def test_a_full_queue_answers_429_with_retry_after(model, tokenizer):
    s = Served(model, tokenizer, max_rows=1)
    s.loop.max_queue = 1
    try:
        body = {"model": MODEL, "prompt": prompt(40), "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: post(s, body), range(6)))
        codes = sorted(r.status_code for r in statuses)
        assert 200 in codes and 429 in codes
        busy = next(r for r in statuses if r.status_code == 429)
        assert busy.headers["retry-after"] and "busy" in busy.json()["error"]["message"]
    finally:
        s.close()


def test_keys_and_tenants_keep_stored_kv_apart(model, tokenizer, tmp_path):
    from slimkv.store import parse_store_spec

    s = Served(model, tokenizer, api_keys=KEYS, store=parse_store_spec("memory"))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong-key-123").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        alice, bob = s.client("key-alice-0001"), s.client("key-bob-00002")
        text = prompt(400, seed=8)  # over one 256-token chunk
        first = alice.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0)
        again = alice.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0)
        other = bob.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert again.usage.prompt_tokens_details.cached_tokens == 256
        assert other.usage.prompt_tokens_details.cached_tokens == 0  # bob never hits alice's entries
        assert again.choices[0].text == first.choices[0].text == other.choices[0].text
    finally:
        s.close()


def test_sigterm_finishes_every_request_in_flight(model, tokenizer, tmp_path):
    """A real `slimkv serve` process: SIGTERM while three streams run; each gets its whole answer."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimkv.cli.main", "serve", "--model", str(folder),
                             "--port", str(port), "--kv-memory", "256MiB"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        started = threading.Barrier(4)

        def stream(i: int) -> tuple[str, int]:
            chunks = client.completions.create(model=str(folder), prompt=prompt(30, seed=i), max_tokens=120,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage = "", 0
            for n, c in enumerate(chunks):
                if n == 1:
                    started.wait(30)
                if c.choices:
                    text += c.choices[0].text
                if c.usage:
                    usage = c.usage.completion_tokens
            return text, usage

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stream, i) for i in range(3)]
            started.wait(60)
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=120) for f in futures]
        assert all(usage == 120 and text for text, usage in results)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
