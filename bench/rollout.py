"""Batched vs one-at-a-time generation of the real default student on the same prompts.

    .venv/bin/python bench/rollout.py [--prompts 16] [--batch 8] [--max-new-tokens 64]

The prompts are the first-step prompts of held-out built-in tickets (system policy + contract +
the customer's opening), rendered with SmolLM2's chat template. Both modes run greedily in one
process, one after the other, on the same prompts; the ratio is what to quote (the machine is
shared, so absolute numbers drift). Prints a table and writes bench/reports/rollout.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from environments.builtin import build_packs
from environments.episode import SupportEpisode
from policies.hf import HFStudent
from policies.models import DEFAULT_MODEL, resolve_model
from policies.protocol import render_messages
from report import publish  # bench/report.py: the script's folder is on sys.path


def prompt_lengths(student: HFStudent) -> list[int]:
    """Prompt tokens at every state the oracle visits, first 40 tickets of every built-in pack."""
    lengths = []
    for pack in build_packs(0):
        for ticket in pack.tickets[:40]:
            episode = SupportEpisode(pack, ticket)
            while not episode.done:
                lengths.append(student.count_tokens(render_messages(pack.company, episode.transcript)))
                episode.step(episode.reference_action())
    return lengths


def timed(student: HFStudent, prompts, batch_size: int) -> tuple[float, int]:
    student.batch_size = batch_size
    start = time.perf_counter()
    generations = student.generate_with_info(prompts)
    return time.perf_counter() - start, sum(g.completion_tokens for g in generations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    student = HFStudent(resolve_model(DEFAULT_MODEL), max_new_tokens=args.max_new_tokens)
    heldout = [p for p in build_packs(0) if p.company.split == "heldout"]
    tickets = [(p, t) for p in heldout for t in p.tickets][: args.prompts]
    prompts = [render_messages(p.company, SupportEpisode(p, t).transcript) for p, t in tickets]
    timed(student, prompts[:2], 2)  # warm-up: first-call allocations are not generation speed

    one_s, one_tokens = timed(student, prompts, 1)
    batch_s, batch_tokens = timed(student, prompts, args.batch)
    lengths = prompt_lengths(student)
    rows = [
        ("one at a time", 1, one_tokens, one_s, one_tokens / one_s),
        ("batched", args.batch, batch_tokens, batch_s, batch_tokens / batch_s),
    ]
    ratio = rows[1][4] / rows[0][4]
    lines = [
        f"# Rollout generation: {DEFAULT_MODEL}, {args.prompts} held-out first-step prompts, greedy, "
        f"max {args.max_new_tokens} new tokens, CPU",
        "",
        "| mode | batch | new tokens | seconds | new tokens/s |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {m} | {b} | {n} | {s:.1f} | {r:.1f} |" for m, b, n, s, r in rows),
        "",
        f"batched / one-at-a-time throughput: **{ratio:.2f}x**",
        "",
        f"prompt tokens over {len(lengths)} oracle-visited states: median {statistics.median(lengths):.0f}, max {max(lengths)}",
    ]
    publish("rollout", lines)


if __name__ == "__main__":
    main()
