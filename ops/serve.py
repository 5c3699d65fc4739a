"""`apprentice serve`: the promoted adapter behind an OpenAI-compatible endpoint.

    APPRENTICE_TOKEN=... apprentice serve            # http://127.0.0.1:8000
    POST /v1/chat/completions {"model": "<company id>", "messages": [...]}
         → the student's next action, as the assistant message's JSON content
    POST /v1/feedback {"conversation_id": "<a completion's id>", "failure_note": "..."}
         → the teacher corrects that conversation, as it does ingested traces
    GET  /v1/models (the companies), GET /healthz (no token needed)

Messages follow the ingest format: user turns are the customer, `tool` turns are the results of
the agent's actions (your bot runs them), assistant turns are earlier actions (JSON content or
`tool_calls`); the system prompt is the company pack's policy, so a client's is ignored.
Generation is serialized (one student, one lock), so admission is bounded: past `max_queue`
requests inside an endpoint, a request is answered 503 with a Retry-After at once.
Every answer is stored as a production trace with status `served`, named by the completion's id;
feedback turns it into a reported failure. Before each answer the server checks the store's
promoted pointer and swaps adapters (verified by the probe log-probs) when it moved.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from environments.pack import Pack
from loop.ingest import TraceError, parse_openai_messages
from loop.production import correct_traces
from loop.records import register_packs
from loop.train import PROBE_TEXTS
from loop.workers import AdapterSwapError, check_probe
from policies.hf import HFStudent
from policies.protocol import parse_action, render_messages
from policies.teacher import OracleTeacher, Teacher, TeacherUnavailable
from store import Store, TraceRow


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None  # a string, or a list of text parts
    tool_calls: list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ...: decoding is the server's
    model: str = Field(description="The company pack id.")
    messages: list[ChatMessage]


class FeedbackRequest(BaseModel):
    conversation_id: str
    failure_note: str = Field(min_length=1, max_length=4000)


@dataclass
class Limits:
    max_body_bytes: int = 64_000
    max_messages: int = 64
    max_queue: int = 16  # requests admitted at once per endpoint (answering + waiting); more get 503 + Retry-After


class Admission:
    """Bounded admission: at most `limit` requests inside at once. Generation is serialized, so a
    longer queue would only add latency until clients time out; past the limit a request is
    answered 503 at once, with a Retry-After of the expected wait (the queue times the recent
    service time)."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.inside = limit, what, 0
        self.service_s = 1.0  # moving average of one request's own service time (not its wait)
        self._lock = threading.Lock()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.inside >= self.limit:
                wait = max(1, math.ceil(self.inside * self.service_s))
                raise ApiError(503, f"{self.inside} {self.what} requests are already queued (the limit); retry in {wait} s",
                               "overloaded", {"Retry-After": str(wait)})
            self.inside += 1
        try:
            yield
        finally:
            with self._lock:
                self.inside -= 1

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.service_s = 0.8 * self.service_s + 0.2 * seconds


