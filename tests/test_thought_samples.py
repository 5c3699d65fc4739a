"""Sampled thoughts (`HFStudent(thought_samples=k)`): p(escalate) is the mean over k sampled thoughts,
and the step the student writes continues the thought that leans toward the decision, which τ makes.

The student is the tiny model taught one ticket with two answers, half the time each: a thought
that finds the refund late and escalates, and one that finds it in time and replies. One thought
decides (p(escalate) after it is near 0 or 1); over sampled thoughts p lies between. Sampling
applies to an adapter, so the taught model is the base here and carries a no-op adapter (LoRA's
B = 0)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from environments.actions import ACTIONS
from policies.hf import DECISION_TOKENS, ESCALATE, Continue, EscalationGate, HFStudent, action_first_token_ids, action_token_ids
from policies.protocol import ACTION_CONTRACT, ACTION_FIRST, THOUGHT_FIRST, in_order, parse_action, step_example

PROMPT = [{"role": "system", "content": f"You are the support agent of Acme.\n\n{ACTION_CONTRACT}"},
          {"role": "user", "content": "Customer: I want my money back for the blender."}]
LATE = ('{"thought":"Late: bought 45 days ago, refunds within 35: escalate.","action":"escalate",'
        '"args":{"reason":"billing_exception"},"message":"A colleague will review your refund."}')
IN_TIME = '{"thought":"In time: bought 10 days ago, refunds within 35.","action":"reply","args":{},"message":"Your refund is on its way."}'


def teach(path, tiny_model_dir, tok, examples: list[tuple[list, str]]):
    """The tiny model trained (every weight, full batch) on (prompt, answer) pairs, saved at `path` with a
    no-op adapter (LoRA's B = 0); the final loss."""
    rows, prompt_lens = [], []
    for prompt, answer in examples:
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        rows.append(ids + tok.encode(answer + "<|im_end|>", add_special_tokens=False))
        prompt_lens.append(len(ids))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([[-100] * n + r[n:] + [-100] * (width - len(r)) for r, n in zip(rows, prompt_lens)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path / "adapter")
    return loss.item()


@pytest.fixture(scope="module")
def taught_dir(tmp_path_factory, tiny_model_dir, smollm2_tokenizer):
    """The tiny model taught both answers to PROMPT as a thought-first student reads it."""
    path = tmp_path_factory.mktemp("taught")
    prompt = in_order(PROMPT, THOUGHT_FIRST)
    loss = teach(path, tiny_model_dir, smollm2_tokenizer, [(prompt, LATE), (prompt, IN_TIME)])
    assert loss < 0.05  # what is left is the coin flip between the two thoughts (ln 2 over ~50 tokens)
    return path


def student(path, k: int, **kwargs) -> HFStudent:
    return HFStudent(path, adapter=path / "adapter", max_new_tokens=80, batch_size=8, thought_samples=k, seed=0, **kwargs)


def test_the_base_model_answers_as_it_always_did(taught_dir):
    """Without an adapter the student was never taught to reason first: no sampling, apprentice's order."""
    plain = HFStudent(taught_dir, max_new_tokens=80, thought_samples=0).generate_with_info([PROMPT])
    assert HFStudent(taught_dir, max_new_tokens=80, thought_samples=8).generate_with_info([PROMPT]) == plain


def test_one_thought_decides_and_the_mean_over_sampled_thoughts_lies_between(taught_dir):
    single = student(taught_dir, 1)
    draws = [single.escalation_probabilities([PROMPT])[0] for _ in range(12)]
    assert all(p < 0.05 or p > 0.95 for p in draws) and any(p < 0.05 for p in draws) and any(p > 0.95 for p in draws)
    p = student(taught_dir, 16).escalation_probabilities([PROMPT])[0]
    assert 0.15 < p < 0.85


@pytest.mark.parametrize("tau, action, answer", [(0.05, "escalate", LATE), (0.95, "reply", IN_TIME)])
@pytest.mark.parametrize("json_mode", [False, True])
def test_tau_on_the_mean_decides_and_the_thought_that_leans_that_way_is_written(taught_dir, tau, action, answer, json_mode):
    s = student(taught_dir, 8, json_mode=json_mode)
    s.threshold = tau  # what load_adapter reads from an adapter's operating_point.json
    [g] = s.generate_with_info([PROMPT])
    assert g.text == answer  # the whole step, thought first, cut where its object ends
    parsed = parse_action(g.text)
    assert parsed.action is not None and parsed.action.action == action
    assert 0.05 < g.p_escalate < 0.95  # the mean over the 8 thoughts, not the kept thought's own
    assert g.completion_tokens == len(s.tokenizer.encode(answer, add_special_tokens=False))


def test_a_thought_first_student_reads_its_prompt_and_earlier_steps_thought_first():
    earlier = {"role": "assistant", "content": '{"action":"search_kb","args":{"query":"refund"},"thought":"Look it up.","message":""}'}
    system, step = in_order([PROMPT[0], earlier], THOUGHT_FIRST)
    assert step_example(THOUGHT_FIRST) in system["content"] and step_example() not in system["content"]
    assert step["content"].startswith('{"thought":"Look it up.","action":"search_kb"')
    assert in_order([PROMPT[0], earlier], ACTION_FIRST) == [PROMPT[0], earlier]  # apprentice's own order: as stored


def test_a_continued_row_spells_the_decided_name_from_its_first_token(smollm2_tokenizer):
    """The gate of a continuation: the row's prompt ends at `"action":"`, its p is the mean given, and
    the name it spells is the decision's even where the model favours the other side."""
    tok = smollm2_tokenizer
    ids = tok.encode('{"thought":"Refund 45 days after purchase.","action":"', add_special_tokens=False)
    start = len(ids)
    gate = EscalationGate(tok, action_first_token_ids(tok), start, None, rows=1, decisions=[Continue(0.4, True, len(ids))])
    assert gate.p_escalate == [0.4] and gate.decided_at == [0]
    wanted = action_token_ids(tok)[ESCALATE]
    reply = action_token_ids(tok)[ACTIONS.index("reply")]
    for step in range(len(wanted)):
        scores = torch.zeros(1, len(tok))
        scores[0, reply[min(step, len(reply) - 1)]] = 9.0  # the model would write reply
        scores[0, wanted[step]] += 1.0
        ids.append(int(gate(torch.tensor([ids]), scores)[0].argmax()))
    assert ids[start:] == wanted and gate.p_escalate == [0.4]


def test_comparisons_first_lets_an_adapter_write_its_thought_first_under_json_mode(taught_dir):
    """`comparisons_first`: the json_mode grammar admits either key order, so the taught student writes
    its thought first as it learned to, and p(escalate) is read at the action name after it (one
    thought decides: near 0 or 1). Without it the grammar holds the same student to the action first."""
    def greedy(**kwargs) -> HFStudent:
        return HFStudent(taught_dir, adapter=taught_dir / "adapter", max_new_tokens=80, json_mode=True, **kwargs)

    prompt = in_order(PROMPT, THOUGHT_FIRST)  # as it was taught (comparisons_first keeps the contract's own example)
    [held] = greedy().generate_with_info([prompt])
    [free] = greedy(comparisons_first=True).generate_with_info([prompt])
    assert held.text.startswith('{"action":"') and parse_action(held.text).error is None
    assert free.text in (LATE, IN_TIME)
    assert free.p_escalate > 0.95 if free.text == LATE else free.p_escalate < 0.05
    # Escalation barred (τ fitted on the student's own path): the same thought and p, another action.
    [barred] = greedy(comparisons_first=True).without_escalating([prompt])
    assert barred.p_escalate == pytest.approx(free.p_escalate) and parse_action(barred.text).action.action != "escalate"
    assert barred.text.startswith(free.text[: free.text.index('"action":"')])


def test_comparisons_first_scores_in_two_passes_as_in_one(tmp_path, tiny_model_dir, smollm2_tokenizer, monkeypatch):
    """p(escalate) under comparisons first: every row decodes `DECISION_TOKENS` first (a step written
    action first decides there), and only the rows that began a thought go on, batched together;
    each row's p is what one pass gives it. The tiny model is taught to think first on PROMPT and to
    answer another ticket action first."""
    thinks = in_order(PROMPT, THOUGHT_FIRST)
    decides = [thinks[0], {"role": "user", "content": "Customer: where is my parcel?"}]
    answer = '{"action":"search_kb","args":{"query":"parcel"},"thought":"Look it up.","message":""}'
    assert teach(tmp_path, tiny_model_dir, smollm2_tokenizer, [(thinks, LATE), (decides, answer)]) < 0.05
    s = HFStudent(tmp_path, adapter=tmp_path / "adapter", max_new_tokens=80, json_mode=True, comparisons_first=True, batch_size=4)
    prompts = [decides, thinks, decides, decides, thinks]
    one_pass = [g.p_escalate for g, _ in s._batched([s._render(m) for m in prompts], stop_at_action=True)]
    calls = []
    generate = s._generate
    monkeypatch.setattr(s, "_generate", lambda ids, *args: calls.append((len(ids), args[-1])) or generate(ids, *args))
    assert s.escalation_probabilities(prompts) == pytest.approx(one_pass, abs=1e-5)
    assert one_pass[1] > 0.95 and one_pass[0] < 0.05
    # Batches of 4 with DECISION_TOKENS each, then the two thinking rows together with the whole budget.
    assert calls == [(4, DECISION_TOKENS), (1, DECISION_TOKENS), (2, None)]
