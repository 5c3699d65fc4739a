"""The hf student backend and base-model resolution, on a tiny random SmolLM2 (the real 135M only in `slow`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from policies import models
from policies.hf import HFStudent, json_object_end
from policies.models import DEFAULT_MODEL, INSTALL_HINT, resolve_model, training_template
from policies.protocol import ACTION_FIRST, parse_action
from policies.student import Student

TICKETS = [
    "Hi",
    "Where is my order A-10293? I ordered it two weeks ago and nothing came.",
    "Refund please",
    "Can you help me change the email on my account, it is the old one from work",
    "ok",
    "My card was charged twice for the same order last night",
]
PROMPTS = [[{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": t}] for t in TICKETS]
PROBES = ["The customer asked for a refund within 30 days.", '{"action": "escalate", "args": {}}']


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Two LoRA adapters for the tiny model with random, non-zero lora_B (a fresh LoRA is a no-op)."""
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in [("adapter-a", 1), ("adapter-b", 2)]:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / name)
    return root / "adapter-a", root / "adapter-b"


@pytest.fixture
def student(tiny_model_dir) -> HFStudent:
    return HFStudent(tiny_model_dir, max_new_tokens=12, batch_size=4)


def test_act_returns_one_string_per_prompt(student):
    texts = student.act(PROMPTS)
    assert len(texts) == len(PROMPTS) and all(isinstance(t, str) and t for t in texts)
    assert len(set(texts)) > 1  # outputs depend on the prompt
    assert student.act([]) == []

    infos = student.generate_with_info(PROMPTS)
    assert [g.text for g in infos] == texts
    assert [g.prompt_tokens for g in infos] == [student.count_tokens(p) for p in PROMPTS]
    assert all(g.adapter_id is None and 0 < g.completion_tokens <= 12 for g in infos)
    _: Student = student  # HFStudent satisfies the protocol (checked by type checkers)


def test_batched_generation_equals_one_at_a_time(student):
    # Left padding + attention mask + float32 leave greedy decoding exactly unchanged, so no tolerance.
    batched = student.act(PROMPTS)  # batches of 4, prompts of different lengths
    assert batched == [student.act([p])[0] for p in PROMPTS]


def test_sampling_is_seeded(tiny_model_dir, student):
    greedy = student.act(PROMPTS)
    first = HFStudent(tiny_model_dir, max_new_tokens=12, temperature=1.0, seed=7).act(PROMPTS)
    again = HFStudent(tiny_model_dir, max_new_tokens=12, temperature=1.0, seed=7).act(PROMPTS)
    assert first == again != greedy


def test_adapter_swap_changes_outputs_and_none_restores_base(student, tiny_model_dir, adapters):
    adapter_a, adapter_b = adapters
    prompts = PROMPTS[:4]  # one batch
    base_texts, base_probe = student.act(prompts), student.probe_logprobs(PROBES)

    student.load_adapter(adapter_a)
    assert student.adapter_id == "adapter-a"
    a_generations = student.generate_with_info(prompts)
    assert {g.adapter_id for g in a_generations} == {"adapter-a"}
    assert [g.text for g in a_generations] != base_texts
    assert all(abs(a - b) > 1e-3 for a, b in zip(student.probe_logprobs(PROBES), base_probe))

    student.load_adapter(str(adapter_b))  # swap: B alone is live, nothing of A is left
    fresh_b = HFStudent(tiny_model_dir, adapter=adapter_b, max_new_tokens=12)
    assert student.adapter_id == fresh_b.adapter_id == "adapter-b"
    assert student.probe_logprobs(PROBES) == pytest.approx(fresh_b.probe_logprobs(PROBES), abs=1e-5)
    assert student.act(prompts) == fresh_b.act(prompts)

    student.load_adapter(None)
    assert student.adapter_id is None
    assert student.probe_logprobs(PROBES) == pytest.approx(base_probe, abs=1e-6)
    assert student.act(prompts) == base_texts


