"""Which training tickets a collection rolls out: at random, or where the collector is unsure.

A rollout of a ticket the student already gets right pays the teacher to judge a trajectory that
needed no repair. `select_tickets` draws a candidate pool larger than the collection needs, scores
each candidate by the collector's p(escalate) at the ticket's opening (what the calibration issue
defined: read at the action field), and picks by `rule`:

- "uniform": a random sample of the pool, nothing scored (the behaviour before selection existed);
- "uncertainty": the candidates whose p(escalate) lies closest to the collector's operating point
  τ (0.5 without one), after one pick from each escalation reason and from each company, so that
  none of them disappears from what is collected;
- "mixed": half as "uncertainty", the other half at random from the rest, so the data does not
  collapse onto the decision boundary.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from environments.episode import SupportEpisode
from environments.pack import Pack, Ticket
from loop.calibration import ScoringStudent, p_escalate
from policies.protocol import render_messages

RULES = ("uniform", "uncertainty", "mixed")
Work = tuple[Pack, Ticket]


@dataclass(frozen=True)
class Pick:
    tickets: list[Work]
    rule: str
    tau: float  # the operating point distances were measured from
    mean_distance: float | None  # mean |p(escalate) − τ| of the picked tickets (lower: nearer the boundary); None unscored
    pool_mean_distance: float | None  # the same over every scored candidate
    candidates: int  # how many were scored


def stratum(ticket: Ticket) -> str:
    """The escalation reason a ticket should end on, or "none" for one that should not escalate."""
    reasons = [t.escalation_reason for t in ticket.turns if t.resolution == "escalate"]
    return reasons[0] if reasons else "none"


def select_tickets(student: ScoringStudent, pool: Sequence[Work], n: int, *, rule: str, tau: float | None, rng: random.Random,
                   pool_factor: int = 3, progress: bool = False) -> Pick:
    """`n` tickets of `pool` for the next collection, picked by `rule` from `pool_factor`·n candidates."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}: expected one of {', '.join(RULES)}")
    point = 0.5 if tau is None else tau
    if rule == "uniform":  # today's behaviour, at today's cost: nothing is scored
        return Pick(rng.sample(list(pool), min(n, len(pool))), rule, point, None, None, 0)
    candidates = rng.sample(list(pool), min(len(pool), pool_factor * n))
    openings = [render_messages(pack.company, SupportEpisode(pack, ticket).transcript) for pack, ticket in candidates]
    distance = [abs(p - point) for p in p_escalate(student, openings, progress=progress, desc="p(escalate) at candidate openings")]
    n = min(n, len(candidates))
    chosen = nearest_balanced(candidates, distance, n if rule == "uncertainty" else n // 2)
    if rule == "mixed":
        taken = set(chosen)
        chosen += rng.sample([i for i in range(len(candidates)) if i not in taken], n - len(chosen))
    return Pick([candidates[i] for i in chosen], rule, point, sum(distance[i] for i in chosen) / max(len(chosen), 1),
                sum(distance) / len(distance), len(candidates))


def nearest_balanced(candidates: Sequence[Work], distance: Sequence[float], n: int) -> list[int]:
    """Indices of `n` candidates: the nearest of each escalation reason, then the nearest of each
    company not yet picked, then the nearest of the rest (every step in order of distance)."""
    order = sorted(range(len(candidates)), key=lambda i: distance[i])
    chosen: list[int] = []
    for key in (lambda i: stratum(candidates[i][1]), lambda i: candidates[i][0].id):
        seen = {key(i) for i in chosen}
        for i in order:
            if len(chosen) < n and i not in chosen and key(i) not in seen:
                chosen.append(i)
                seen.add(key(i))
    chosen += [i for i in order if i not in chosen][: n - len(chosen)]
    return chosen
