"""`apprentice serve` under 64 concurrent clients, then 1,000 fuzzed request bodies.

    .venv/bin/python bench/load.py [--clients 64] [--seconds 60] [--fuzz 1000] [--max-queue 16] [--model tiny]

Starts `apprentice serve` (the command line, a subprocess on a free loopback port) on a fresh store
with the built-in packs and, by default, the tiny random test model (tests/tiny_model.py) writing
up to 32 tokens; `--model smollm2-135m` serves the real student. Then:

1. load: `--clients` threads each send chat completions (a random built-in ticket's opening) back
   to back for `--seconds`; a client answered 503 waits the Retry-After it was given, as a
   well-behaved client does. Generation is serialized, so the server admits `--max-queue` requests
   at a time and answers the rest 503 at once.
2. fuzz: `--fuzz` bodies from tests/fuzz.py, one at a time, to completions and feedback.

Checked: no answer is a 500 (or any 5xx but the admission's 503), every 503 carries a Retry-After,
no client waits past its timeout, and the server still answers /healthz at the end. Prints a table
and writes bench/reports/load.md (load-<model>.md for another model).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the tiny model and the fuzzer

from environments.builtin import build_packs  # noqa: E402
from tests.fuzz import fuzz_bodies  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402

TOKEN = "load-bench"
CLIENT_TIMEOUT_S = 300.0


@dataclass
class LoadReport:
    statuses: Counter = field(default_factory=Counter)
    latency_ok: list[float] = field(default_factory=list)
    latency_503: list[float] = field(default_factory=list)
    retry_after: list[int] = field(default_factory=list)
    served_ids: list[str] = field(default_factory=list)
    fuzz_statuses: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else (values or [0.0])[0]


def start_server(workdir: Path, model: str, max_queue: int, max_new_tokens: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    args = ["--set", f"model={model}", "--set", f"max_new_tokens={max_new_tokens}", "--db", str(workdir / "serve.db"),
            "--port", str(port), "--max-queue", str(max_queue)]
    log = open(workdir / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "APPRENTICE_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"apprentice serve exited {proc.returncode}; see {workdir / 'serve.log'}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("apprentice serve did not come up in 300 s")


def load(url: str, companies: list[tuple[str, list[str]]], clients: int, seconds: float, seed: int, report: LoadReport) -> None:
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            while time.monotonic() < stop_at:
                company, openings = rng.choice(companies)
                body = {"model": company, "messages": [{"role": "user", "content": rng.choice(openings)}]}
                started = time.monotonic()
                try:
                    response = http.post(f"{url}/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    with lock:
                        report.statuses[f"client error: {type(e).__name__}"] += 1
                    continue
                took = time.monotonic() - started
                wait = 0.0
                with lock:
                    report.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        report.latency_ok.append(took)
                        report.served_ids.append(response.json()["id"])
                    elif response.status_code == 503:
                        report.latency_503.append(took)
                        header = response.headers.get("retry-after", "")
                        if header.isdigit():
                            report.retry_after.append(int(header))
                            wait = int(header)
                        else:
                            report.problems.append("a 503 without a Retry-After")
                time.sleep(min(wait, max(0.0, stop_at - time.monotonic())))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def fuzz(url: str, company: str, n: int, seed: int, served_ids: list[str], report: LoadReport) -> None:
    with httpx.Client(timeout=CLIENT_TIMEOUT_S, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}) as http:
        for endpoint, body in fuzz_bodies(n, company=company, seed=seed, conversation_ids=served_ids[:20]):
            response = http.post(f"{url}{endpoint}", content=body)
            report.fuzz_statuses[response.status_code] += 1
            if response.status_code >= 500 and response.status_code != 503:
                report.problems.append(f"fuzz: {response.status_code} for {endpoint} {body[:200]!r}")


def run(workdir: Path, *, clients: int = 64, seconds: float = 60, fuzz_n: int = 1000, max_queue: int = 16, model: str = "tiny",
        max_new_tokens: int = 32, seed: int = 0) -> LoadReport:
    model_dir = str(save_tiny_model(workdir / "tiny-model")) if model == "tiny" else model
    packs = build_packs(0)
    companies = [(p.id, [t.opening for t in p.tickets]) for p in packs]
    report = LoadReport()
    clock = time.monotonic()
    proc, url = start_server(workdir, model_dir, max_queue, max_new_tokens)
    try:
        load(url, companies, clients, seconds, seed, report)
        fuzz(url, packs[0].id, fuzz_n, seed, report.served_ids, report)
        if httpx.get(f"{url}/healthz", timeout=10).status_code != 200:
            report.problems.append("/healthz does not answer 200 after the run")
    finally:
        proc.terminate()
        proc.wait(60)
    report.seconds = time.monotonic() - clock
    report.problems += [f"load: {n} answers {s}" for s, n in report.statuses.items() if s != 200 and s != 503]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--fuzz", type=int, default=1000)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--model", default="tiny", help="tiny (the random test model) or anything `--set model=` takes")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(tmp), clients=args.clients, seconds=args.seconds, fuzz_n=args.fuzz, max_queue=args.max_queue, model=args.model,
                max_new_tokens=args.max_new_tokens, seed=args.seed)
    from bench.report import publish

    ok, busy = r.latency_ok, r.latency_503
    command = (f"bench/load.py --clients {args.clients} --seconds {args.seconds:g} --fuzz {args.fuzz} --max-queue {args.max_queue} "
               f"--model {args.model} --max-new-tokens {args.max_new_tokens}")
    lines = [f"# apprentice serve: {args.clients} concurrent clients for {args.seconds:g} s, then {args.fuzz} fuzzed bodies", "",
             f"`{command}` (model: {args.model}; generation is serialized, so admission is bounded at {args.max_queue})", "",
             "| figure | value |", "| --- | --- |",
             f"| completions answered 200 | {r.statuses[200]} ({r.statuses[200] / args.seconds:.1f}/s) |",
             f"| latency of a 200, p50 / p95 (s) | {_quantile(ok, 0.5):.2f} / {_quantile(ok, 0.95):.2f} |",
             f"| answered 503 (queue full) | {r.statuses[503]} |",
             f"| latency of a 503, p50 / p95 (s) | {_quantile(busy, 0.5):.3f} / {_quantile(busy, 0.95):.3f} |",
             f"| Retry-After given, median / max (s) | {statistics.median(r.retry_after) if r.retry_after else '-'} / "
             f"{max(r.retry_after, default='-')} |",
             f"| other statuses under load | {dict((k, v) for k, v in r.statuses.items() if k not in (200, 503)) or 'none'} |",
             f"| fuzzed bodies by status | {dict(sorted(r.fuzz_statuses.items()))} |",
             f"| 5xx among the fuzzed | {sum(n for s, n in r.fuzz_statuses.items() if s >= 500)} |",
             f"| wall time (s) | {r.seconds:.0f} |", "",
             "checks: " + ("all hold" if not r.problems else "FAILED: " + "; ".join(r.problems[:10]))]
    publish("load" if args.model == "tiny" else f"load-{Path(args.model).name}", lines)
    sys.exit(1 if r.problems else 0)


if __name__ == "__main__":
    main()
