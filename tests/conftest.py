"""Shared fixtures: tiny random models built from a config in code (no downloads) and a toy tokenizer."""

from __future__ import annotations

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)


def tiny_model(family: str = "llama", **overrides):
    """A 2-layer GQA model of the given family with seeded random weights, in eval mode."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }
    kwargs = dict(TINY)
    if family in ("gemma", "gemma2", "gemma3", "qwen3"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    config = configs[family](**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # random init leaves tiny logits; scale the head so argmax decisions are well separated
    return model


class ToyTokenizer:
    """Characters <-> ids below the tiny vocab; id 1 is EOS. Enough for the engine's text handling."""

    eos_token_id = 1
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [2 + (ord(c) % 100) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + (int(i) - 2) % 95) for i in ids if int(i) > 1)

    def get_vocab(self) -> dict[str, int]:
        return {"<eos>": 1}


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture()
def toy_tokenizer():
    return ToyTokenizer()


def prompt_ids(n: int, seed: int = 0, vocab: int = 128) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def pytest_addoption(parser):
    parser.addoption(
        "--lossless-matrix", action="store_true",
        help="run the embedded-model lossless equality matrix (every compressor x 5 prompts x 128 tokens; "
             "minutes per compressor on a 2-core CPU)",
    )


@pytest.fixture(scope="session", autouse=True)
def calibration_dir(tmp_path_factory):
    """Calibrated data (TriAttention's query centres, CommVQ's codebooks) go to temporary folders, not
    the user cache."""
    from slimkv.compressors import calibration
    from slimkv.compressors.quantization import commvq_calibration

    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("calibration")
        books = tmp_path_factory.mktemp("commvq")
        mp.setattr(calibration, "CALIBRATION_DIR", folder)
        mp.setattr(commvq_calibration, "codebook_dir", lambda: books)
        yield folder
