"""One simulated support conversation: the scripted customer, the tools, the checker, the oracle.

    episode = SupportEpisode(pack, ticket)
    while not episode.done:
        result = episode.step(policy(episode.transcript))   # or episode.step_invalid(raw, why)

`judge(action)` is the checker: whether an action is in the set of acceptable actions for the
current state, and why. `reference_action()` is the oracle: an acceptable action with a grounded
message, computed from the ticket's hidden truth. An episode is single-use and deterministic, so
`replay(pack, ticket, actions)` rebuilds any state (SCoRe cuts a trajectory and continues there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from environments.actions import Action
from environments.pack import Pack, Ticket, Truth, need_phrases

MAX_STEPS = 12  # enough for clarify + search + ticket + reply on three customer turns
MAX_SEARCHES_PER_TURN = 2
Outcome = Literal["running", "resolved", "escalated", "wrong_reply", "wrong_escalation", "invalid", "step_limit"]


# --- text normalisation for fact matching -------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ZERO_CENTS = re.compile(r"(?<=\d)\.00\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace, and write numbers one way ("1,000.00" -> "1000")."""
    text = _ZERO_CENTS.sub("", _THOUSANDS.sub("", text.lower()))
    return " ".join(text.split())


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(normalize(text)))


def mentions(message: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", normalize(message)) is not None


# --- small typed results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One line of the public transcript: what a policy may see."""

    role: Literal["customer", "agent", "tool"]
    content: str


@dataclass(frozen=True)
class Verdict:
    acceptable: bool
    reason: str


@dataclass(frozen=True)
class StepResult:
    observation: str  # the tool result or the customer's next message; "" when nothing comes back
    done: bool
    acceptable: bool
    reason: str


@dataclass(frozen=True)
class StepRecord:
    index: int
    turn: int  # which customer turn (0 = the opening) the step belongs to
    action: Action | None  # None: the output did not parse or validate
    raw: str
    acceptable: bool
    reason: str
    observation: str
    escalation_ok: bool = False  # escalating (with the turn's reason) was acceptable at this state
    p_escalate: float | None = None  # the policy's p(escalate) at this state, when it reported one


@dataclass(frozen=True)
class EpisodeResult:
    company_id: str
    ticket_id: str
    steps: tuple[StepRecord, ...]
    outcome: Outcome
    escalated: bool
    escalation_reason: str | None
    should_escalate: bool
    correct_escalation: bool  # escalated on a turn whose truth is escalate
    reason_correct: bool | None  # the code was right, when the escalation was correct
    first_error: int | None  # index of the first step outside the acceptable set

    @property
    def resolved(self) -> bool:
        return self.outcome in ("resolved", "escalated")

    @property
    def n_valid(self) -> int:
        return sum(s.action is not None for s in self.steps)

    @property
    def n_acceptable(self) -> int:
        return sum(s.acceptable for s in self.steps)

    @property
    def first_action_ok(self) -> bool:
        return bool(self.steps) and self.steps[0].acceptable


# --- the episode --------------------------------------------------------------------------------


@dataclass
class _TurnState:
    truth: Truth
    obtained: set[str] = field(default_factory=set)
    searches: int = 0
    ticket_created: bool = False
    ticket_updated: bool = False

    @property
    def missing(self) -> list[str]:
        return [n for n in self.truth.needs if n not in self.obtained]


class SupportEpisode:
    def __init__(self, pack: Pack, ticket: Ticket, *, max_steps: int = MAX_STEPS):
        self.pack, self.ticket, self.max_steps = pack, ticket, max_steps
        self.transcript: list[Entry] = [Entry("customer", ticket.opening)]
        self.steps: list[StepRecord] = []
        self.outcome: Outcome = "running"
        self.tickets: dict[str, dict[str, str]] = {}  # the ticket system: id -> summary/priority/status/notes
        self._turn_no = 0
        self._turn = _TurnState(ticket.truth)
        self._escalation: Action | None = None
        self._escalation_truth: Truth | None = None

    @classmethod
    def replay(cls, pack: Pack, ticket: Ticket, actions: list[Action], *, max_steps: int = MAX_STEPS) -> SupportEpisode:
        episode = cls(pack, ticket, max_steps=max_steps)
        for action in actions:
            if episode.done:
                raise ValueError("replayed actions continue past the end of the episode")
            episode.step(action)
        return episode

    @property
    def done(self) -> bool:
        return self.outcome != "running"

    @property
    def truth(self) -> Truth:
        """The hidden truth of the current customer turn (for the checker, oracle and teachers)."""
        return self._turn.truth

    @property
    def turn(self) -> int:
        return self._turn_no

    # --- the checker ---------------------------------------------------------------------------

    def judge(self, action: Action) -> Verdict:
        """Whether `action` is in the acceptable set for the current state, and why."""
        state, truth = self._turn, self._turn.truth
        missing = state.missing
        if action.action == "search_kb":
            if state.searches >= MAX_SEARCHES_PER_TURN:
                return Verdict(False, f"already searched {state.searches} times this turn")
            return Verdict(True, "searching the KB is always allowed before answering")
        if action.action == "clarify":
            if not missing:
                return Verdict(False, "nothing is missing: the clarification is unnecessary")
            asked = self._asked_needs(action.message)
            if not asked:
                return Verdict(False, f"clarification does not ask for the missing {_names(missing)}")
            return Verdict(True, f"asks for the missing {_names(asked)}")
        if action.action == "create_ticket":
            if truth.resolution != "create_ticket_then_reply":
                return Verdict(False, "no ticket is needed for this request")
            if state.ticket_created:
                return Verdict(False, "a ticket was already created this turn")
            return Verdict(True, "logs the ticket the policy asks for")
        if action.action == "update_ticket":
            if action.args["ticket_id"] not in self.tickets or not state.ticket_created:
                return Verdict(False, f"no ticket {action.args['ticket_id']!r} was created this turn")
            if state.ticket_updated:
                return Verdict(False, "the ticket was already updated this turn")
            return Verdict(True, "adds a note to the ticket created this turn")
        if action.action == "escalate":
            if truth.resolution != "escalate":
                return Verdict(False, f"over-escalation: this turn should end with {truth.resolution}")
            if action.reason != truth.escalation_reason:
                return Verdict(False, f"wrong escalation reason {action.reason}, expected {truth.escalation_reason}")
            if truth.escalation_reason == "not_covered_by_kb" and state.searches == 0:
                return Verdict(False, "escalated as not covered by the KB without searching it")
            return Verdict(True, f"escalates with the right reason {truth.escalation_reason}")
        # reply
        if truth.resolution == "escalate":
            return Verdict(False, f"under-escalation: should escalate with {truth.escalation_reason}")
        if missing:
            return Verdict(False, f"replies before obtaining the {_names(missing)}")
        if truth.resolution == "create_ticket_then_reply" and not state.ticket_created:
            return Verdict(False, "replies before logging the ticket the policy asks for")
        text = normalize(action.message)
        lacking = [f for f in truth.facts if normalize(f) not in text]
        if lacking:
            return Verdict(False, f"reply lacks the fact(s) {lacking}")
        known = numbers(" ".join(truth.facts)) | numbers(self.pack.company.policy)
        known |= numbers(" ".join(e.content for e in self.transcript if e.role != "agent"))
        invented = sorted(numbers(action.message) - known)
        if invented:
            return Verdict(False, f"reply states {invented}, found in no fact, policy or message")
        return Verdict(True, "grounded reply with every fact")

    def escalation_acceptable(self) -> bool:
        """Whether an escalation with the right reason is in the acceptable set at this state (the
        label a policy's p(escalate) is scored against)."""
        truth = self._turn.truth
        return truth.resolution == "escalate" and not (truth.escalation_reason == "not_covered_by_kb" and self._turn.searches == 0)

    def _asked_needs(self, message: str) -> list[str]:
        return [n for n in self._turn.missing if any(mentions(message, p) for p in need_phrases(n))]

    # --- executing a step ----------------------------------------------------------------------

    def step(self, action: Action, raw: str | None = None, *, p_escalate: float | None = None) -> StepResult:
        if self.done:
            raise RuntimeError("the episode is over; SupportEpisode is single-use")
        verdict, escalation_ok = self.judge(action), self.escalation_acceptable()
        state, truth, turn = self._turn, self._turn.truth, self._turn_no
        self.transcript.append(Entry("agent", action.to_json()))
        observation, role = "", "tool"
        if action.action == "search_kb":
            state.searches += 1
            observation = self._search(action.args["query"])
        elif action.action == "create_ticket":
            ticket_id = f"T-{1001 + len(self.tickets)}"
            self.tickets[ticket_id] = {"summary": action.args["summary"], "priority": action.args["priority"], "status": "open", "notes": ""}
            state.ticket_created = state.ticket_created or verdict.acceptable
            observation = f"Created ticket {ticket_id} (priority {action.args['priority']}, status open)."
        elif action.action == "update_ticket":
            ticket = self.tickets.get(action.args["ticket_id"])
            if ticket is None:
                observation = f"Error: there is no ticket {action.args['ticket_id']}."
            else:
                ticket.update(status=action.args["status"], notes=(ticket["notes"] + "\n" + action.args["note"]).strip())
                state.ticket_updated = True
                observation = f"Updated ticket {action.args['ticket_id']} (status {action.args['status']})."
        elif action.action == "clarify":
            role = "customer"
            observation = self._customer_answers(action.message)
        elif action.action == "escalate":
            self._escalation, self._escalation_truth = action, truth
            self.outcome = "escalated" if verdict.acceptable else "wrong_escalation"
        elif verdict.acceptable:  # a correct reply: the next follow-up, or the end
            role = "customer"
            observation = self._next_turn()
        else:
            self.outcome = "wrong_reply"
        if observation:
            self.transcript.append(Entry(role, observation))  # type: ignore[arg-type]
        self._record(StepRecord(len(self.steps), turn, action, raw if raw is not None else action.to_json(), verdict.acceptable,
                                verdict.reason, observation, escalation_ok, p_escalate))
        return StepResult(observation, self.done, verdict.acceptable, verdict.reason)

    def step_invalid(self, raw: str, error: str, *, p_escalate: float | None = None) -> StepResult:
        """An output that did not parse or validate: recorded as an error, and it ends the episode
        (greedy decoding would only repeat it)."""
        if self.done:
            raise RuntimeError("the episode is over; SupportEpisode is single-use")
        escalation_ok = self.escalation_acceptable()
        self.transcript.append(Entry("agent", raw))
        self.outcome = "invalid"
        verdict = Verdict(False, f"invalid output: {error}")
        self._record(StepRecord(len(self.steps), self._turn_no, None, raw, False, verdict.reason, "", escalation_ok, p_escalate))
        return StepResult("", True, False, verdict.reason)

    def _record(self, record: StepRecord) -> None:
        self.steps.append(record)
        if not self.done and len(self.steps) >= self.max_steps:
            self.outcome = "step_limit"

    def _search(self, query: str) -> str:
        hits = self.pack.index.search(query)
        if not hits:
            return "search_kb: no article matches."
        return "search_kb results:\n" + "\n".join(f"[{h.article_id}] {h.title}: {h.body}" for h in hits)

    def _customer_answers(self, message: str) -> str:
        asked = self._asked_needs(message)
        if not asked:
            return "I'm not sure what you need from me. Can you just help with my question?"
        self._turn.obtained.update(asked)
        return " ".join(f"My {need_phrases(n)[0]} is {self._turn.truth.needs[n]}." for n in asked)

    def _next_turn(self) -> str:
        followups = self.ticket.truth.followups
        if self._turn_no >= len(followups):
            self.outcome = "resolved"
            return ""
        followup = followups[self._turn_no]
        self._turn_no += 1
        self._turn = _TurnState(followup.truth)
        return followup.message

    # --- the oracle ----------------------------------------------------------------------------

    def reference_action(self) -> Action:
        """An acceptable action for the current state, with a grounded message.

        Its thought backs the action: at a turn's first step, the turn's `rationale`
        (what the customer wants and the policy clause that decides it) when the pack gives one;
        later steps say what the step is for."""
        state, truth = self._turn, self._turn.truth
        opening = state.searches == 0 and not state.obtained and not state.ticket_created
        why = truth.rationale if opening and truth.rationale else ""
        if state.missing:
            asked = " and ".join(f"your {need_phrases(n)[0]}" for n in state.missing)
            return Action(thought=why or f"I need {_names(state.missing)} first.", action="clarify", message=f"Could you please share {asked}?")
        if truth.resolution == "escalate":
            if truth.escalation_reason == "not_covered_by_kb" and state.searches == 0:
                return Action(thought=why or "Check the KB before deciding.", action="search_kb", args={"query": self._customer_text()})
            thought = why or f"Policy says escalate: {truth.escalation_reason}."
            if truth.escalation_reason == "not_covered_by_kb":
                thought = "The knowledge base has no answer; policy: escalate not_covered_by_kb."
            return Action(
                thought=thought,
                action="escalate",
                args={"reason": truth.escalation_reason},
                message="I'm passing this to the right team now; they will contact you shortly.",
            )
        if state.searches == 0 and truth.kb_articles:
            thought = why or ("Look it up now that I have the details." if state.obtained else "Look up the policy.")
            return Action(thought=thought, action="search_kb", args={"query": self.pack.article(truth.kb_articles[0]).title})
        if truth.resolution == "create_ticket_then_reply" and not state.ticket_created:
            return Action(thought=why or "Log it as the policy asks.", action="create_ticket",
                          args={"summary": truth.intent.replace("_", " "), "priority": "normal"})
        return Action(thought=why or "Answer from the KB.", action="reply", message="Here is what applies: " + "; ".join(truth.facts) + ".")

    def _customer_text(self) -> str:
        return next(e.content for e in reversed(self.transcript) if e.role == "customer")

    # --- the summary ---------------------------------------------------------------------------

    def result(self) -> EpisodeResult:
        first_error = next((s.index for s in self.steps if not s.acceptable), None)
        escalation, escalation_truth = self._escalation, self._escalation_truth
        correct = escalation is not None and escalation_truth is not None and escalation_truth.resolution == "escalate"
        return EpisodeResult(
            company_id=self.pack.id,
            ticket_id=self.ticket.id,
            steps=tuple(self.steps),
            outcome=self.outcome,
            escalated=escalation is not None,
            escalation_reason=escalation.reason if escalation else None,
            should_escalate=self.ticket.should_escalate,
            correct_escalation=correct,
            reason_correct=(escalation.reason == escalation_truth.escalation_reason) if correct else None,  # type: ignore[union-attr]
            first_error=first_error,
        )


def _names(needs: list[str]) -> str:
    return " and ".join(n.replace("_", " ") for n in needs)
