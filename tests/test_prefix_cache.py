"""The hf student's shared-prefix KV cache: same outputs as without it, less prefill (tiny model only)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.test_hf_student import TICKETS
from policies.hf import MIN_CACHED_PREFIX, HFStudent

# Long enough that the rendered system turn is well past MIN_CACHED_PREFIX tokens, like a company policy.
POLICY = (
    "You are the support agent of Acme Outdoor. Refunds are allowed within 30 days of delivery with a receipt. "
    "Orders ship in 2 business days; tracking numbers look like A-12345. Escalate fraud, legal threats, "
    "injuries and chargebacks to a human with a reason code. Answer with exactly one JSON action: "
    '{"action": "search_kb", "args": {"query": "..."}}, {"action": "reply", "message": "..."} or '
    '{"action": "escalate", "reason": "..."}.'
)
SHARED = [[{"role": "system", "content": POLICY}, {"role": "user", "content": t}] for t in TICKETS]
# Different system messages: the rows share only the template's first few tokens.
UNSHARED = [
    [{"role": "system", "content": f"{i} {POLICY}"}, {"role": "user", "content": t}] for i, t in enumerate(TICKETS)
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter with random, non-zero lora_B (a fresh LoRA is a no-op)."""
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter") / "adapter-a"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(path)
    return path


def students(tiny_model_dir, **kwargs) -> tuple[HFStudent, HFStudent]:
    """The same student with and without the prefix cache."""
    return (
        HFStudent(tiny_model_dir, max_new_tokens=12, prefix_cache=True, **kwargs),
        HFStudent(tiny_model_dir, max_new_tokens=12, prefix_cache=False, **kwargs),
    )


def embedded_tokens(student: HFStudent, prompts) -> tuple[list[str], int]:
    """Texts for `prompts`, and how many tokens went through the model's embedding layer to get them."""
    counts = []
    embeddings = student.model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, out: counts.append(args[0].numel()))
    try:
        texts = student.act(prompts)
    finally:
        hook.remove()
    return texts, sum(counts)


def test_shared_prefix_is_prefilled_once_and_changes_no_output(tiny_model_dir):
    cached, plain = students(tiny_model_dir, batch_size=len(SHARED))
    rendered = [cached.tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False) for p in SHARED]
    prefix_len = len(os.path.commonprefix(rendered))
    assert 2 * MIN_CACHED_PREFIX <= prefix_len < min(map(len, rendered))

    cached_texts, cached_tokens = embedded_tokens(cached, SHARED)
    plain_texts, plain_tokens = embedded_tokens(plain, SHARED)
    assert cached_texts == plain_texts
    assert len(set(cached_texts)) > 1  # outputs depend on the user turn, not just the shared prefix
    # The prefix went through the model once instead of once per row; decoding steps are the same.
    assert plain_tokens - cached_tokens == (len(SHARED) - 1) * prefix_len
    assert cached.generate_with_info(SHARED) == plain.generate_with_info(SHARED)  # token counts too


def test_unshared_prompts_take_the_plain_path(tiny_model_dir):
    cached, plain = students(tiny_model_dir, batch_size=len(UNSHARED))
    cached_texts, cached_tokens = embedded_tokens(cached, UNSHARED)
    plain_texts, plain_tokens = embedded_tokens(plain, UNSHARED)
    assert cached_texts == plain_texts and cached_tokens == plain_tokens


def test_chunks_and_single_prompts_match(tiny_model_dir):
    cached, plain = students(tiny_model_dir, batch_size=4)  # chunks of 4 and 2, sorted by length
    assert cached.act(SHARED + UNSHARED) == plain.act(SHARED + UNSHARED)
    # A batch of one caches all but its last token.
    assert [cached.act([p])[0] for p in SHARED] == [plain.act([p])[0] for p in SHARED] == plain.act(SHARED)


def test_adapter_is_live_in_the_cached_prefix(tiny_model_dir, adapter):
    cached, plain = students(tiny_model_dir, batch_size=len(SHARED))
    base_texts = cached.act(SHARED)
    cached.load_adapter(adapter)
    plain.load_adapter(adapter)
    adapter_texts = cached.act(SHARED)
    assert adapter_texts == plain.act(SHARED) != base_texts
    cached.load_adapter(None)
    assert cached.act(SHARED) == base_texts


def test_json_mode_sees_the_whole_prompt_as_prompt(tiny_model_dir, adapter):
    cached, plain = students(tiny_model_dir, batch_size=len(SHARED), json_mode=True)
    cached.load_adapter(adapter)
    plain.load_adapter(adapter)
    generations, expected = cached.generate_with_info(SHARED), plain.generate_with_info(SHARED)
    assert [replace(g, p_escalate=None) for g in generations] == [replace(g, p_escalate=None) for g in expected]
    assert [g.p_escalate for g in generations] == pytest.approx([g.p_escalate for g in expected], rel=1e-5)  # summed in another order
    assert all(g.text.startswith('{"action":"') for g in generations)


def test_4bit_base_matches_and_still_takes_an_adapter(tiny_model_dir, adapter):
    cached, plain = students(tiny_model_dir, batch_size=len(SHARED), load_in_4bit=True)
    base_texts = cached.act(SHARED)
    assert base_texts == plain.act(SHARED)
    # The prefix forward is a forward like any other: swaps still start from the untouched 4-bit copy.
    cached.load_adapter(adapter)
    plain.load_adapter(adapter)
    assert cached.act(SHARED) == plain.act(SHARED) != base_texts
    cached.load_adapter(None)
    assert cached.act(SHARED) == base_texts
