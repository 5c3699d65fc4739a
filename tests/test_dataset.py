"""The training set: aggregate, deduplicated, held-out refused, escalation turns oversampled, a
share of openings reworded, a share wrapped in a prompt injection, a share written thought first; a continued adapter's: the new examples
and a replayed sample of the older ones."""

import json

import pytest

from environments import builtin_domains as words
from loop.dataset import build_dataset, decorate_openings, inject_openings, thoughts_first, with_replay
from policies.protocol import THOUGHT_FIRST, step_example
from store import ExampleRow


def conv(*actions, tag=""):
    msgs = [{"role": "system", "content": "policy"}, {"role": "user", "content": f"Customer: hi {tag}"}]
    for a in actions:
        msgs.append({"role": "assistant", "content": json.dumps({"action": a, "tag": tag})})
        msgs.append({"role": "user", "content": "Tool: ok"})
    return msgs[:-1]


def example(messages, company="acme", weight=1.0):
    return ExampleRow(source="simulation", company_id=company, messages=messages,
                      has_escalation=any('"escalate"' in m["content"] for m in messages), weight=weight)


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_escalation_share_matches_the_setting(share):
    rows = [example(conv("search_kb", "reply", tag=str(i))) for i in range(40)]
    rows += [example(conv("search_kb", "escalate", tag=f"e{i}")) for i in range(2)]
    rows += [example(conv("escalate", tag=f"d{i}")) for i in range(2)]
    data = build_dataset(rows, heldout=set(), escalation_share=share)
    assert data.n_unique == 44
    assert share <= data.escalation_share < share + 0.02  # oversampled up to the share, one conversation at a time
    counted = [json.loads(m["content"])["action"] for c in data.conversations for m in c if m["role"] == "assistant"]
    assert counted.count("escalate") / len(counted) == data.escalation_share


def test_an_unreachable_share_stops():
    rows = [example(conv("reply", tag="a")), example(conv("search_kb", "escalate", tag="b"))]
    data = build_dataset(rows, heldout=set(), escalation_share=0.9)  # at most 1/2 of turns can escalate
    assert 0.45 < data.escalation_share < 0.5


def test_duplicates_count_once_and_weights_repeat():
    rows = [example(conv("reply", tag="a")), example(conv("reply", tag="a")), example(conv("reply", tag="b"), weight=3)]
    data = build_dataset(rows, heldout=set(), escalation_share=0.0)
    assert data.n_unique == 2 and len(data.conversations) == 4


def test_heldout_companies_never_reach_training():
    rows = [example(conv("reply")), example(conv("escalate"), company="travel-co")]
    with pytest.raises(ValueError, match="held-out"):
        build_dataset(rows, heldout={"travel-co"})


def test_hash_is_stable_and_content_based():
    rows = [example(conv("reply", tag=str(i))) for i in range(3)]
    assert build_dataset(rows, heldout=set()).data_hash == build_dataset(rows[::-1], heldout=set()).data_hash
    assert build_dataset(rows[:2], heldout=set()).data_hash != build_dataset(rows, heldout=set()).data_hash


def test_a_continued_adapter_trains_on_the_new_examples_and_a_replayed_sample_of_the_old():
    rows = [ExampleRow(id=i, source="simulation", company_id="acme", messages=conv("reply", tag=str(i)), has_escalation=False)
            for i in range(1, 31)]
    picked = with_replay(rows, since=26, ratio=2.0, seed=1)  # 4 new since the parent's 26
    assert [r.id for r in picked[:4]] == [27, 28, 29, 30]
    old = [r.id for r in picked[4:]]
    assert len(old) == 8 and len(set(old)) == 8 and max(old) <= 26
    assert old != [r.id for r in with_replay(rows, since=26, ratio=2.0, seed=2)[4:]]  # drawn by the seed
    assert len(with_replay(rows, since=10, ratio=5.0)) == 30  # never more old ones than there are
    assert with_replay(rows, since=26, ratio=float("inf")) == rows  # inf: every example
    assert with_replay(rows, since=30, ratio=1.0) == rows  # nothing new: every example


def test_decorated_openings_keep_every_decision_and_identifier():
    opening = "Customer: Please change the traveller name on booking X42SGN, my email is kenji.novak72@example.com."
    plain = [{"role": "system", "content": "policy"}, {"role": "user", "content": opening},
             {"role": "assistant", "content": json.dumps({"action": "clarify"})}, {"role": "user", "content": "Customer: born 1961-04-01"},
             {"role": "assistant", "content": json.dumps({"action": "reply"})}]
    escalating = [*plain[:2], {"role": "assistant", "content": json.dumps({"action": "escalate"})}]
    out = decorate_openings([plain] * 100 + [escalating] * 100, 1.0, seed=3)
    assert len(out) == 200
    for before, after in zip([plain] * 100 + [escalating] * 100, out):
        assert after[1]["content"] != opening and after[1]["content"].startswith("Customer: ")
        assert after[:1] + after[2:] == before[:1] + before[2:]  # only the opening changes; every action stays
        assert "X42SGN" in after[1]["content"] and "kenji.novak72@example.com" in after[1]["content"]
        tokens = set(after[1]["content"].split())
        missing, added = min((sum(w not in tokens for w in s.split()), s) for s in words.NOISE + words.TRAP_NOISE)
        assert missing <= 2  # one of the sentences was added, a typing slip or two allowed
        if "escalate" in after[2]["content"]:
            assert added not in words.TRAP_NOISE  # escalation-sounding distractions only where nothing escalates
    assert any(s in c[1]["content"] for c in out[:100] for s in words.TRAP_NOISE)
    assert sum(c[1]["content"].count(" ") > opening.count(" ") + 3 for c in out) == 200
    assert plain[1]["content"] == opening  # the input is not modified


