"""Policies: the student behind the action protocol, and the reference policies (the oracle, two
constant policies and a keyword rule).

A `Policy` maps a batch of live episodes to one raw text each (what a model would have written);
the evaluation parses that text like any student output. Only the oracle reads the hidden truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from environments.actions import Action
from environments.episode import SupportEpisode
from policies.protocol import render_messages
from policies.student import Student
from policies.teacher import Teacher, TeacherContext, TeacherUnavailable, Trajectory, Usage


TEACHER_FAILED = "teacher unavailable: "  # how a demonstration step the teacher could not give is stored


@dataclass(frozen=True)
class Output:
    """A policy's answer at one state: the raw text, and its p(escalate) there when it has one."""

    text: str
    p_escalate: float | None = None

    @classmethod
    def certain(cls, action: Action) -> Output:
        """A deterministic policy's answer: its p(escalate) is 1 or 0."""
        return cls(action.to_json(), 1.0 if action.action == "escalate" else 0.0)


class Policy(Protocol):
    name: str

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]: ...


class StudentPolicy:
    """A student model: sees only the company (policy) and the public transcript."""

    def __init__(self, student: Student, name: str = "student"):
        self.student, self.name = student, name

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        generations = self.student.generate_with_info([render_messages(e.pack.company, e.transcript) for e in episodes])
        return [Output(g.text, g.p_escalate) for g in generations]


class TeacherPolicy:
    """A teacher acting as the agent, one `demonstrate` call per step. Privileged (the warm start's
    demonstrations), it sees each ticket's hidden truth; otherwise only what a student sees."""

    def __init__(self, teacher: Teacher, *, privileged: bool):
        self.teacher, self.privileged = teacher, privileged
        self.name = f"teacher:{teacher.name}"
        self.usage = Usage()

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        out = []
        for e in episodes:
            context = TeacherContext(e.pack, e.ticket if self.privileged else None)
            try:
                demo = self.teacher.demonstrate(Trajectory.of(e), context)
            except TeacherUnavailable as error:  # kept as this step's raw text: an invalid step ends the episode unresolved
                self.usage += error.usage
                out.append(Output(f"{TEACHER_FAILED}{error}"))
                continue
            self.usage += demo.usage
            out.append(Output.certain(demo.action))
        return out


class OraclePolicy:
    """The environment's own reference policy (reads the ticket's truth)."""

    name = "oracle"

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        return [Output.certain(e.reference_action()) for e in episodes]


class AlwaysEscalate:
    name = "always-escalate"

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        action = Action(action="escalate", args={"reason": "not_covered_by_kb"}, message="Let me pass you to a colleague.")
        return [Output.certain(action) for _ in episodes]


class AlwaysReply:
    name = "always-reply"

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        action = Action(action="reply", message="Thanks for reaching out! Please check our help centre for the details.")
        return [Output.certain(action) for _ in episodes]


# Surface words a naive triage rule would escalate on, checked in this order.
KEYWORDS: tuple[tuple[str, str], ...] = (
    ("security_sensitive", r"hack|stolen|fraud|unauthori[sz]ed|didn'?t log in|someone (else )?(logged|accessed)"),
    ("legal_compliance", r"gdpr|lawyer|legal|sue|regulator|ombudsman|delete (all )?my data"),
    ("likely_bug", r"crash|bug|error|broken|not working|doesn'?t work"),
    ("enterprise_sales", r"seats|licen[cs]es|enterprise|whole team|company-wide"),
    ("churn_risk", r"cancel|leaving|competitor|switch(ing)? to"),
    ("billing_exception", r"refund|charged|overcharge|money back|chargeback"),
)


class KeywordPolicy:
    """Escalate on a keyword of the customer's message; otherwise search the KB and reply with the
    top article. The honest baseline: it shows the packs are not solvable by surface words."""

    name = "keyword"

    def act(self, episodes: Sequence[SupportEpisode]) -> list[Output]:
        return [Output.certain(self._one(e)) for e in episodes]

    def _one(self, episode: SupportEpisode) -> Action:
        last = episode.transcript[-1]
        if last.role == "tool":  # search results came back: answer with the best article
            body = last.content.split("\n")[1].split(": ", 1)[-1] if "\n" in last.content else "Sorry, I found nothing on that."
            return Action(action="reply", message=body)
        text = last.content.lower()
        for reason, pattern in KEYWORDS:
            if re.search(pattern, text):
                return Action(action="escalate", args={"reason": reason}, message="I'm passing this to a specialist.")
        return Action(action="search_kb", args={"query": last.content[:200]})


def baseline(name: str) -> Policy:
    if name == "oracle":
        return OraclePolicy()
    if name == "always-escalate":
        return AlwaysEscalate()
    if name == "always-reply":
        return AlwaysReply()
    if name == "keyword":
        return KeywordPolicy()
    raise ValueError(f"unknown policy {name!r}: expected oracle, always-escalate, always-reply or keyword")
