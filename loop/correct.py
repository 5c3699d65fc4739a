"""SCoRe: correct only the first wrong step of each student trajectory, then let the student go on.

For each finished student episode the teacher judges the trajectory. At the first error the log is
cut before that step, the teacher's ONE replacement is executed, and the student continues from
there; the result is judged again, at most `max_repairs` times. A repaired trajectory is kept only
if its outcome verifies correct; one that needed no repair is kept with probability `keep_clean`.
The kept trajectory is verified prefix + teacher step + student continuation: wrong steps are
never executed in it, so they never reach training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from tqdm import tqdm

from environments.actions import Action
from environments.episode import SupportEpisode
from loop.evaluate import advance
from policies.policy import Policy
from policies.teacher import Teacher, TeacherContext, TeacherUnavailable, Trajectory, Usage

Fate = Literal["clean", "clean_skipped", "repaired", "rejected_correction", "repair_cap", "unverified_outcome", "teacher_failed"]


@dataclass(frozen=True)
class Repair:
    step_idx: int  # the first wrong step of the trajectory being judged
    student_action: Action | None  # None: the student's output did not parse
    student_raw: str
    teacher_action: Action
    verified: bool  # the environment's checker accepted the teacher's step
    rationale: str
    usage: Usage


@dataclass
class Corrected:
    """One student rollout and what SCoRe made of it."""

    original: SupportEpisode
    current: SupportEpisode
    repairs: list[Repair] = field(default_factory=list)
    teacher_steps: set[int] = field(default_factory=set)  # indices of `current.steps` the teacher wrote
    fate: Fate | None = None
    judge_usage: Usage = Usage()  # judgements that found no error cost too
    teacher_error: str | None = None  # why the teacher gave no judgement (fate teacher_failed)

    @property
    def kept(self) -> bool:
        return self.fate in ("clean", "repaired")

    @property
    def usage(self) -> Usage:
        return sum((r.usage for r in self.repairs), self.judge_usage)


def score_correct(
    student: Policy,
    teacher: Teacher,
    episodes: list[SupportEpisode],
    *,
    max_repairs: int = 3,
    keep_clean: float = 0.5,
    rng: random.Random,
    progress: bool = False,
) -> list[Corrected]:
    """SCoRe over finished student episodes; students continue in one batch per repair round."""
    items = [Corrected(e, e) for e in episodes]
    to_judge = list(items)
    with tqdm(total=len(items), desc="SCoRe corrections", unit="traj", disable=not progress, leave=False) as bar:
        while to_judge:
            continuing: list[Corrected] = []
            for item in to_judge:
                _judge_once(item, teacher, max_repairs, keep_clean, rng)
                if item.fate is None and not item.current.done:
                    continuing.append(item)
            advance(student, [i.current for i in continuing], progress=False)
            to_judge = [i for i in items if i.fate is None]
            bar.update(len(items) - len(to_judge) - bar.n)
    return items


def _judge_once(item: Corrected, teacher: Teacher, max_repairs: int, keep_clean: float, rng: random.Random) -> None:
    episode = item.current
    context = TeacherContext(episode.pack, episode.ticket)
    try:
        judgement = teacher.judge(Trajectory.of(episode), context)
    except TeacherUnavailable as e:  # the trajectory is not kept; its verified repairs so far are stored
        item.judge_usage += e.usage
        item.fate, item.teacher_error = "teacher_failed", str(e)
        return
    if judgement.first_error is None:
        item.judge_usage += judgement.usage
        if not episode.result().resolved:
            item.fate = "unverified_outcome"
        elif item.repairs:
            item.fate = "repaired"
        else:
            item.fate = "clean" if rng.random() < keep_clean else "clean_skipped"
        return
    if len(item.repairs) >= max_repairs:
        item.judge_usage += judgement.usage
        item.fate = "repair_cap"
        return
    k, replacement = judgement.first_error, judgement.replacement
    wrong = episode.steps[k]
    prefix = [s.action for s in episode.steps[:k]]
    if replacement is None or any(a is None for a in prefix):
        raise ValueError(f"teacher {teacher.name} named step {k} wrong but gave no usable replacement")
    repaired = SupportEpisode.replay(episode.pack, episode.ticket, prefix, max_steps=episode.max_steps)  # type: ignore[arg-type]
    verdict = repaired.judge(replacement)
    item.repairs.append(Repair(k, wrong.action, wrong.raw, replacement, verdict.acceptable, judgement.rationale, judgement.usage))
    if not verdict.acceptable:  # the checker rejects the teacher's step: stored, never trained on
        item.fate = "rejected_correction"
        return
    repaired.step(replacement)
    item.teacher_steps = {i for i in item.teacher_steps if i < k} | {k}
    item.current = repaired
