"""Shared fixtures: a tiny random model with the real SmolLM2 tokenizer, built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network; set before transformers is imported

import pytest
import torch

from tests.tiny_model import save_tiny_model
from tests.tiny_model import smollm2_tokenizer as load_smollm2_tokenizer

# Tiny models are all per-op overhead, and when other processes share the cores OpenMP threads spin-wait:
# measured on a busy 2-core box, test_hf_student.py took 74 s with 2 threads and 12 s with 1.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (chat template included)."""
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """SmolLM2-135M's architecture shrunk to 2 layers of width 64, random weights (seed 0), saved once
    (tests/tiny_model.py)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-smollm2"), smollm2_tokenizer)
