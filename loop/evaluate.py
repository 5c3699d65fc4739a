"""Running a policy over tickets: every live episode advances one step per batched `act` call."""

from __future__ import annotations

import random
from typing import Sequence

from tqdm import tqdm

from environments.episode import MAX_STEPS, EpisodeResult, SupportEpisode
from environments.pack import Pack, Ticket
from policies.policy import Output, Policy
from policies.protocol import parse_action


VALIDATION_TICKETS = 20  # per training company (a quarter of a smaller one): never trained on; recipes are chosen and τ is fitted on them


def eval_tickets(pack: Pack, limit: int | None) -> list[Ticket]:
    """The fixed evaluation set of a pack: a seeded shuffle (by company id), the first `limit`.

    On a training company the first `VALIDATION_TICKETS` of that order are its validation split."""
    tickets = sorted(pack.tickets, key=lambda t: t.id)
    random.Random(pack.id).shuffle(tickets)
    return tickets if limit is None else tickets[:limit]


def validation_tickets(pack: Pack, limit: int | None = None) -> list[Ticket]:
    """A training company's validation split (the first `limit` of it); held-out companies have none.

    The split is the first `VALIDATION_TICKETS` of `eval_tickets`' order, or a quarter of a pack too
    small for that, so a small pack keeps most of its tickets for training."""
    if pack.company.split != "train":
        raise ValueError(f"{pack.id} is held out: validation tickets come from training companies only")
    size = min(VALIDATION_TICKETS, len(pack.tickets) // 4)
    return eval_tickets(pack, size if limit is None else min(limit, size))


def training_pool(packs: Sequence[Pack]) -> list[tuple[Pack, Ticket]]:
    """Every ticket of the training companies outside their validation splits: what may be trained on."""
    pool = []
    for pack in packs:
        if pack.company.split != "train":
            raise ValueError(f"{pack.id} is held out: it is never trained on")
        held = {t.id for t in validation_tickets(pack)}
        pool += [(pack, t) for t in pack.tickets if t.id not in held]
    return pool


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
            for episode, output in zip(live, policy.act(live), strict=True):
                apply_output(episode, output)
            bar.update(sum(e.done for e in live))
    return episodes


def apply_output(episode: SupportEpisode, output: Output) -> None:
    """Parse one model output and step the episode with it (an invalid output ends it)."""
    parsed = parse_action(output.text)
    if parsed.action is None:
        episode.step_invalid(output.text, parsed.error or "invalid", p_escalate=output.p_escalate)
    else:
        episode.step(parsed.action, output.text, p_escalate=output.p_escalate)


def evaluate(policy: Policy, packs: Sequence[Pack], *, limit: int | None = None, max_steps: int = MAX_STEPS, progress: bool = True) -> list[EpisodeResult]:
    work = [(pack, t) for pack in packs for t in eval_tickets(pack, limit)]
    return [e.result() for e in run_episodes(policy, work, max_steps=max_steps, progress=progress)]
