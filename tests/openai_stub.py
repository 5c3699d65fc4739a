"""A local OpenAI-compatible chat server that replays scripted answers (for teacher tests).

    with OpenAIStub() as stub:
        stub.enqueue(['{"first_error": null, ...}', Answer(status=500), Answer(delay_s=2)])
        ... point a client at stub.base_url ...
        stub.requests   # every request body received, in arrival order

Only POST /v1/chat/completions. Each request takes the next scripted answer; with none left it
asks the `responder` (a function of the request body, e.g. tests/loopback_teacher.py), and without
one answers 400 so that a test that forgot one fails fast and clearly instead of hanging.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_exceeded"}


@dataclass(frozen=True)
class Answer:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0  # the server waits this long before answering
    prompt_tokens: int = 100
    completion_tokens: int = 20


class OpenAIStub:
    def __init__(self, port: int = 0, responder: Callable[[dict], Answer] | None = None) -> None:
        self.responder = responder
        self.requests: list[dict] = []
        self.max_active = 0  # most requests in flight at once
        self._answers: deque[Answer] = deque()
        self._active = 0
        self._lock = threading.Condition()
        self._wake = threading.Event()  # set by reset(): cuts short the delays of answers nobody waits for
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True  # a slow answer whose client gave up must not block close()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def active(self) -> int:
        """Requests received and not yet answered."""
        return self._active

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def enqueue(self, answers: list[Answer | str]) -> None:
        """Script the next answers; a string is a 200 answer with that content."""
        with self._lock:
            self._answers.extend(Answer(a) if isinstance(a, str) else a for a in answers)

    def reset(self) -> None:
        """Forget the script and the requests, after ending the requests still in flight (a slow
        answer whose client timed out) so that they cannot count in the next test."""
        with self._lock:
            self._wake.set()
            self._lock.wait_for(lambda: self._active == 0, timeout=5)
            self._wake = threading.Event()
            self._answers.clear()
            self.requests.clear()
            self.max_active = 0

    def __enter__(self) -> OpenAIStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _begin(self, body: dict) -> tuple[Answer | None, threading.Event]:
        with self._lock:
            self.requests.append(body)
            self._active += 1
            self.max_active = max(self.max_active, self._active)
            return (self._answers.popleft() if self._answers else None), self._wake

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()


def _completion(model: str, answer: Answer) -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    }


def _handler(stub: OpenAIStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer, wake = stub._begin(body)
            try:
                if answer is None and stub.responder is not None:
                    answer = stub.responder(body)
                if answer is None:
                    answer = Answer("stub: no answer enqueued", status=400)
                wake.wait(answer.delay_s)
            finally:
                # Leave before answering: the client frees its slot only once it has the answer,
                # so the next request can never be counted as overlapping this one.
                stub._end()
            if answer.status == 200:
                return self._send(200, _completion(body.get("model", ""), answer))
            message = answer.content or f"stub error {answer.status}"
            self._send(answer.status, {"error": {"message": message, "type": _ERROR_TYPES.get(answer.status, "server_error"), "code": answer.status}})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler
