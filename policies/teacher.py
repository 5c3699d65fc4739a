"""The teacher seam: judge a trajectory (first wrong step + ONE replacement) or demonstrate a step.

`OracleTeacher` is the environment's own reference policy and checker: exact and free, the
offline default. `LiteLLMTeacher` (policies/litellm_teacher.py) asks any model litellm reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from environments.actions import Action
from environments.episode import Entry, SupportEpisode
from environments.pack import Pack, Ticket


@dataclass(frozen=True)
class Trajectory:
    """The agent's steps in order (None: an output that did not parse) and the transcript they
    produced, starting with the customer's opening."""

    actions: tuple[Action | None, ...]
    transcript: tuple[Entry, ...]

    @classmethod
    def of(cls, episode: SupportEpisode) -> Trajectory:
        return cls(tuple(s.action for s in episode.steps), tuple(episode.transcript))


@dataclass(frozen=True)
class TeacherContext:
    pack: Pack
    ticket: Ticket | None  # the simulated ticket, hidden truth included; None for production traces


@dataclass(frozen=True)
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.calls + other.calls, self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens, self.cost_usd + other.cost_usd)


class TeacherUnavailable(RuntimeError):
    """The teacher gave no answer this time (every attempt failed, or its budget is spent); `usage`
    is what the failed attempts cost. The loop records it, skips that item and goes on."""

    def __init__(self, message: str, usage: Usage = Usage()):
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class Judgement:
    first_error: int | None  # index into trajectory.actions; None when every step is right
    replacement: Action | None  # the ONE step to execute instead of the wrong one
    rationale: str
    usage: Usage = Usage()


@dataclass(frozen=True)
class Demonstration:
    action: Action
    usage: Usage = Usage()


class Teacher(Protocol):
    name: str

    def judge(self, trajectory: Trajectory, context: TeacherContext) -> Judgement: ...

    def demonstrate(self, prefix: Trajectory, context: TeacherContext) -> Demonstration:
        """The action for the state reached after `prefix` (its actions must all be valid)."""
        ...


class OracleTeacher:
    """Judges with the environment's checker and replaces with its reference action. Free, but
    each answer counts as one call, so methods compare at the same teacher budget."""

    name = "oracle"

    def judge(self, trajectory: Trajectory, context: TeacherContext) -> Judgement:
        ticket = _need_ticket(context)
        episode = SupportEpisode(context.pack, ticket)
        for i, action in enumerate(trajectory.actions):
            if action is None:
                return Judgement(i, episode.reference_action(), "the output is not a valid action", ONE_CALL)
            verdict = episode.judge(action)
            if not verdict.acceptable:
                return Judgement(i, episode.reference_action(), verdict.reason, ONE_CALL)
            episode.step(action)
            if episode.done:
                break
        return Judgement(None, None, "every step is acceptable", ONE_CALL)

    def demonstrate(self, prefix: Trajectory, context: TeacherContext) -> Demonstration:
        episode = SupportEpisode.replay(context.pack, _need_ticket(context), [a for a in prefix.actions if a is not None])
        return Demonstration(episode.reference_action(), ONE_CALL)


ONE_CALL = Usage(calls=1)


def _need_ticket(context: TeacherContext) -> Ticket:
    if context.ticket is None:
        raise ValueError("the oracle teacher needs a simulated ticket's truth; use a LiteLLM teacher for production traces")
    return context.ticket
