"""Ticket selection before a collection: the uncertainty rule picks what lies nearest τ, and keeps
every escalation reason and every company in what it picks."""

import hashlib
import random

import pytest

from environments.builtin import build_packs
from environments.episode import SupportEpisode
from loop.evaluate import training_pool
from loop.selection import select_tickets, stratum
from policies.protocol import render_messages

TRAIN = [p for p in build_packs(0) if p.company.split == "train"]
POOL = training_pool(TRAIN)


class ConstructedScorer:
    """p(escalate) at a ticket's opening: a fixed pseudo-random value per opening text."""

    def __init__(self):
        self.calls: list[int] = []

    @staticmethod
    def p(prompt) -> float:
        opening = prompt[-1]["content"]
        return int(hashlib.sha256(opening.encode()).hexdigest()[:8], 16) / 16**8

    def escalation_probabilities(self, prompts):
        self.calls.append(len(prompts))
        return [self.p(p) for p in prompts]


def distance_of(work, tau: float) -> float:
    pack, ticket = work
    return abs(ConstructedScorer.p(render_messages(pack.company, SupportEpisode(pack, ticket).transcript)) - tau)


def test_uncertainty_picks_the_tickets_nearest_tau_and_keeps_every_reason_and_company():
    scorer, tau = ConstructedScorer(), 0.3
    pick = select_tickets(scorer, POOL, 40, rule="uncertainty", tau=tau, rng=random.Random(0), pool_factor=3)
    candidates = random.Random(0).sample(POOL, 120)  # what it scored: the same draw
    assert sum(scorer.calls) == pick.candidates == 120 and len(pick.tickets) == 40
    ids = {t.id for _, t in pick.tickets}
    # balance: every reason (and "should not escalate") and every company among the candidates is picked
    assert {stratum(t) for _, t in pick.tickets} == {stratum(t) for _, t in candidates}
    assert {p.id for p, _ in pick.tickets} == {p.id for p, _ in candidates}
    # the rest are the nearest: at most one pick per reason and per company comes from farther away
    nearest = sorted(candidates, key=lambda w: distance_of(w, tau))
    balance = len({stratum(t) for _, t in candidates}) + len({p.id for p, _ in candidates})
    assert {t.id for _, t in nearest[: 40 - balance]} <= ids
    assert pick.mean_distance < pick.pool_mean_distance
    assert pick.mean_distance == pytest.approx(sum(distance_of(w, tau) for w in pick.tickets) / 40)


def test_mixed_takes_half_nearest_and_half_at_random_and_uniform_scores_nothing():
    scorer = ConstructedScorer()
    mixed = select_tickets(scorer, POOL, 40, rule="mixed", tau=0.5, rng=random.Random(1))
    near = select_tickets(ConstructedScorer(), POOL, 20, rule="uncertainty", tau=0.5, rng=random.Random(1), pool_factor=6)
    assert len(mixed.tickets) == 40 and len({t.id for _, t in mixed.tickets}) == 40
    assert {t.id for _, t in near.tickets} <= {t.id for _, t in mixed.tickets}  # the same candidates, its nearest half
    uniform_scorer = ConstructedScorer()
    uniform = select_tickets(uniform_scorer, POOL, 40, rule="uniform", tau=0.5, rng=random.Random(2))
    assert uniform_scorer.calls == [] and uniform.mean_distance is None
    assert uniform.tickets == random.Random(2).sample(POOL, 40)  # the behaviour before selection existed
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_tickets(scorer, POOL, 4, rule="nearest", tau=None, rng=random.Random(0))
