"""The teacher seam: judge a trajectory (first wrong step + ONE replacement) or demonstrate a step.

`OracleTeacher` is the environment's own reference policy and checker: exact and free, the
offline default. `LiteLLMTeacher` (policies/litellm_teacher.py) asks any model litellm reaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Protocol

from environments.actions import Action
from environments.episode import Entry, SupportEpisode
from environments.pack import Pack, Ticket
from policies.protocol import ACTION_CONTRACT, THOUGHT_GUIDE, system_prompt


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
    """Judges with the environment's checker and replaces with its reference action. Free, but each
    answer counts as one call and, given `count_tokens` (the student's tokenizer, say), as the tokens
    a model teacher would be charged for it: the prompts `LiteLLMTeacher` sends for the same
    question and the JSON answer. So methods and selection rules compare at the same teacher budget."""

    name = "oracle"

    def __init__(self, count_tokens: Callable[[str], int] | None = None):
        self.count_tokens = count_tokens

    def judge(self, trajectory: Trajectory, context: TeacherContext) -> Judgement:
        ticket = _need_ticket(context)
        episode = SupportEpisode(context.pack, ticket)
        first, reason = None, "every step is acceptable"
        for i, action in enumerate(trajectory.actions):
            verdict = episode.judge(action) if action is not None else None
            if verdict is None or not verdict.acceptable:
                first, reason = i, verdict.reason if verdict is not None else "the output is not a valid action"
                break
            episode.step(action)
            if episode.done:
                break
        replacement = episode.reference_action() if first is not None else None
        answer = json.dumps({"first_error": first, "replacement": json.loads(replacement.to_json()) if replacement else None,
                             "rationale": reason})
        return Judgement(first, replacement, reason, self._usage(judge_messages(trajectory, context), answer))

    def demonstrate(self, prefix: Trajectory, context: TeacherContext) -> Demonstration:
        episode = SupportEpisode.replay(context.pack, _need_ticket(context), [a for a in prefix.actions if a is not None])
        action = episode.reference_action()
        return Demonstration(action, self._usage(demonstrate_messages(prefix, context), action.to_json()))

    def _usage(self, messages: list[dict[str, str]], answer: str) -> Usage:
        if self.count_tokens is None:
            return ONE_CALL
        return Usage(1, sum(self.count_tokens(m["content"]) for m in messages), self.count_tokens(answer))


ONE_CALL = Usage(calls=1)


def _need_ticket(context: TeacherContext) -> Ticket:
    if context.ticket is None:
        raise ValueError("the oracle teacher needs a simulated ticket's truth; use a LiteLLM teacher for production traces")
    return context.ticket


# --- the prompts a model teacher gets (LiteLLMTeacher sends them; the oracle counts them) --------


def judge_messages(trajectory: Trajectory, context: TeacherContext) -> list[dict[str, str]]:
    """Find the first wrong step of `trajectory`, and the ONE action to take instead."""
    system = (
        f"You review the steps of a support agent of {context.pack.company.name}.\n"
        f"Company policy:\n{context.pack.company.policy.strip()}\n\n"
        f'The agent was told:\n"""\n{ACTION_CONTRACT}\n"""\n{THOUGHT_GUIDE}'
    )
    user = (
        f"{situation(context.ticket, trajectory.transcript)}\n\n"
        "Find the FIRST agent step that is wrong: against the policy, not a valid action, asking for a "
        "detail that is not missing, answering without a needed detail or fact, or escalating when it "
        "should not or with the wrong reason. Later steps do not matter.\n"
        "Answer with ONE JSON object and nothing else:\n"
        '{"first_error": <step number, or null when every step is right>, '
        '"replacement": <the ONE agent action to take instead, in the format the agent was told, or null>, '
        '"rationale": "<one sentence>"}'
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def demonstrate_messages(prefix: Trajectory, context: TeacherContext) -> list[dict[str, str]]:
    """Write the agent's next step after `prefix`."""
    user = f"{situation(context.ticket, prefix.transcript)}\n\nWrite the agent's next step. {THOUGHT_GUIDE}"
    return [{"role": "system", "content": system_prompt(context.pack.company)}, {"role": "user", "content": user}]


def situation(ticket: Ticket | None, transcript: tuple[Entry, ...]) -> str:
    """The hidden truth (in simulation) and the transcript with numbered agent steps."""
    lines = []
    if ticket is not None:
        lines.append("Hidden truth of each customer turn (privileged: the student agent never sees it): resolution = how the turn must "
                     "end; needs = details to ask for first; facts = what a correct reply must contain.")
        for i, truth in enumerate(ticket.turns):
            lines.append(f"- turn {i}: {json.dumps(truth.model_dump(exclude={'followups'}, exclude_defaults=True))}")
        lines.append("")
    lines.append("Transcript (tool lines are the KB results the agent saw):")
    step = 0
    for entry in transcript:
        if entry.role == "agent":
            lines.append(f"[step {step}] agent: {entry.content}")
            step += 1
        else:
            lines.append(f"{entry.role}: {entry.content}")
    return "\n".join(lines)
