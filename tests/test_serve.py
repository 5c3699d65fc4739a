"""`apprentice serve` with the tiny model: a litellm client gets a valid action from the promoted
adapter, the adapter follows promotions, the limits answer 401/413/422, and feedback sends the
served conversation to a (loopback, litellm) teacher whose agreeing judgements become a correction."""

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from environments.actions import Action
from environments.episode import Entry
from environments.pack import load_pack
from loop.promotion import approve
from loop.status import status
from loop.train import LoraSettings, train_adapter
from ops.serve import Limits, Service, create_app
from policies.hf import HFStudent
from policies.litellm_teacher import LiteLLMTeacher, litellm  # litellm set up offline
from policies.protocol import parse_action, render_messages
from policies.teacher import OracleTeacher
from store import AdapterRow
from tests.openai_stub import OpenAIStub

PACK = load_pack(Path(__file__).parent / "data" / "acme")
TOKEN = "s3cret"
QUESTION = "Where is my order?"
CLARIFY = Action(thought="Need the order id.", action="clarify", message="Could you share your order id?")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A tiny adapter that learned one answer: CLARIFY to QUESTION (the random tiny model writes no JSON)."""
    conversation = render_messages(PACK.company, [Entry("customer", QUESTION)]) + [{"role": "assistant", "content": CLARIFY.to_json()}]
    path = tmp_path_factory.mktemp("adapters") / "v0001"
    train_adapter(tiny_model_dir, [conversation] * 8, path,
                  LoraSettings(r=16, alpha=32, epochs=40, batch_size=8, learning_rate=1e-2, max_length=1024), progress=False)
    return path


def make_service(tmp_path, tiny_model_dir, adapter, teacher=None) -> Service:
    service = Service(tmp_path / "serve.db", [PACK], HFStudent(tiny_model_dir, batch_size=1, max_new_tokens=64),
                      teacher or OracleTeacher(), token=TOKEN, limits=Limits(max_body_bytes=4_000, max_messages=8))
    service.store.add_adapter(AdapterRow(version="v0001", parent=None, path=str(adapter), base_model="tiny", status="awaiting_approval"))
    return service


def ask(client, question=QUESTION, **extra):
    return client.post("/v1/chat/completions", headers=AUTH, json={"model": PACK.id, "messages": [{"role": "user", "content": question}], **extra})


@pytest.fixture
def live_server(tmp_path, tiny_model_dir, adapter):
    """The app under a real uvicorn on a free loopback port."""
    service = make_service(tmp_path, tiny_model_dir, adapter)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield service, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_litellm_client_gets_the_promoted_adapters_action(live_server):
    service, url = live_server
    before = httpx.post(f"{url}/v1/chat/completions", headers=AUTH,
                        json={"model": PACK.id, "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert before["apprentice"]["adapter"] == "base"  # nothing promoted yet

    approve(service.store, "v0001", by="ana")
    response = litellm.completion(model=f"openai/{PACK.id}", api_base=f"{url}/v1", api_key=TOKEN,
                                  messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": QUESTION}])
    content = response.choices[0].message.content
    assert parse_action(content).action == CLARIFY
    assert httpx.get(f"{url}/healthz").json()["adapter"] == "v0001"  # the server followed the promotion
    stored = service.store.trace(response.id)
    assert stored.status == "served" and json.loads(stored.raw)["messages"][-1]["content"] == content
    assert service.store.trace(before["id"]).status in ("served", "rejected")  # every conversation is kept


def test_auth_and_limits(tmp_path, tiny_model_dir, adapter):
    client = TestClient(create_app(make_service(tmp_path, tiny_model_dir, adapter)))
    body = {"model": PACK.id, "messages": [{"role": "user", "content": QUESTION}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    big = ask(client, question="x" * 5_000)
    assert big.status_code == 413 and "over the limit" in big.json()["error"]["message"]
    many = client.post("/v1/chat/completions", headers=AUTH, json={"model": PACK.id, "messages": [{"role": "user", "content": "hi"}] * 9})
    assert many.status_code == 422 and "9 messages" in many.json()["error"]["message"]
    shapeless = client.post("/v1/chat/completions", headers=AUTH, json={"model": PACK.id})
    assert shapeless.status_code == 422 and "messages" in shapeless.json()["error"]["message"]
    bad_turn = client.post("/v1/chat/completions", headers=AUTH, json={"model": PACK.id, "messages": [
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "sure thing"}, {"role": "user", "content": "?"}]})
    assert bad_turn.status_code == 422 and "not an action" in bad_turn.json()["error"]["message"]
    assert ask(client, model="nobody").status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == [PACK.id]


def test_feedback_sends_the_conversation_to_correction(tmp_path, tiny_model_dir, adapter):
    escalate = Action(thought="Refund outside the window.", action="escalate", args={"reason": "billing_exception"},
                      message="A colleague will take this over.")
    judgement = json.dumps({"first_error": 0, "replacement": escalate.model_dump(), "rationale": "The customer wants a refund."})
    with OpenAIStub() as stub:
        stub.enqueue([judgement, judgement])  # two independent judgements that agree
        teacher = LiteLLMTeacher("openai/teacher-test", api_base=stub.base_url, api_key="test", timeout_s=5, backoff_s=0.001, seed=0,
                                 redact=False)
        service = make_service(tmp_path, tiny_model_dir, adapter, teacher)
        approve(service.store, "v0001", by="ana")
        client = TestClient(create_app(service))
        served = ask(client).json()
        assert served["apprentice"]["valid"]
        missing = client.post("/v1/feedback", headers=AUTH, json={"conversation_id": "chatcmpl-nope", "failure_note": "x"})
        assert missing.status_code == 404
        result = client.post("/v1/feedback", headers=AUTH, json={"conversation_id": served["id"], "failure_note": "customer wanted a refund"})
        assert result.status_code == 200, result.text
        assert result.json()["status"] == "corrected" and len(stub.requests) == 2
    (correction,) = service.store.corrections()
    assert correction.status == "accepted" and correction.teacher_action["action"] == "escalate"
    (example,) = service.store.examples(source="production")
    assert json.loads(example.messages[-1]["content"])["action"] == "escalate"
    trace = service.store.trace(served["id"])
    assert trace.failure_note == "customer wanted a refund" and trace.status == "corrected"
    again = client.post("/v1/feedback", headers=AUTH, json={"conversation_id": served["id"], "failure_note": "again"})
    assert again.status_code == 409
    st = status(service.store, service.db)  # what `apprentice status` prints
    assert st.traces == {"corrected": 1} and st.production_examples == 1 and st.teacher_calls_today == 2


def test_an_adapter_that_fails_its_probe_is_not_served(tmp_path, tiny_model_dir, adapter):
    import shutil

    stale = tmp_path / "v0002"
    shutil.copytree(adapter, stale)
    probe = json.loads((stale / "probe.json").read_text())
    (stale / "probe.json").write_text(json.dumps({**probe, "logprobs": [x - 1.0 for x in probe["logprobs"]]}))
    service = make_service(tmp_path, tiny_model_dir, adapter)
    service.store.add_adapter(AdapterRow(version="v0002", parent=None, path=str(stale), base_model="tiny", status="awaiting_approval"))
    approve(service.store, "v0002", by="ana")
    client = TestClient(create_app(service))
    answer = ask(client)
    assert answer.status_code == 503 and "not live on the server" in answer.json()["error"]["message"]
    assert client.get("/healthz").json()["adapter"] == "base"


def test_feedback_when_the_teacher_fails_keeps_the_failure(tmp_path, tiny_model_dir, adapter):
    with OpenAIStub() as stub:  # nothing scripted: it answers 400, which is not retried
        teacher = LiteLLMTeacher("openai/teacher-test", api_base=stub.base_url, api_key="test", timeout_s=5, backoff_s=0.001,
                                 redact=False)
        service = make_service(tmp_path, tiny_model_dir, adapter, teacher)
        approve(service.store, "v0001", by="ana")
        client = TestClient(create_app(service))
        served = ask(client).json()
        result = client.post("/v1/feedback", headers=AUTH, json={"conversation_id": served["id"], "failure_note": "wrong"})
    assert result.status_code == 502 and "ingest --correct" in result.json()["error"]["message"]
    trace = service.store.trace(served["id"])
    assert trace.status == "accepted" and trace.failure_note == "wrong"  # waits for the next correction


def test_admission_is_bounded_past_the_queue_limit(tmp_path, tiny_model_dir, adapter):
    """Generation is serialized: with max_queue=2, while two requests are inside a third is answered
    503 at once with a Retry-After, and the two admitted ones are answered when generation frees."""
    service = Service(tmp_path / "serve.db", [PACK], HFStudent(tiny_model_dir, batch_size=1, max_new_tokens=8), OracleTeacher(),
                      token=TOKEN, limits=Limits(max_queue=2))
    release, real = threading.Event(), service.student.generate_with_info

    def slow_generation(prompts):
        release.wait(30)
        return real(prompts)

    service.student.generate_with_info = slow_generation
    client = TestClient(create_app(service))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ask(client))) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while service.completions.inside < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = ask(client)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded"
    assert int(refused.headers["retry-after"]) >= 1
    release.set()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200] and service.completions.inside == 0
    assert ask(client).status_code == 200  # admitted again once the queue drained


def test_a_thousand_fuzzed_bodies_get_no_500(tmp_path, tiny_model_dir, adapter):
    from collections import Counter

    from tests.fuzz import fuzz_bodies

    service = Service(tmp_path / "serve.db", [PACK], HFStudent(tiny_model_dir, batch_size=1, max_new_tokens=4), OracleTeacher(),
                      token=TOKEN, limits=Limits(max_body_bytes=64_000, max_messages=64))
    client = TestClient(create_app(service), raise_server_exceptions=False)
    served = [ask(client).json()["id"] for _ in range(2)]
    statuses = Counter()
    for endpoint, body in fuzz_bodies(1000, company=PACK.id, seed=0, conversation_ids=served):
        response = client.post(endpoint, content=body, headers={**AUTH, "Content-Type": "application/json"})
        statuses[response.status_code] += 1
        assert response.status_code < 500, (endpoint, body[:300], response.text[:300])
        assert "error" in response.json() or response.status_code == 200
    assert sum(statuses.values()) == 1000 and statuses[200] > 0 and statuses[422] > 0  # both paths were exercised
