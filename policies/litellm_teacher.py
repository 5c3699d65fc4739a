"""A teacher behind any model litellm reaches: a hosted API (`openai/gpt-4o-mini`) or your own
vLLM server (`hosted_vllm/Qwen/Qwen3-32B` with `api_base`).

    teacher = LiteLLMTeacher("hosted_vllm/Qwen/Qwen3-32B", api_base="http://gpu:8000/v1", budget_usd=5)
    judgement = teacher.judge(Trajectory.of(episode), TeacherContext(pack, ticket))

Every answer is ONE JSON object validated with the environment's own `Action` model. Transport
errors, HTTP 429/5xx and invalid answers are retried with exponential backoff (at most
`max_retries` times); other HTTP errors (400, 401, 404, ...) are raised at once as `TeacherError`.
Tokens and cost (`litellm.completion_cost`, 0 when the model's price is unknown) are summed per
answer and in `spent`; `budget_usd` and `max_calls` cap them and raise `BudgetExceeded` before any
request that would go past them.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Callable, TypeVar
from urllib.parse import urlparse

# Without this, `import litellm` downloads a price table (3 tries, seconds lost offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402 (after the environment variable above)
import openai  # noqa: E402 (litellm's exceptions subclass the OpenAI SDK's)
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError  # noqa: E402

from environments.actions import Action  # noqa: E402
from policies.protocol import parse_action  # noqa: E402
from policies.redaction import Redactor  # noqa: E402
from policies.teacher import (  # noqa: E402
    Demonstration, Judgement, TeacherContext, TeacherUnavailable, Trajectory, Usage, demonstrate_messages, judge_messages,
)

# Otherwise litellm prints a "Give Feedback / Get Help" banner on stdout for every failed call,
# including the ones we retry on purpose.
litellm.suppress_debug_info = True

# Worth another try: the server or the network may be fine a moment later. Connection refused
# arrives as InternalServerError, a 504 as Timeout.
_TRANSIENT = (
    litellm.Timeout,
    litellm.APIConnectionError,
    litellm.RateLimitError,
    litellm.InternalServerError,
    litellm.ServiceUnavailableError,
    litellm.BadGatewayError,
)
_JITTER = 0.25  # each backoff is stretched by up to 25%, so parallel callers do not retry in step

T = TypeVar("T")


class BudgetExceeded(TeacherUnavailable):
    """The teacher reached its `budget_usd` or `max_calls` cap; no request was sent."""


class TeacherError(TeacherUnavailable):
    """The teacher gave no valid answer: a non-retryable HTTP error, or every attempt failed. Its
    `usage` is what the failed attempts cost (also counted in the teacher's `spent`)."""


class _JudgeAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first_error: StrictInt | None
    replacement: Action | None
    rationale: StrictStr


class LiteLLMTeacher:
    def __init__(
        self,
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_concurrency: int = 4,
        budget_usd: float | None = None,
        max_calls: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        redact: bool = True,
        redact_patterns: tuple[str, ...] = (),
    ):
        if timeout_s <= 0 or backoff_s < 0 or not 0 <= max_retries <= 10 or max_concurrency < 1:
            raise ValueError("need timeout_s > 0, backoff_s >= 0, 0 <= max_retries <= 10 and max_concurrency >= 1")
        if (budget_usd is not None and budget_usd < 0) or (max_calls is not None and max_calls < 0):
            raise ValueError("budget_usd and max_calls must be >= 0 (or None for no cap)")
        if not redact and not _is_loopback(api_base):
            raise ValueError("redaction can be turned off only for a teacher on loopback (api_base http://127.0.0.1:... or localhost)")
        self.name = model
        self.redact, self.redact_patterns = redact, redact_patterns
        self.model, self.api_base, self.api_key = model, api_base, api_key
        self.timeout_s, self.max_retries, self.backoff_s, self.temperature = timeout_s, max_retries, backoff_s, temperature
        self.budget_usd, self.max_calls = budget_usd, max_calls
        self.spent = Usage()  # every request made so far; tokens and cost of those answered
        self._slots = threading.Semaphore(max_concurrency)
        self._lock = threading.Lock()  # guards `spent` and the jitter generator
        self._rng = random.Random(seed)

    # --- the Teacher protocol ------------------------------------------------------------------

    def judge(self, trajectory: Trajectory, context: TeacherContext) -> Judgement:
        n_steps = len(trajectory.actions)
        redactor = Redactor(self.redact_patterns) if self.redact else None
        answer, usage = self._ask(_redacted(judge_messages(trajectory, context), redactor), lambda text: _parse_judgement(text, n_steps))
        return Judgement(answer.first_error, _restored(answer.replacement, redactor), answer.rationale, usage)

    def demonstrate(self, prefix: Trajectory, context: TeacherContext) -> Demonstration:
        redactor = Redactor(self.redact_patterns) if self.redact else None
        action, usage = self._ask(_redacted(demonstrate_messages(prefix, context), redactor), _parse_step)
        return Demonstration(_restored(action, redactor), usage)

    # --- one answer: budget, concurrency, retries, accounting ----------------------------------

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], tuple[T | None, str | None]]) -> tuple[T, Usage]:
        """The first valid answer to `messages`, and the usage of every attempt it took."""
        usage, prompt, error = Usage(), messages, ""
        for attempt in range(1 + self.max_retries):
            if attempt:
                time.sleep(self._backoff(attempt))
            with self._slots:
                self._reserve_call()
                usage += Usage(calls=1)
                try:
                    response = litellm.completion(
                        model=self.model, messages=prompt, api_base=self.api_base, api_key=self.api_key,
                        timeout=self.timeout_s, temperature=self.temperature,
                        num_retries=0, max_retries=0,  # we retry ourselves; the OpenAI SDK would retry twice more
                    )
                except openai.OpenAIError as e:
                    if not _transient(e):
                        raise TeacherError(f"teacher {self.model} at {self.api_base or 'its default endpoint'}: {e} (not retried)", usage) from e
                    error = f"{type(e).__name__}: {e}"
                    continue
            tokens = _usage_of(response)
            usage += tokens
            with self._lock:
                self.spent += tokens
            text = response.choices[0].message.content or ""
            value, invalid = parse(text)
            if invalid is None:
                return value, usage  # type: ignore[return-value]
            error = f"invalid answer: {invalid}"
            # Show the model its own mistake once (not every earlier one: the prompt stays short).
            prompt = [*messages, {"role": "assistant", "content": text},
                      {"role": "user", "content": f"That answer is invalid ({invalid}). Answer again with ONE valid JSON object and nothing else."}]
        raise TeacherError(f"teacher {self.model} gave no valid answer in {1 + self.max_retries} attempts; last error: {error}", usage)

    def _reserve_call(self) -> None:
        """Count one request against the caps, or raise before it is sent. The cost cap is soft
        under concurrency: calls already in flight may still add their cost."""
        with self._lock:
            if self.budget_usd is not None and self.spent.cost_usd >= self.budget_usd:
                raise BudgetExceeded(f"teacher {self.model} has spent ${self.spent.cost_usd:.4f}, reaching its cap "
                                     f"budget_usd={self.budget_usd}; raise budget_usd to continue")
            if self.max_calls is not None and self.spent.calls >= self.max_calls:
                raise BudgetExceeded(f"teacher {self.model} has made {self.spent.calls} calls, reaching its cap "
                                     f"max_calls={self.max_calls}; raise max_calls to continue")
            self.spent += Usage(calls=1)

    def _backoff(self, attempt: int) -> float:
        with self._lock:
            jitter = self._rng.random()
        return self.backoff_s * 2 ** (attempt - 1) * (1 + _JITTER * jitter)