def test_4bit_base_generates_and_takes_an_adapter(tiny_model_dir, adapters):
    import bitsandbytes as bnb

    student = HFStudent(tiny_model_dir, load_in_4bit=True, max_new_tokens=8)
    assert isinstance(student.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    base = student.act(PROMPTS[:3])
    assert len(base) == 3 and all(base)
    student.load_adapter(adapters[0])
    assert student.act(PROMPTS[:3]) != base
    student.load_adapter(None)
    assert student.act(PROMPTS[:3]) == base


@pytest.mark.parametrize("budget", [128, 200])
def test_json_mode_writes_only_steps_of_the_protocol(tiny_model_dir, adapters, budget):
    """Under json_mode even a random adapter writes valid actions, closed within its token budget
    (its strings run on: the budget, not the model, ends them; it spells even the keys a character
    a token, 40 to 80 of them); without it, none is valid. The base model answers as it always did."""
    student = HFStudent(tiny_model_dir, max_new_tokens=budget, batch_size=6, json_mode=True)
    base = student.act(PROMPTS)
    student.load_adapter(adapters[0])
    generations = student.generate_with_info(PROMPTS)
    assert all(parse_action(g.text).error is None for g in generations), [g.text for g in generations]
    assert all(g.text.startswith('{"action":"') and g.completion_tokens <= budget for g in generations)
    student.json_mode = False
    assert all(parse_action(text).error is not None for text in student.act(PROMPTS))
    student.load_adapter(None)
    assert student.act(PROMPTS) == base


@pytest.mark.parametrize(
    ("text", "end"),
    [
        ("{}", 2),
        ('{"a": {"b": 1}} trailing', 15),
        ('{"m": "a } and a { inside", "n": 1}\n', 35),
        ('{"m": "escaped \\" quote }"}x', 27),
        ('{"open": {"still": 1}', None),
    ],
)
def test_json_object_end(text, end):
    assert json_object_end(text) == end


def test_training_template_masks_exactly_the_assistant_turns(smollm2_tokenizer):
    conversation = [
        {"role": "system", "content": "Policy: refunds within 30 days."},
        {"role": "user", "content": "Refund for A-1?"},
        {"role": "assistant", "content": '{"action": "search_kb", "args": {"query": "refund"}}'},
        {"role": "user", "content": "Well?"},
        {"role": "assistant", "content": '{"action": "reply", "message": "Yes, within 30 days."}'},
    ]
    template = training_template(smollm2_tokenizer)
    assert template == models.TRAINING_CHAT_TEMPLATE
    # Training sees the same text the student is prompted with.
    assert smollm2_tokenizer.apply_chat_template(conversation, tokenize=False) == (
        smollm2_tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=template)
    )
    out = smollm2_tokenizer.apply_chat_template(conversation, chat_template=template, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [i for i, m in zip(ids, mask) if m]
    expected = []
    for message in conversation[2::2]:
        expected += smollm2_tokenizer.encode(message["content"] + "<|im_end|>", add_special_tokens=False)
    assert marked == expected
    # The mask is two contiguous spans, one per assistant turn.
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == 2


def test_resolve_model_accepts_a_model_dir_and_refuses_to_download(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        resolve_model("no-such-org/no-such-model")


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as err:
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert INSTALL_HINT in str(err.value)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_real_smollm2_from_the_wheel_answers_and_is_cached(tmp_path, monkeypatch):
    path = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dir left behind

    def no_conversion(target):
        raise AssertionError("the second resolve must use the cache")

    monkeypatch.setattr(models, "_convert_smollm2", no_conversion)
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == path

    start = time.perf_counter()
    student = HFStudent(path, max_new_tokens=24)
    assert time.perf_counter() - start < 10
    answer = student.act([[{"role": "user", "content": "What is the capital of France?"}]])[0]
    assert "Paris" in answer

    # A no-op adapter (lora_B is 0): the base's own choices, decoded under the action schema.
    get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "noop")
    student.load_adapter(tmp_path / "noop")
    student.json_mode = True
    prompt = [
        {"role": "system", "content": 'Reply with one JSON object: {"action": "reply", "message": "..."}'},
        {"role": "user", "content": "Where is my order?"},
    ]
    student.max_new_tokens = 128
    text = student.act([prompt])[0]
    assert parse_action(text).error is None, text


def test_the_step_grammar_admits_every_oracle_step_and_refuses_invalid_ones(tiny_model_dir):
    """The schema json_mode decodes under is no stricter than what the oracle teaches: each step it
    writes on the built-in packs and the hand-written ones (thought first too) is a whole step of
    the grammar; the shapes the adapters got wrong are not."""
    import xgrammar

    from environments.builtin import build_packs
    from environments.episode import SupportEpisode
    from environments.pack import load_packs
    from policies.protocol import THOUGHT_FIRST, reorder

    student = HFStudent(tiny_model_dir)

    def admitted(text: str, *orders) -> bool:
        m = xgrammar.GrammarMatcher(student._grammar(orders or (ACTION_FIRST,)))
        ids = student.tokenizer(text, add_special_tokens=False)["input_ids"] + [student.tokenizer.eos_token_id]
        return all(m.accept_token(t) for t in ids) and m.is_terminated()

    packs = build_packs(0) + load_packs(Path(__file__).parents[1] / "bench" / "packs")
    steps = []
    for pack in packs:
        for ticket in pack.tickets[:8]:
            episode = SupportEpisode(pack, ticket)
            while not episode.done:
                action = episode.reference_action()
                steps.append(action.to_json())
                episode.step(action)
    assert len(steps) > 200
    assert all(admitted(s) for s in steps), [s for s in steps if not admitted(s)][:3]
    assert all(admitted(reorder(s, THOUGHT_FIRST), THOUGHT_FIRST) for s in steps[:50])
    assert not admitted(reorder(steps[0], THOUGHT_FIRST))  # action first only, unless asked
    both = (ACTION_FIRST, THOUGHT_FIRST)  # comparisons_first: either order, as the step was trained
    assert all(admitted(s, *both) and admitted(reorder(s, THOUGHT_FIRST), *both) for s in steps[:50])
    for wrong in ['{"action":"search_kb","args":{"query":"x","thought":"t"},"thought":"","message":""}',  # a key in the wrong object
                  '{"action":"escalate","args":{"reason":"escalate"},"thought":"","message":"m"}',  # no such reason
                  '{"action":"reply","args":{},"thought":"","message":" "}',  # a reply says nothing
                  '{"action":"reply","args":{},"thought":"a\x0bb","message":"m"}',  # a raw control character
                  '{"action":"reply","args":{},"thought":"' + "9" * 241 + '","message":"m"}']:  # past 240 characters
        assert not admitted(wrong)