class Service:
    """What the endpoints share. One student, one lock: generation and adapter swaps take turns."""

    def __init__(self, db: str | Path, packs: list[Pack], student: HFStudent, teacher: Teacher, *, token: str,
                 agreements: int = 2, weight: float = 1.0, limits: Limits = Limits()):
        self.db, self.student, self.teacher, self.token = db, student, teacher, token
        self.packs = {p.id: p for p in packs}
        self.agreements, self.weight, self.limits = agreements, weight, limits
        self._lock = threading.Lock()
        self._local = threading.local()
        self.completions, self.feedbacks = Admission(limits.max_queue, "completion"), Admission(limits.max_queue, "feedback")
        register_packs(self.store, packs)

    @property
    def store(self) -> Store:
        """This thread's connection (requests run on a pool of threads; a connection stays in its own)."""
        if not hasattr(self._local, "store"):
            self._local.store = Store.open(self.db)
        return self._local.store

    def _follow_promotion(self) -> None:
        promoted = self.store.promoted_version()
        if promoted != self.student.adapter_id:
            path = Path(self.store.adapter(promoted).path) if promoted else None
            self.student.load_adapter(path)
            if path is not None:
                try:
                    check_probe(path, self.student.probe_logprobs(list(PROBE_TEXTS)), "the server")
                except AdapterSwapError as e:
                    self.student.load_adapter(None)  # never answer with an adapter that did not verify
                    raise ApiError(503, str(e), "adapter_unavailable") from None

    def complete(self, request: ChatRequest) -> dict:
        pack = self.packs.get(request.model)
        if pack is None:
            raise ApiError(404, f"unknown model {request.model!r}: the model is a company pack id ({', '.join(sorted(self.packs))})",
                           "model_not_found")
        if len(request.messages) > self.limits.max_messages:
            raise ApiError(422, f"{len(request.messages)} messages, over the limit of {self.limits.max_messages}")
        messages = [m.model_dump(exclude_none=True) for m in request.messages if m.role not in ("system", "developer")]
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(422, "no user message: the conversation needs the customer's words")
        try:
            transcript, _ = parse_openai_messages(messages)
        except TraceError as e:
            raise ApiError(422, str(e)) from None
        with self._lock:
            started = time.monotonic()
            self._follow_promotion()
            generation = self.student.generate_with_info([render_messages(pack.company, transcript)])[0]
            self.completions.observe(time.monotonic() - started)
        parsed = parse_action(generation.text)
        conversation_id = f"chatcmpl-{uuid.uuid4().hex}"
        raw = json.dumps({"id": conversation_id, "company": pack.id,
                          "messages": messages + [{"role": "assistant", "content": generation.text}]})
        error = None if parsed.action else f"served output is not a valid action: {parsed.error}"
        self.store.add_trace(TraceRow(id=conversation_id, company_id=pack.id, format="openai", raw=raw,
                                      status="served" if parsed.action else "rejected", error=error, source_file="serve"))
        return {
            "id": conversation_id, "object": "chat.completion", "created": int(time.time()), "model": pack.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                      "total_tokens": generation.prompt_tokens + generation.completion_tokens},
            "apprentice": {"conversation_id": conversation_id, "adapter": generation.adapter_id or "base",
                           "valid": parsed.action is not None, "error": error},
        }

    def feedback(self, request: FeedbackRequest) -> dict:
        trace = self.store.trace(request.conversation_id)
        if trace is None or trace.source_file != "serve":
            raise ApiError(404, f"no served conversation {request.conversation_id!r}", "not_found")
        if trace.status != "served":
            detail = f": {trace.error}" if trace.error else ""
            raise ApiError(409, f"conversation {trace.id} is {trace.status}{detail}; feedback needs a served one", "conflict")
        self.store.set_trace_status(trace.id, "accepted", failure_note=request.failure_note)
        if isinstance(self.teacher, OracleTeacher):  # it needs a simulated ticket's truth
            return {"conversation_id": trace.id, "status": "accepted",
                    "detail": "stored as a failure; the oracle teacher cannot judge production traces, configure a litellm teacher"}
        started = time.monotonic()
        try:
            summary = correct_traces(self.store, self.teacher, list(self.packs.values()), agreements=self.agreements,
                                     weight=self.weight, only=trace.id)
        except TeacherUnavailable as e:
            raise ApiError(502, f"stored as a failure, but the teacher failed: {e}; `apprentice ingest --correct` or the "
                                "daemon's inbox job corrects it later", "teacher_error") from None
        self.feedbacks.observe(time.monotonic() - started)
        corrections = [c.id for e in self.store.episodes(trace_id=trace.id) for c in self.store.corrections(episode_id=e.id)]
        return {"conversation_id": trace.id, "status": self.store.trace(trace.id).status,  # type: ignore[union-attr]
                "corrected": summary.corrected, "review": summary.review, "correction_ids": corrections}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="apprentice", summary="The promoted support-agent adapter, OpenAI-compatible.")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, e.status, headers=headers)

    def authorize(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), service.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", "authentication_error")

    async def read(request: Request, model: type[BaseModel]):
        """Auth, then size, then shape: 401, 413, 422 (each a JSON error)."""
        authorize(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > service.limits.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes, over the limit of {service.limits.max_body_bytes}")
        body = await request.body()
        if len(body) > service.limits.max_body_bytes:
            raise ApiError(413, f"request body of {len(body)} bytes, over the limit of {service.limits.max_body_bytes}")
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(422, f"{'.'.join(str(x) for x in first['loc']) or 'body'}: {first['msg']}") from None

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "adapter": service.student.adapter_id or "base", "promoted": service.store.promoted_version() or "base"}

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": pid, "object": "model", "owned_by": "apprentice"} for pid in sorted(service.packs)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict:
        body = await read(request, ChatRequest)
        with service.completions.slot():
            return await run_in_threadpool(service.complete, body)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        body = await read(request, FeedbackRequest)
        with service.feedbacks.slot():
            return await run_in_threadpool(service.feedback, body)

    return app
