"""Running a policy over tickets: every live episode advances one step per batched `act` call."""

from __future__ import annotations

import random
from typing import Sequence

from tqdm import tqdm

from environments.episode import MAX_STEPS, EpisodeResult, SupportEpisode
from environments.pack import Pack, Ticket
from policies.policy import Policy
from policies.protocol import parse_action


def eval_tickets(pack: Pack, limit: int | None) -> list[Ticket]:
    """The fixed evaluation set of a pack: a seeded shuffle (by company id), the first `limit`."""
    tickets = sorted(pack.tickets, key=lambda t: t.id)
    random.Random(pack.id).shuffle(tickets)
    return tickets if limit is None else tickets[:limit]


def run_episodes(
    policy: Policy,
    work: Sequence[tuple[Pack, Ticket]],
    *,
    max_steps: int = MAX_STEPS,
    progress: bool = True,
) -> list[SupportEpisode]:
    """Roll `policy` out on every (pack, ticket); returns the finished episodes in input order."""
    episodes = [SupportEpisode(pack, ticket, max_steps=max_steps) for pack, ticket in work]
    return advance(policy, episodes, progress=progress)


def advance(policy: Policy, episodes: list[SupportEpisode], *, progress: bool = True) -> list[SupportEpisode]:
    """Step every live episode with one batched `act` call per step until all are done."""
    with tqdm(total=len(episodes), desc=f"{policy.name} episodes", unit="ep", disable=not progress, leave=False) as bar:
        bar.update(sum(e.done for e in episodes))
        while live := [e for e in episodes if not e.done]:
            for episode, raw in zip(live, policy.act(live), strict=True):
                apply_output(episode, raw)
            bar.update(sum(e.done for e in live))
    return episodes


def apply_output(episode: SupportEpisode, raw: str) -> None:
    """Parse one model output and step the episode with it (an invalid output ends it)."""
    parsed = parse_action(raw)
    if parsed.action is None:
        episode.step_invalid(raw, parsed.error or "invalid")
    else:
        episode.step(parsed.action, raw)


def evaluate(policy: Policy, packs: Sequence[Pack], *, limit: int | None = None, max_steps: int = MAX_STEPS, progress: bool = True) -> list[EpisodeResult]:
    work = [(pack, t) for pack in packs for t in eval_tickets(pack, limit)]
    return [e.result() for e in run_episodes(policy, work, max_steps=max_steps, progress=progress)]
