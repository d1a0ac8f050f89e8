"""Chunk keys: chaining, determinism and every compatibility field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slimkv.errors import ConfigError
from slimkv.store import ChunkKey, KeySpec, chunk_keys, prompt_key

SPEC = KeySpec(tenant="acme", model="model-sha", dtype="bfloat16", codec="raw", chunk_size=4)
IDS = list(range(100, 110))  # two full chunks and a partial one
PINNED = "2432724b390eb19e6f82da83e7739e291e0a4ddc46cb62a4dea46e929733d8be"


def test_full_chunks_only_and_token_counts():
    keys = chunk_keys(IDS, SPEC)
    assert [k.tokens for k in keys] == [4, 8]
    assert chunk_keys(IDS[:3], SPEC) == []


def test_same_prefix_same_keys_and_chaining():
    keys = chunk_keys(IDS, SPEC)
    assert chunk_keys(IDS[:8] + [7, 7, 7], SPEC) == keys  # the partial chunk does not matter
    later = chunk_keys(IDS[:5] + [0] + IDS[6:], SPEC)  # a change in chunk 1 keeps chunk 0's key
    assert later[0] == keys[0] and later[1] != keys[1]
    earlier = chunk_keys([0] + IDS[1:], SPEC)  # a change in chunk 0 changes every later key
    assert all(a != b for a, b in zip(earlier, keys))
    # the same chunk after a different prefix is a different entry (chained, not per chunk)
    assert chunk_keys(IDS[4:8] + IDS[4:8], SPEC)[1] != keys[1]


def test_inputs_of_any_integer_container_agree():
    keys = chunk_keys(IDS, SPEC)
    assert chunk_keys(np.array(IDS, dtype=np.int32), SPEC) == keys
    assert chunk_keys(torch.tensor(IDS), SPEC) == keys


def test_digest_is_pinned():
    # a stable, process-independent value (hashlib, never Python's salted hash()); changing the key
    # derivation must bump KEY_VERSION and this value together
    assert chunk_keys(IDS, SPEC)[0].digest == PINNED


@pytest.mark.parametrize("change", [
    {"model": "other-model"}, {"dtype": "float16"}, {"codec": "snapkv:ratio=0.5"}, {"chunk_size": 5},
])
def test_every_compatibility_field_changes_the_digest(change):
    other = dataclasses.replace(SPEC, **change)
    assert chunk_keys(IDS, other)[0].digest != chunk_keys(IDS, SPEC)[0].digest


def test_tenant_changes_the_id_and_sharing_is_opt_in():
    a = chunk_keys(IDS, SPEC)[0]
    b = chunk_keys(IDS, dataclasses.replace(SPEC, tenant="globex"))[0]
    assert a.id != b.id and a.namespace == "acme" and b.namespace == "globex"
    assert a.id.startswith("acme/")
    shared_a = chunk_keys(IDS, dataclasses.replace(SPEC, shared_namespace="team"))[0]
    shared_b = chunk_keys(IDS, dataclasses.replace(SPEC, tenant="globex", shared_namespace="team"))[0]
    assert shared_a == shared_b and shared_a.namespace == "team"


def test_prompt_key_depends_on_the_whole_prompt():
    key = prompt_key(IDS, SPEC)
    assert key.tokens == len(IDS)
    assert key == prompt_key(list(IDS), SPEC)
    assert key not in chunk_keys(IDS, SPEC)
    assert prompt_key(IDS[:-1], SPEC) != key
    assert prompt_key(IDS[:8], SPEC).digest != chunk_keys(IDS, SPEC)[1].digest


@pytest.mark.parametrize("bad", ["", "../etc", "a:b", "_meta", "a/b", "x" * 65, "a b"])
def test_bad_namespaces_are_config_errors(bad):
    with pytest.raises(ConfigError, match="namespace"):
        KeySpec(tenant=bad, model="m", dtype="float32")


def test_bad_fields_are_config_errors():
    with pytest.raises(ConfigError, match="chunk_size"):
        KeySpec(tenant="a", model="m", dtype="float32", chunk_size=0)
    with pytest.raises(ConfigError, match="model"):
        KeySpec(tenant="a", model="", dtype="float32")
    with pytest.raises(ValueError):
        ChunkKey("acme", "not-hex", 4)
