"""LiteLLMTeacher through litellm's real HTTP path, against a local OpenAI-compatible stub server
that replays scripted answers (tests/openai_stub.py)."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from policies.protocol import THOUGHT_GUIDE

from environments.actions import Action
from environments.episode import SupportEpisode
from environments.pack import load_pack
from tests.openai_stub import Answer, OpenAIStub
from policies.litellm_teacher import BudgetExceeded, LiteLLMTeacher, TeacherError, litellm  # litellm set up offline
from policies.teacher import TeacherContext, Trajectory, Usage

PACK = load_pack(Path(__file__).parent / "data" / "acme")
T3 = next(t for t in PACK.tickets if t.id == "t3")  # "Where is my order?": needs the order id first
SIM = TeacherContext(PACK, T3)

CLARIFY = Action(thought="Need the order id.", action="clarify", message="Could you share your order id?")
GOOD = json.dumps({"first_error": 1, "replacement": CLARIFY.model_dump(), "rationale": "It replied without the order id."})


def wrong_trajectory() -> Trajectory:
    """search (fine), then a reply without the order id (the first error, step 1)."""
    episode = SupportEpisode(PACK, T3)
    episode.step(Action(action="search_kb", args={"query": "shipping times"}))
    episode.step(Action(action="reply", message="Your order arrives in 3 to 5 days."))
    return Trajectory.of(episode)


@pytest.fixture(scope="module")
def stub():
    with OpenAIStub() as server:
        yield server


@pytest.fixture
def make(stub):
    stub.reset()

    def make(**kwargs) -> LiteLLMTeacher:
        kwargs = {"api_base": stub.base_url, "api_key": "test", "timeout_s": 5, "backoff_s": 0.001, "seed": 0, **kwargs}
        return LiteLLMTeacher(kwargs.pop("model", "openai/teacher-test"), **kwargs)

    return make


def last_user_message(request: dict) -> str:
    return request["messages"][-1]["content"]


def test_judge_parses_first_error_and_replacement(stub, make):
    teacher = make()
    stub.enqueue(["Here is my verdict:\n" + GOOD + "\nHope it helps."])
    judgement = teacher.judge(wrong_trajectory(), SIM)
    assert judgement.first_error == 1 and judgement.replacement == CLARIFY
    assert judgement.rationale == "It replied without the order id."
    assert judgement.usage == Usage(calls=1, prompt_tokens=100, completion_tokens=20, cost_usd=0.0)  # price unknown
    assert teacher.spent == judgement.usage and teacher.name == "openai/teacher-test"

    [request] = stub.requests
    assert request["model"] == "teacher-test" and request["temperature"] == 0.0
    system, user = request["messages"][0]["content"], last_user_message(request)
    assert PACK.company.policy.strip() in system and "escalate" in system  # policy + the action contract
    assert THOUGHT_GUIDE in system  # the replacement's thought: what the customer wants, the deciding clause
    assert "A-10293" in user and '"clarify_then_reply"' in user  # hidden truth: privileged information
    assert "[kb-shipping]" in user  # the KB results the student saw
    assert "[step 0] agent:" in user and "[step 1] agent:" in user and "[step 2]" not in user


def test_production_trace_prompt_has_no_hidden_truth(stub, make):
    stub.enqueue([GOOD])
    make().judge(wrong_trajectory(), TeacherContext(PACK, None))
    user = last_user_message(stub.requests[0])
    assert "Hidden truth" not in user and "A-10293" not in user and "[step 1] agent:" in user


def test_every_step_right_is_a_null_judgement(stub, make):
    stub.enqueue(['{"first_error": null, "replacement": null, "rationale": "All fine."}'])
    judgement = make().judge(wrong_trajectory(), SIM)
    assert judgement.first_error is None and judgement.replacement is None


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("I think step 1 is wrong.", "no JSON object"),
        ('{"first_error": 1, "replacement": ', "malformed JSON"),
        ('{"first_error": 5, "replacement": {"action": "clarify", "message": "Order id?"}, "rationale": "x"}', "not a step number"),
        ('{"first_error": "1", "replacement": {"action": "clarify", "message": "Order id?"}, "rationale": "x"}', "first_error"),
        ('{"first_error": 1, "replacement": null, "rationale": "x"}', "replacement is required"),
        ('{"first_error": 1, "replacement": {"action": "escalate", "args": {"reason": "angry"}, "message": "Bye"}, "rationale": "x"}', "must be one of"),
        ('{"first_error": null, "replacement": {"action": "clarify", "message": "Order id?"}, "rationale": "x"}', "must be null"),
    ],
)
def test_invalid_answer_is_retried_with_its_error_and_usage_summed(stub, make, bad, why):
    teacher = make()
    stub.enqueue([Answer(bad, prompt_tokens=100, completion_tokens=7), Answer(GOOD, prompt_tokens=130, completion_tokens=20)])
    judgement = teacher.judge(wrong_trajectory(), SIM)
    assert judgement.first_error == 1 and judgement.replacement == CLARIFY
    assert judgement.usage == Usage(calls=2, prompt_tokens=230, completion_tokens=27, cost_usd=0.0)
    assert teacher.spent == judgement.usage
    first, retry = stub.requests
    assert retry["messages"][: len(first["messages"])] == first["messages"]
    assert retry["messages"][-2] == {"role": "assistant", "content": bad}  # the model sees its own mistake
    assert why in last_user_message(retry)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_and_rate_limits_are_retried(stub, make, status):
    stub.enqueue([Answer(status=status), GOOD])
    judgement = make().judge(wrong_trajectory(), SIM)
    assert judgement.first_error == 1
    assert judgement.usage == Usage(calls=2, prompt_tokens=100, completion_tokens=20)  # the error had no tokens
    assert len(stub.requests) == 2 and stub.requests[0] == stub.requests[1]  # same prompt again


def test_answer_slower_than_the_timeout_is_retried(stub, make):
    stub.enqueue([Answer(GOOD, delay_s=2.0), GOOD])
    started = time.monotonic()
    judgement = make(timeout_s=0.5).judge(wrong_trajectory(), SIM)
    assert time.monotonic() - started < 1.8  # gave up on the slow one instead of waiting for it
    assert judgement.first_error == 1 and judgement.usage.calls == 2 and len(stub.requests) == 2


def test_connection_refused_is_retried_then_raises(make):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = make(api_base=f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(TeacherError, match="no valid answer in 3 attempts"):
        teacher.judge(wrong_trajectory(), SIM)
    assert teacher.spent == Usage(calls=3)


def test_retries_are_bounded_and_the_error_says_why(stub, make):
    teacher = make(max_retries=2)
    stub.enqueue(["nope", Answer(status=500), "still nope", GOOD])
    with pytest.raises(TeacherError, match=r"3 attempts; last error: invalid answer: no JSON object") as raised:
        teacher.judge(wrong_trajectory(), SIM)
    assert len(stub.requests) == 3
    assert raised.value.usage == Usage(calls=3, prompt_tokens=200, completion_tokens=40) == teacher.spent


@pytest.mark.parametrize(("status", "error"), [(401, litellm.AuthenticationError), (400, litellm.BadRequestError)])
def test_client_errors_are_not_retried(stub, make, status, error):
    stub.enqueue([Answer(status=status), GOOD])
    with pytest.raises(TeacherError, match="not retried") as raised:
        make().judge(wrong_trajectory(), SIM)
    assert isinstance(raised.value.__cause__, error) and len(stub.requests) == 1


def test_max_calls_caps_requests_retries_included(stub, make):
    teacher = make(max_calls=3)
    stub.enqueue([GOOD, Answer(status=500), GOOD, GOOD])
    teacher.judge(wrong_trajectory(), SIM)
    teacher.judge(wrong_trajectory(), SIM)  # a 500, then its retry: calls 2 and 3
    with pytest.raises(BudgetExceeded, match=r"made 3 calls.*max_calls=3"):
        teacher.judge(wrong_trajectory(), SIM)
    assert len(stub.requests) == 3 and teacher.spent.calls == 3  # raised before sending anything


def test_budget_usd_caps_spending_on_a_priced_model(stub, make):
    # Give the test model a price so litellm.completion_cost knows it (otherwise it raises, cost 0).
    litellm.register_model({"openai/teacher-priced": {
        "input_cost_per_token": 1e-3, "output_cost_per_token": 2e-3, "litellm_provider": "openai", "mode": "chat"}})
    teacher = make(model="openai/teacher-priced", budget_usd=0.25)
    stub.enqueue([GOOD, GOOD, GOOD])
    first = teacher.judge(wrong_trajectory(), SIM)
    assert first.usage.cost_usd == pytest.approx(100 * 1e-3 + 20 * 2e-3)
    teacher.judge(wrong_trajectory(), SIM)  # $0.14 < $0.25 before it: allowed, and goes past the cap
    with pytest.raises(BudgetExceeded, match=r"spent \$0\.2800.*budget_usd=0\.25"):
        teacher.judge(wrong_trajectory(), SIM)
    assert len(stub.requests) == 2 and teacher.spent.cost_usd == pytest.approx(0.28)


def test_demonstrate_returns_a_validated_action(stub, make):
    prefix = Trajectory.of(SupportEpisode(PACK, T3))  # just the customer's opening
    stub.enqueue(['{"action": "clarify", "message": ""}', CLARIFY.to_json()])  # an empty clarify is invalid
    demonstration = make().demonstrate(prefix, SIM)
    assert demonstration.action == CLARIFY and demonstration.usage.calls == 2
    first, retry = stub.requests
    assert "You are the support agent of Acme Widgets" in first["messages"][0]["content"]
    assert "A-10293" in last_user_message(first) and T3.opening in last_user_message(first)
    assert "needs a non-empty message" in last_user_message(retry)


def test_concurrency_limit_holds_across_threads(stub, make):
    teacher = make(max_concurrency=2)
    stub.enqueue([Answer(CLARIFY.to_json(), delay_s=0.2)] * 6)
    prefix = Trajectory.of(SupportEpisode(PACK, T3))
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: teacher.demonstrate(prefix, SIM), range(6)))
    assert all(r.action == CLARIFY for r in results)
    assert len(stub.requests) == 6 and stub.max_active == 2
    assert teacher.spent == Usage(calls=6, prompt_tokens=600, completion_tokens=120)


def test_backoff_is_exponential_with_reproducible_jitter():
    a, b = (LiteLLMTeacher("openai/x", backoff_s=1.0, seed=7) for _ in range(2))
    delays = [a._backoff(attempt) for attempt in (1, 2, 3)]
    assert delays == [b._backoff(attempt) for attempt in (1, 2, 3)]
    for delay, base in zip(delays, (1, 2, 4)):
        assert base <= delay <= base * 1.25


PERSONAL = ("jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "221B Baker Street")


def personal_trajectory() -> Trajectory:
    episode = SupportEpisode(PACK, T3)
    episode.transcript[0] = type(episode.transcript[0])(
        "customer", f"Where is my order? I'm {PERSONAL[0]}, phone {PERSONAL[1]}, paid with {PERSONAL[2]}, ship to {PERSONAL[3]}.")
    episode.step(Action(action="reply", message="Your order arrives in 3 to 5 days."))
    return Trajectory.of(episode)


def test_nothing_personal_reaches_the_teacher_and_answers_are_restored(stub, make):
    reply = Action(action="clarify", message="Is <EMAIL_1> still your address? What is your order id?")
    stub.enqueue([json.dumps({"first_error": 0, "replacement": reply.model_dump(), "rationale": "needs the order id"})])
    judgement = make().judge(personal_trajectory(), TeacherContext(PACK, None))
    sent = json.dumps(stub.requests[0])
    assert not any(value in sent for value in PERSONAL)
    assert "<EMAIL_1>" in sent and "<CARD_1>" in sent and "<ADDRESS_1>" in sent and "<PHONE_1>" in sent
    assert judgement.replacement.message == "Is jane.doe@example.com still your address? What is your order id?"


def test_redaction_off_only_on_loopback(stub, make):
    make(redact=False)  # the stub listens on 127.0.0.1: allowed
    with pytest.raises(ValueError, match="only for a teacher on loopback"):
        LiteLLMTeacher("openai/gpt-x", api_base="https://teacher.example/v1", redact=False)


def test_the_oracle_counts_the_tokens_of_the_prompts_a_model_teacher_is_sent(stub, make):
    """Teacher tokens are the currency: the free oracle is charged what the litellm teacher would send and receive."""
    from policies.teacher import OracleTeacher

    teacher = make(redact=False)
    stub.enqueue([GOOD, json.dumps(CLARIFY.model_dump())])
    teacher.judge(wrong_trajectory(), SIM)
    prefix = Trajectory.of(SupportEpisode(PACK, T3))
    teacher.demonstrate(prefix, SIM)
    words = lambda text: len(text.split())  # noqa: E731  (any counter: the student's tokenizer in a run)
    oracle = OracleTeacher(count_tokens=words)
    judged, shown = oracle.judge(wrong_trajectory(), SIM), oracle.demonstrate(prefix, SIM)
    for request, usage in zip(stub.requests, (judged.usage, shown.usage)):
        assert usage.calls == 1 and usage.prompt_tokens == sum(words(m["content"]) for m in request["messages"]) > 100
    assert judged.first_error == 1 and judged.usage.completion_tokens == words(json.dumps(
        {"first_error": 1, "replacement": json.loads(judged.replacement.to_json()), "rationale": judged.rationale}))
    assert shown.usage.completion_tokens == words(shown.action.to_json()) > 0
    assert OracleTeacher().judge(wrong_trajectory(), SIM).usage == Usage(calls=1)  # no counter: calls only