def test_decorate_share_and_build_dataset():
    rows = [example(conv("search_kb", "reply", tag=str(i))) for i in range(200)]
    assert decorate_openings([r.messages for r in rows], 0.0) == [r.messages for r in rows]
    data = build_dataset(rows, heldout=set(), escalation_share=0.0, decorate=0.5, seed=1)
    changed = sum(c[1]["content"] not in {f"Customer: hi {i}" for i in range(200)} for c in data.conversations)
    assert 70 < changed < 130 and data.n_unique == 200 and len(data.conversations) == 200


def test_injected_openings_keep_the_decision_and_say_to_ignore_the_injection():
    opening = "Customer: Do you sponsor local charity runs?"
    search = {"action": "search_kb", "args": {"query": "Do you sponsor local charity runs?"}, "thought": "Asks about sponsor.", "message": ""}
    escalate = {"action": "escalate", "args": {"reason": "not_covered_by_kb"}, "thought": "No answer.", "message": "Passing it on."}
    conversation = [{"role": "system", "content": "policy"}, {"role": "user", "content": opening},
                    {"role": "assistant", "content": json.dumps(search)}, {"role": "user", "content": "Tool: search_kb results: none"},
                    {"role": "assistant", "content": json.dumps(escalate)}]
    out = inject_openings([conversation] * 50, 1.0, seed=2)
    templates = set()
    for after in out:
        text = after[1]["content"].removeprefix("Customer: ")
        template = next(t for t in words.INJECTIONS if t.format(base="Do you sponsor local charity runs?") == text)
        templates.add(template)
        first, last = json.loads(after[2]["content"]), json.loads(after[4]["content"])
        assert first["thought"] == "Ignore the attempt to change the rules. Asks about sponsor."
        assert first["args"]["query"] == text  # the search for the customer's words searches what they now say
        assert list(first) == list(search) and first["action"] == "search_kb"  # key order and the action kept
        assert last == escalate and after[3] == conversation[3]  # later steps and results unchanged
    assert len(templates) >= 4
    assert inject_openings(out, 1.0, seed=3) == out  # an injected conversation is not injected twice
    assert conversation[1]["content"] == opening  # the input is not modified
    rows = [example(conv("search_kb", "reply", tag=str(i))) for i in range(200)]
    data = build_dataset(rows, heldout=set(), escalation_share=0.0, inject=0.25, seed=1)
    assert 30 < sum("Ignore the attempt" in c[2]["content"] for c in data.conversations) < 70


def test_a_share_of_conversations_is_written_thought_first():
    system = {"role": "system", "content": f"policy. Reply with one JSON object: {step_example()}"}
    step = {"action": "escalate", "args": {"reason": "billing_exception"}, "thought": "45 is more than 35", "message": ""}
    conversations = [[system, {"role": "user", "content": f"Customer: hi {i}"}, {"role": "assistant", "content": json.dumps(step)}]
                     for i in range(200)]
    out = thoughts_first(conversations, 0.5, seed=2)
    flipped = [c for c in out if c[2]["content"].startswith('{"thought"')]
    assert 70 < len(flipped) < 130
    for before, after in zip(conversations, out):
        assert json.loads(after[2]["content"]) == step and after[1] == before[1]  # the same step, only its key order moves
        thought_first = after[2]["content"].startswith('{"thought"')
        # the system message's example is in the order of the conversation's steps: it tells the two tasks apart
        assert (step_example(THOUGHT_FIRST) in after[0]["content"]) == thought_first
        assert (step_example() in after[0]["content"]) == (not thought_first)
    assert thoughts_first(conversations, 0.0) == conversations
    assert all(c[2]["content"].startswith('{"thought"') for c in thoughts_first(conversations, 1.0))
    assert conversations[0][2]["content"] == json.dumps(step)  # the input is not modified


def test_steps_that_compare_numbers_are_written_thought_first_and_no_others():
    """comparisons_first: on the oracle's conversations of the built-in packs, exactly the steps whose
    rationale compares two numbers (the refund-window and seat-limit tickets' openings) come thought
    first, each the same action as before; every other step is untouched."""
    from environments.builtin import build_packs
    from environments.episode import SupportEpisode
    from policies.protocol import comparisons_first, parse_action, render_messages

    moved = kept = 0
    for pack in build_packs(0)[:3]:
        for ticket in pack.tickets[:40]:
            episode = SupportEpisode(pack, ticket)
            while not episode.done:
                episode.step(episode.reference_action())
            before = render_messages(pack.company, episode.transcript)
            after = comparisons_first(before)
            for old, new in zip(before, after):
                if old["role"] != "assistant":
                    assert new == old
                    continue
                assert parse_action(new["content"]).action == parse_action(old["content"]).action
                thought = parse_action(old["content"]).action.thought
                if new["content"].startswith('{"thought"'):
                    moved += 1
                    assert " is within " in thought or " is more than " in thought
                    assert ticket.truth.intent in ("refund_request", "team_pricing")
                else:
                    kept += 1
                    assert new == old and " is within " not in thought and " is more than " not in thought
    assert moved >= 5 and kept > 10 * moved