# --- prompts and parsing ------------------------------------------------------------------------


def _parse_judgement(text: str, n_steps: int) -> tuple[_JudgeAnswer | None, str | None]:
    """The first JSON object in `text` as a judgement of a trajectory of `n_steps` steps."""
    start = text.find("{")
    if start < 0:
        return None, "no JSON object in the output"
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg}"
    try:
        answer = _JudgeAnswer.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return None, f"schema: {where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"
    if answer.first_error is None:
        if answer.replacement is not None:
            return None, "replacement must be null when first_error is null"
    elif not 0 <= answer.first_error < n_steps:
        steps = f"0 to {n_steps - 1}" if n_steps else "there are no steps, so it must be null"
        return None, f"first_error {answer.first_error} is not a step number ({steps})"
    elif answer.replacement is None:
        return None, "replacement is required when first_error is a step number"
    return answer, None


def _parse_step(text: str) -> tuple[Action | None, str | None]:
    parsed = parse_action(text)
    return parsed.action, parsed.error


def _transient(error: Exception) -> bool:
    return isinstance(error, _TRANSIENT) or (isinstance(error, litellm.APIError) and error.status_code >= 500)


def _usage_of(response: litellm.ModelResponse) -> Usage:
    try:
        cost = float(litellm.completion_cost(completion_response=response))
    except Exception:  # litellm raises for models without a known price (a self-hosted one, say)
        cost = 0.0
    return Usage(0, response.usage.prompt_tokens, response.usage.completion_tokens, cost)


# --- redaction: nothing personal leaves the machine; answers are mapped back -----------------


def _is_loopback(api_base: str | None) -> bool:
    host = urlparse(api_base or "").hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _redacted(messages: list[dict[str, str]], redactor: Redactor | None) -> list[dict[str, str]]:
    if redactor is None:
        return messages
    return [{**m, "content": redactor.redact(m["content"])} for m in messages]


def _restored(action: Action | None, redactor: Redactor | None) -> Action | None:
    if action is None or redactor is None:
        return action
    return Action.model_validate_json(redactor.restore(action.model_dump_json()))
