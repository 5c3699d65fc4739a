"""A loopback teacher for the reliability benchmarks: the OpenAI stub answering a `LiteLLMTeacher`'s
prompts as the environment's oracle would, and failing a chosen share of its calls.

    oracle = LoopbackOracle(packs, fail_rate=0.3, timeout_s=2)
    with OpenAIStub(responder=oracle) as stub:   # teacher=openai/gpt-4o-mini, teacher_api_base=stub.base_url
        ...
    oracle.injected   # Counter of the failures served: timeout, http_500, invalid_json, refused_action

It reads the prompt the way a model would: the company is the pack whose policy the system message
quotes, the ticket is the one whose opening starts the transcript, and the agent's steps are the
numbered `[step i] agent:` lines. With a ticket it answers with `OracleTeacher` (after `delay_s`, as a
real model would take a while); for a production trace (no ticket) every judgement says step 0
should have searched the KB. A failure is, with equal
odds: an answer slower than the teacher's timeout, an HTTP 500, text that is not JSON, or a valid
action that the checker refuses.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter

from environments.actions import Action
from environments.episode import SupportEpisode
from environments.pack import Pack, Ticket
from policies.protocol import parse_action
from policies.teacher import OracleTeacher, TeacherContext, Trajectory
from tests.openai_stub import Answer

FAILURES = ("timeout", "http_500", "invalid_json", "refused_action")
COMPLETION_TOKENS = 40  # what every answer says it cost in output tokens
_STEP = re.compile(r"^\[step (\d+)\] agent: ", re.MULTILINE)
_REASONS = ("billing_exception", "security_sensitive", "legal_compliance", "not_covered_by_kb", "churn_risk", "likely_bug",
            "enterprise_sales")


class LoopbackOracle:
    def __init__(self, packs: list[Pack], *, fail_rate: float = 0.0, timeout_s: float = 2.0, delay_s: float = 0.0, seed: int = 0):
        self.packs, self.fail_rate, self.timeout_s, self.delay_s = packs, fail_rate, timeout_s, delay_s
        self.kinds: Counter[str] = Counter()  # requests by what was asked: demonstrate, judge, judge_production
        self.last_kind = ""
        self.injected: Counter[str] = Counter()
        self.exhausted = 0  # asks that failed 1 + max_retries times in a row: the teacher gives up on them
        self.largest_prompt = 0  # tokens of the largest prompt answered (bounds what one call may cost)
        self.max_retries = 3
        self._streak: tuple[tuple[str, str], int] = (("", ""), 0)  # the ask being retried, its failures so far
        self.errors: list[str] = []  # prompts it could not read (a bug here, not an injected failure)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Answer:
        try:
            return self._answer(body)
        except Exception as e:  # answered 400 (not retried), and kept for the benchmark to report
            self.errors.append(f"{type(e).__name__}: {e}")
            return Answer(f"loopback oracle: {e}", status=400)

    def _answer(self, body: dict) -> Answer:
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        user = next((m["content"] for m in body["messages"] if m["role"] == "user"), "")
        tokens = {"prompt_tokens": (len(system) + len(user)) // 4, "completion_tokens": COMPLETION_TOKENS}
        self.largest_prompt = max(self.largest_prompt, tokens["prompt_tokens"])
        pack = next(p for p in self.packs if p.company.policy.strip() in system)
        ticket = _ticket(pack, user)
        actions = _steps(user)
        judging = '"first_error"' in user
        with self._lock:
            self.last_kind = "demonstrate" if not judging else "judge" if ticket else "judge_production"
            self.kinds[self.last_kind] += 1
            failure = self._rng.choice(FAILURES) if self._rng.random() < self.fail_rate else None
            self.injected[failure or "none"] += 1
            # Retries of one ask repeat its first two messages (a retry after invalid output appends more).
            ask, failed = self._streak
            failed = failed + 1 if ask == (system, user) else 1
            retried = failure in ("timeout", "http_500", "invalid_json")
            self._streak = ((system, user), failed if retried else 0)
            if retried and failed == 1 + self.max_retries:
                self.exhausted += 1
                self._streak = (("", ""), 0)
        if failure == "timeout":
            return Answer("{}", delay_s=self.timeout_s + 1, **tokens)
        if failure == "http_500":
            return Answer("the teacher's server broke", status=500)
        if failure == "invalid_json":
            return Answer('{"first_error": 0, "replacement": {"action": "reply", ', **tokens)
        context = TeacherContext(pack, ticket)
        if judging:
            if ticket is None:  # a production trace: no truth; a fixed, self-consistent reading
                replacement = Action(thought="The KB may answer this.", action="search_kb", args={"query": "help"})
                answer = {"first_error": 0, "replacement": replacement.model_dump(), "rationale": "search before answering"}
            else:
                judgement = OracleTeacher().judge(Trajectory(tuple(actions), ()), context)
                first_error, replacement = judgement.first_error, judgement.replacement
                if failure == "refused_action":
                    first_error = first_error or 0
                    replacement = _refused(pack, ticket, actions[:first_error])
                answer = {"first_error": first_error, "replacement": replacement and replacement.model_dump(),
                          "rationale": judgement.rationale}
            return Answer(json.dumps(answer), delay_s=self.delay_s, **tokens)
        prefix = [a for a in actions if a is not None]
        action = _refused(pack, ticket, prefix) if failure == "refused_action" else OracleTeacher().demonstrate(
            Trajectory(tuple(prefix), ()), context).action
        return Answer(action.to_json(), delay_s=self.delay_s, **tokens)


def _ticket(pack: Pack, prompt: str) -> Ticket | None:
    """The ticket whose opening is the transcript's first customer line (None: a production trace)."""
    if "Hidden truth" not in prompt:
        return None
    start = prompt.index("\ncustomer: ") + len("\ncustomer: ")
    matches = [t for t in pack.tickets if prompt.startswith(t.opening, start)]
    longest = [t for t in matches if len(t.opening) == max(len(m.opening) for m in matches)]
    # The same opening twice: the hidden truth line (as policies/litellm_teacher.py writes it) tells them apart.
    truth = [t for t in longest if f"- turn 0: {json.dumps(t.turns[0].model_dump(exclude={'followups'}, exclude_defaults=True))}" in prompt]
    return (truth or longest)[0]


def _steps(prompt: str) -> list[Action | None]:
    """The numbered agent steps (None where the agent's output was not a valid action)."""
    marks = list(_STEP.finditer(prompt))
    out = []
    for mark, following in zip(marks, [*marks[1:], None]):
        text = prompt[mark.end(): following.start() if following else len(prompt)]
        out.append(parse_action(text.split("\n")[0]).action)
    return out


def _refused(pack: Pack, ticket: Ticket, prefix: list[Action | None]) -> Action:
    """A well-formed escalation the checker refuses in this state (over-escalation or a wrong reason)."""
    episode = SupportEpisode.replay(pack, ticket, [a for a in prefix if a is not None])
    for reason in _REASONS:
        action = Action(thought="Escalating.", action="escalate", args={"reason": reason}, message="A colleague will help.")
        if not episode.judge(action).acceptable:
            return action
    raise AssertionError("every escalation is acceptable here")
