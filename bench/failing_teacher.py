"""A two-round run whose teacher fails 30% of its calls.

    .venv/bin/python bench/failing_teacher.py [--fail-rate 0.3] [--warm 40] [--rollout 20] [--eval 5] [--budget 0.016]

`apprentice run --rounds 2` (the command line, in a subprocess) with the tiny random test model
(tests/tiny_model.py; the real student would take hours for the same teacher traffic) and the
built-in packs. The teacher is `openai/gpt-4o-mini` (priced by litellm's table, so the budget cap
binds) at a loopback OpenAI stub that answers as the environment's oracle and fails `--fail-rate` of
the calls, one of four ways with equal odds: slower than the 2 s teacher timeout, HTTP 500, not
JSON, or a valid action the checker refuses (tests/loopback_teacher.py). `--budget` is set so the
cap is reached during round 2.

Checked at the end (a failed check is printed and exits 1):
- the run exits 0 with both adapters trained and gated;
- every call is accounted: the store's teacher calls equal the requests the teacher received;
- every ask the teacher gave up on (four failed attempts, or the cap reached) is recorded: a
  `teacher_failed` event (SCoRe) or a demonstration step holding the error;
- every refused action the loop checked is stored: a rejected correction or an unaccepted step;
- nothing unverified is trained on: every example's episode ended resolved with every step accepted;
- the budget cap holds: spend stays under the cap plus one call.
Prints a table and writes bench/reports/failing_teacher.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the tiny model and the loopback teacher

from environments.builtin import build_packs  # noqa: E402
from policies.litellm_teacher import litellm  # noqa: E402 (set up to read its local price table)
from policies.policy import TEACHER_FAILED  # noqa: E402
from store import Store  # noqa: E402
from tests.loopback_teacher import COMPLETION_TOKENS, FAILURES, LoopbackOracle  # noqa: E402
from tests.openai_stub import OpenAIStub  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402
from bench.chaos import kill_group  # noqa: E402

TIMEOUT_S = 2.0


@dataclass
class Outcome:
    figures: dict[str, object] = field(default_factory=dict)
    failed_checks: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed_checks.append(what)


def run(workdir: Path, *, fail_rate: float = 0.3, warm: int = 40, rollout: int = 20, eval_tickets: int = 5, budget: float = 0.016,
        seed: int = 0, model_dir: Path | None = None) -> Outcome:
    model_dir = model_dir or save_tiny_model(workdir / "tiny-model")
    oracle = LoopbackOracle(build_packs(0), fail_rate=fail_rate, timeout_s=TIMEOUT_S, seed=seed)
    db = workdir / "failing.db"
    with OpenAIStub(responder=oracle) as stub:
        # one policy draw: the loopback oracle finds a prompt's pack by its policy text
        settings = {"model": model_dir, "adapters_dir": workdir / "adapters", "policy_redraws": 0, "warm_start_tickets": warm, "rollout_tickets": rollout,
                    "eval_tickets": eval_tickets, "calibration_tickets": 1, "max_new_tokens": 24, "epochs": 1, "seed": seed,
                    "teacher": "openai/gpt-4o-mini", "teacher_api_base": stub.base_url, "teacher_api_key_env": "LOOPBACK_TEACHER_KEY",
                    "teacher_redact": "false", "teacher_timeout_s": TIMEOUT_S, "teacher_budget_usd": budget}
        args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run", "--rounds", "2", "--db", str(db), *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "LOOPBACK_TEACHER_KEY": "loopback"})
        try:
            _, stderr = proc.communicate()
        finally:  # a timeout or ^C here must not leave the run and its Ray behind
            if proc.poll() is None:
                proc.kill()
            kill_group(proc.pid)
        seconds = time.monotonic() - started
        received = len(stub.requests)
    out = Outcome()
    out.check(proc.returncode == 0, f"apprentice run exited {proc.returncode}: {stderr[-2000:]}")
    out.check(not oracle.errors, f"the loopback teacher could not read {len(oracle.errors)} prompts: {oracle.errors[:2]}")
    store = Store.open(db)
    adapters = store.adapters()
    out.check([a.status in ("awaiting_approval", "rejected_by_gate", "promoted") for a in adapters] == [True, True],
              f"two adapters trained and gated, got {[(a.version, a.status) for a in adapters]}")

    collected = [e.payload for e in store.events(kind="collected")]
    calls = sum(p["teacher_calls"] for p in collected)
    cost = sum(p["teacher_cost_usd"] for p in collected)
    out.check(calls == received, f"the store counts {calls} teacher calls, the teacher received {received}")

    demo_steps = [s for e in store.episodes(run_kind="demonstration") for s in store.steps(e.id)]
    gave_up = [e.payload["error"] for e in store.events(kind="teacher_failed")] + [
        s.raw.removeprefix(TEACHER_FAILED) for s in demo_steps if s.raw.startswith(TEACHER_FAILED)]
    capped = [g for g in gave_up if "reaching its cap" in g]
    out.check(len(gave_up) - len(capped) == oracle.exhausted,
              f"{oracle.exhausted} asks failed every attempt, {len(gave_up) - len(capped)} recorded")
    refused_demo = [s for s in demo_steps if s.action is not None and not s.acceptable]
    rejected = store.corrections(status="rejected")
    out.check(all(not c.verified for c in rejected) and all(c.verified for c in store.corrections(status="accepted")),
              "a correction's status matches the checker's verdict")

    unverified = []
    for example in store.examples():
        episode = store.episode(example.episode_id)  # type: ignore[arg-type]
        steps = store.steps(example.episode_id)  # type: ignore[arg-type]
        if not episode.resolved or not all(s.acceptable for s in steps):  # type: ignore[union-attr]
            unverified.append(example.id)
    out.check(not unverified, f"examples from unverified episodes: {unverified[:10]}")
    # The cap is checked before each request, so the last one may cross it by at most its own cost.
    prompt_cost, completion_cost = litellm.cost_per_token("gpt-4o-mini", prompt_tokens=oracle.largest_prompt,
                                                          completion_tokens=COMPLETION_TOKENS)
    one_call = prompt_cost + completion_cost
    out.check(cost <= budget + one_call, f"spent ${cost:.5f}, over the ${budget} cap by more than one call (${one_call:.5f})")

    by_round = {a.config.get("round"): a.config.get("examples") for a in adapters}
    out.figures = {
        "teacher requests": received,
        **{f"injected: {kind}": oracle.injected[kind] for kind in FAILURES},
        "injected share": f"{sum(oracle.injected[k] for k in FAILURES) / max(received, 1):.1%}",
        "calls in the store": calls,
        "asks given up (4 failed attempts)": oracle.exhausted,
        "asks refused by the budget cap": len(capped),
        "recorded as teacher_failed / failed demo step": len(gave_up),
        "refused actions stored: rejected corrections": len(rejected),
        "refused actions stored: unaccepted demo steps": len(refused_demo),
        "examples trained on (v0001, v0002)": f"{by_round.get(1)}, {by_round.get(2)}",
        "examples from unverified episodes": len(unverified),
        "spent / cap (USD)": f"{cost:.5f} / {budget:.5f} (one call costs at most {one_call:.5f})",
        "adapters": ", ".join(f"{a.version} {a.status}" for a in adapters),
        "run time (s)": round(seconds),
    }
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fail-rate", type=float, default=0.3)
    parser.add_argument("--warm", type=int, default=40, help="warm-start tickets (round 1 demonstrations)")
    parser.add_argument("--rollout", type=int, default=20, help="rollout tickets in round 2")
    parser.add_argument("--eval", type=int, default=5, help="held-out tickets per company")
    parser.add_argument("--budget", type=float, default=0.016, help="teacher_budget_usd (round 1 spends about $0.015 at the defaults)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = run(Path(tmp), fail_rate=args.fail_rate, warm=args.warm, rollout=args.rollout, eval_tickets=args.eval,
                  budget=args.budget, seed=args.seed)
    from bench.report import publish

    command = (f"bench/failing_teacher.py --fail-rate {args.fail_rate} --warm {args.warm} --rollout {args.rollout} "
               f"--eval {args.eval} --budget {args.budget} --seed {args.seed}")
    lines = [f"# A teacher failing {args.fail_rate:.0%} of its calls through a two-round run", "",
             f"`{command}` (tiny random student, built-in packs, loopback teacher `openai/gpt-4o-mini`, timeout {TIMEOUT_S} s)", "",
             "| figure | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in out.figures.items()], "",
             "checks: " + ("all hold" if not out.failed_checks else "FAILED: " + "; ".join(out.failed_checks))]
    publish("failing_teacher", lines)
    sys.exit(1 if out.failed_checks else 0)


if __name__ == "__main__":
    main()
