"""The hand-written held-out packs in bench/packs: valid, held out, fully covered, and solvable.

    pytest tests/test_handwritten_packs.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from environments.actions import REASONS, RESOLUTIONS
from environments.pack import check_pack, load_pack
from loop.evaluate import evaluate
from policies.policy import OraclePolicy

PACKS_DIR = Path(__file__).parents[1] / "bench" / "packs"
HANDWRITTEN = ("cogwheel-cycles", "loomhouse-cowork")


@pytest.fixture(scope="module", params=HANDWRITTEN)
def pack_dir(request):
    return PACKS_DIR / request.param


def _turns(ticket):
    return [(ticket.opening, ticket.truth), *((f.message, f.truth) for f in ticket.truth.followups)]


def test_passes_check_pack_and_is_heldout(pack_dir):
    assert [str(p) for p in check_pack(pack_dir)] == []
    pack = load_pack(pack_dir)
    assert pack.id == pack_dir.name
    assert pack.company.split == "heldout"
    assert len(pack.tickets) >= 45 and 12 <= len(pack.articles) <= 20
    assert all(reason in pack.company.policy for reason in REASONS)


def test_covers_every_resolution_and_reason(pack_dir):
    pack = load_pack(pack_dir)
    truths = [truth for ticket in pack.tickets for truth in ticket.turns]
    assert {t.resolution for t in truths} == set(RESOLUTIONS)
    reasons = Counter(t.escalation_reason for t in truths if t.escalation_reason)
    assert set(reasons) == set(REASONS) and min(reasons.values()) >= 3, reasons
    assert sum("injection" in t.tags for t in pack.tickets) >= 4
    assert any(t.truth.followups for t in pack.tickets)


def test_truths_are_grounded(pack_dir):
    pack = load_pack(pack_dir)
    bodies = {a.id: a.body for a in pack.articles}
    for ticket in pack.tickets:
        conversation = " ".join(message for message, _ in _turns(ticket)).lower()
        for truth in ticket.turns:
            for fact in truth.facts:
                assert any(fact in bodies[a] for a in truth.kb_articles), (ticket.id, fact)
            for value in truth.needs.values():
                assert value.lower() not in conversation, (ticket.id, value)


def test_the_oracle_resolves_every_ticket(pack_dir):
    pack = load_pack(pack_dir)
    results = evaluate(OraclePolicy(), [pack], progress=False)
    assert len(results) == len(pack.tickets)
    for r in results:
        assert r.first_error is None and r.resolved, (r.ticket_id, [s.reason for s in r.steps])
        assert r.escalated == r.should_escalate, r.ticket_id
