"""20 SIGKILLs of the daemon, a restart after each, and what must hold throughout.

    .venv/bin/python bench/chaos.py [--kills 20] [--seed 0]

The daemon (`apprentice run`, a subprocess) runs on tiny settings: the tiny random test model
(tests/tiny_model.py), the built-in packs, and a loopback teacher that answers as the oracle after
0.1 s (tests/loopback_teacher.py over tests/openai_stub.py), so production traces dropped into its
inbox get corrected too. Kill targets cycle through six phases in a seeded random order; each kill
waits until the daemon is in its target phase, then a random moment more, then SIGKILLs the daemon
(and its process group: the local Ray it started, as a hard stop of the service would):

- collection: a collect unit while no judgement is in flight (warm-start demonstrations, the
  student's rollouts, or its continuations after a repair);
- correction: a collect unit while the teacher is judging (SCoRe);
- training: an adapter is `training`;
- evaluation: an adapter is `candidate` (trained, being evaluated on the held-out tickets);
- inbox: the inbox job (a file's ingest transaction, its move to done/, or the traces' correction);
- approval: an operator's `apprentice approve --force` runs; half the time it is SIGKILLed too.

What the daemon is doing is read from outside: its JSON log lines (`collecting`, `ingesting`, ...),
the requests the teacher receives, and the adapters' status in the store.

After every kill (before the restart): `PRAGMA integrity_check` is ok; every episode has all its
steps; the counts of episodes, steps, corrections, examples, decisions, traces and evaluations are
at least what they were before the kill (and never went down); the promoted pointer names nothing
or a version whose files exist; an approval killed with the daemon either committed (decision and
pointer) or left both as they were. After every restart, the adapters the kill left `training` or
`candidate` (in evaluation) are `failed`, so the retrain trigger redoes them. At the end (a clean
SIGTERM stop, exit 0): no adapter is `training` or `candidate`, and every inbox file was
ingested exactly once (one `ingested` event with its digest, each of its traces stored once) or
still waits. Prints a table and writes bench/reports/chaos.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the tiny model and the loopback teacher

from environments.builtin import build_packs  # noqa: E402
from tests.loopback_teacher import LoopbackOracle  # noqa: E402
from tests.openai_stub import OpenAIStub  # noqa: E402
from tests.tiny_model import save_tiny_model  # noqa: E402

PHASES = ("collection", "correction", "training", "evaluation", "inbox", "approval")
COUNTED = ("episodes", "steps", "corrections", "examples", "decisions", "traces", "evaluations")
MAX_DELAY_S = {"collection": 0.5, "correction": 1.0, "training": 2.0, "evaluation": 0.3, "inbox": 1.0, "approval": 1.5}
COMPANY = "northwind-cloud"  # a training company of the built-in packs


@dataclass
class Kill:
    n: int
    target: str
    phase: str  # what the daemon was doing when it was killed, as observed just before
    at_s: float  # seconds since the bench started
    detail: str = ""  # inbox: the last inbox log line before the kill; approval: whether it committed
    approver_killed: bool = False
    restart_s: float = 0.0  # restart until the daemon logged daemon_started
    problems: list[str] = field(default_factory=list)


@dataclass
class ChaosReport:
    kills: list[Kill] = field(default_factory=list)
    final_problems: list[str] = field(default_factory=list)
    inbox_files: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        return [f"kill {k.n} ({k.phase}): {p}" for k in self.kills for p in k.problems] + self.final_problems


# --- reading the store from outside (a plain read-only connection; the daemon keeps writing) ----------


def _query(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def counts(db: Path) -> dict[str, int]:
    return {t: _query(db, f"SELECT count(*) FROM {t}")[0][0] for t in COUNTED}


def invariants(db: Path) -> list[str]:
    """What must hold in the store after any kill."""
    problems = []
    if (ok := _query(db, "PRAGMA integrity_check")) != [("ok",)]:
        problems.append(f"integrity_check: {ok[:3]}")
    partial = _query(db, "SELECT e.id, e.n_steps, (SELECT count(*) FROM steps s WHERE s.episode_id = e.id) AS n FROM episodes e "
                         "WHERE e.n_steps != n")
    if partial:
        problems.append(f"episodes missing steps: {partial[:5]}")
    version = promoted(db)
    if version is not None:
        rows = _query(db, f"SELECT path FROM adapters WHERE version = '{version}'")
        files = ("adapter_model.safetensors", "adapter_config.json", "probe.json")
        if not rows or not all((Path(rows[0][0]) / f).exists() for f in files):
            problems.append(f"the promoted pointer names {version}, whose files are missing")
    return problems


def promoted(db: Path) -> str | None:
    rows = _query(db, "SELECT value FROM meta WHERE key = 'promoted_version'")
    return rows[0][0] if rows else None


def adapters(db: Path) -> dict[str, str]:
    return dict(_query(db, "SELECT version, status FROM adapters ORDER BY version"))


# --- the daemon under test --------------------------------------------------------------------


class DaemonProcess:
    def __init__(self, db: Path, settings: dict, log: Path):
        self.db, self.settings, self.log = db, settings, log
        self.proc: subprocess.Popen | None = None
        self.offset = 0  # where this incarnation's log lines start
        self.events: list[dict] = []

    def start(self) -> float:
        """Start it and wait for `daemon_started`; returns the seconds that took."""
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.events = []
        args = [a for k, v in self.settings.items() for a in ("--set", f"{k}={v}")]
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "run", "--db", str(self.db), "--log-json", *args], cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "LOOPBACK_TEACHER_KEY": "loopback"})
        self.wait_for(lambda: any(e.get("event") == "daemon_started" for e in self.poll()), 600, "daemon_started")
        return time.monotonic() - started

    def poll(self) -> list[dict]:
        """This incarnation's log events so far (JSON lines; Ray's own output is skipped)."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return self.events

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}) while waiting for {what}; see {self.log}")
            if condition():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        kill_group(self.proc.pid)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(180)
        kill_group(self.proc.pid)
        return code


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # Ray's head processes, left behind by a killed driver
    except ProcessLookupError:
        pass


class Observer:
    """What the daemon is doing now, from its log lines, the teacher's requests and the store."""

    def __init__(self, daemon: DaemonProcess, oracle: LoopbackOracle, stub: OpenAIStub):
        self.daemon, self.oracle, self.stub = daemon, oracle, stub
        self.approver: subprocess.Popen | None = None
        self._seen, self._last = 0, ""

    def phase(self) -> str:
        events = self.daemon.poll()
        for e in events[self._seen:]:
            if e.get("event") in ("daemon_started", "collecting", "collected", "training_started", "gate", "ingesting", "ingested",
                                  "already_ingested", "production_corrected", "job_failed"):
                self._last = e["event"]
        self._seen = len(events)
        if self.approver is not None and self.approver.poll() is None:
            return "approval"
        statuses = set(adapters(self.daemon.db).values())
        if "training" in statuses:
            return "training"
        if "candidate" in statuses:
            return "evaluation"
        if self._last == "collecting":
            return "correction" if self.stub.active and self.oracle.last_kind == "judge" else "collection"
        if self._last in ("ingesting", "ingested", "already_ingested"):
            return "inbox"
        return "idle"

    @property
    def last_event(self) -> str:
        return self._last

    def reset(self) -> None:
        self._seen, self._last = 0, ""


# --- the run ----------------------------------------------------------------------------------


def trace_line(trace_id: str) -> str:
    return json.dumps({"id": trace_id, "company": COMPANY, "failure_note": "the customer was unhappy", "messages": [
        {"role": "user", "content": f"How do I export my data? (ticket {trace_id})"},
        {"role": "assistant", "content": json.dumps({"thought": "", "action": "escalate", "args": {"reason": "likely_bug"},
                                                     "message": "A colleague will look at it."})}]})


def drop_inbox_file(inbox: Path, k: int, new: int = 4, repeated: int = 400, pool: int = 10) -> tuple[Path, list[str]]:
    """Export k: `new` new traces plus `repeated` lines of earlier exports (support desks re-export
    overlapping windows), written beside the inbox and moved in, as a producer should."""
    ids = [f"chaos-{k}-{i}" for i in range(new)]
    lines = [trace_line(t) for t in ids] + [trace_line(f"chaos-old-{i % pool}") for i in range(repeated)]
    staging = inbox.parent / f"export-{k:03d}.jsonl"
    staging.write_text("\n".join(lines) + "\n")
    target = inbox / staging.name
    staging.rename(target)
    return target, ids


def run(workdir: Path, *, kills: int = 20, seed: int = 0, model_dir: Path | None = None, progress=print) -> ChaosReport:
    rng = random.Random(seed)
    clock = time.monotonic()
    model_dir = model_dir or save_tiny_model(workdir / "tiny-model")
    inbox = workdir / "inbox"
    inbox.mkdir()
    db = workdir / "chaos.db"
    oracle = LoopbackOracle(build_packs(0), delay_s=0.1, seed=seed)
    report = ChaosReport()
    with OpenAIStub(responder=oracle) as stub:
        # one policy draw: the loopback oracle finds a prompt's pack by its policy text
        settings = {"model": model_dir, "adapters_dir": workdir / "adapters", "policy_redraws": 0, "inbox": inbox, "inbox_every_seconds": 2,
                    "warm_start_tickets": 6, "rollout_tickets": 4, "eval_tickets": 6, "calibration_tickets": 1, "max_new_tokens": 48,
                    "max_steps": 6, "epochs": 1, "retrain_min_examples": 8, "retrain_every_minutes": 2.0, "seed": seed,
                    "teacher": "openai/gpt-4o-mini", "teacher_api_base": stub.base_url, "teacher_api_key_env": "LOOPBACK_TEACHER_KEY",
                    "teacher_redact": "false", "teacher_timeout_s": 10}
        daemon = DaemonProcess(db, settings, workdir / "daemon.log")
        observer = Observer(daemon, oracle, stub)
        try:
            daemon.start()
            dropped: dict[str, list[str]] = {}
            highest = {t: 0 for t in COUNTED}
            targets: list[str] = []
            for n in range(1, kills + 1):
                if not targets:
                    targets = rng.sample(PHASES, len(PHASES))
                target = targets.pop()
                if target == "inbox" or rng.random() < 0.3:
                    path, ids = drop_inbox_file(inbox, len(dropped))
                    dropped[path.name] = ids
                version = None
                if target == "approval":
                    daemon.wait_for(lambda: any(s in ("awaiting_approval", "rejected_by_gate", "retired") for s in adapters(db).values()),
                                    600, "a gated adapter to approve")
                    version = [v for v, s in adapters(db).items() if s in ("awaiting_approval", "rejected_by_gate", "retired")][-1]
                    pointer_before = promoted(db)
                    observer.approver = subprocess.Popen(
                        [sys.executable, "-m", "ops.cli", "approve", version, "--db", str(db), "--by", "chaos", "--force", "--note",
                         f"chaos kill {n}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    daemon.wait_for(lambda: observer.phase() == target, 300, f"phase {target}")
                except RuntimeError as e:
                    if daemon.proc.poll() is not None:
                        raise
                    progress(f"kill {n}: {e}; killing in whatever phase it is")
                deadline = time.monotonic() + rng.uniform(0, MAX_DELAY_S[target])
                phase = observer.phase()
                while time.monotonic() < deadline:
                    time.sleep(0.02)
                    phase = observer.phase()
                before = counts(db)
                in_training = [v for v, s in adapters(db).items() if s in ("training", "candidate")]
                kill = Kill(n, target, phase, round(time.monotonic() - clock, 1), detail=observer.last_event if phase == "inbox" else "")
                daemon.kill()
                if observer.approver is not None:
                    if observer.approver.poll() is None and rng.random() < 0.5:
                        observer.approver.send_signal(signal.SIGKILL)
                        kill.approver_killed = True
                    observer.approver.wait(120)
                    observer.approver = None
                    # The approval is one transaction: its decision row and the pointer move together.
                    committed = _query(db, f"SELECT count(*) FROM decisions WHERE note = 'chaos kill {n}'")[0][0] == 1
                    kill.detail = f"{version} approval committed" if committed else f"{version} approval not committed"
                    if promoted(db) != (version if committed else pointer_before):
                        kill.problems.append(f"the pointer is {promoted(db)} after an approval of {version} that "
                                             f"{'committed' if committed else 'did not commit'}")
                after = counts(db)
                kill.problems += invariants(db)
                kill.problems += [f"{t} went down: {before[t]} before the kill, {after[t]} after" for t in COUNTED if after[t] < before[t]]
                kill.problems += [f"{t} went down: {highest[t]} earlier, {after[t]} now" for t in COUNTED if after[t] < highest[t]]
                highest = {t: max(highest[t], after[t]) for t in COUNTED}
                kill.restart_s = round(daemon.start(), 1)
                observer.reset()
                left = [v for v in in_training if adapters(db)[v] != "failed"]
                if left:
                    kill.problems.append(f"adapters left training or in evaluation after the restart: {left}")
                report.kills.append(kill)
                progress(f"kill {n:2d}/{kills} target {target:10s} phase {phase:10s} {kill.detail:30s} at {kill.at_s:6.1f} s, "
                         f"restart {kill.restart_s} s"
                         + (f"  PROBLEMS: {kill.problems}" if kill.problems else ""))
            # The last incarnation drains the inbox and is stopped cleanly.
            daemon.wait_for(lambda: not list(inbox.glob("*.jsonl")), 600, "the inbox to drain")
            code = daemon.stop()
        finally:  # an error or a timeout here must not leave the daemon and its Ray running
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
            if observer.approver is not None and observer.approver.poll() is None:
                observer.approver.kill()
    if code != 0:
        report.final_problems.append(f"SIGTERM stop exited {code}")
    report.final_problems += invariants(db)
    if training := [v for v, s in adapters(db).items() if s in ("training", "candidate")]:
        report.final_problems.append(f"adapters left training or in evaluation: {training}")
    digests = [json.loads(p)["sha256"] for (p,) in _query(db, "SELECT payload FROM events WHERE kind = 'ingested'")]
    for name, ids in dropped.items():
        done, waiting = inbox / "done" / name, inbox / name
        if not done.exists() and not waiting.exists():
            report.final_problems.append(f"inbox file {name} is lost")
            continue
        times = digests.count(hashlib.sha256((done if done.exists() else waiting).read_bytes()).hexdigest())
        if times != (1 if done.exists() else 0):
            report.final_problems.append(f"inbox file {name} was ingested {times} times")
        for trace_id in ids:
            stored = _query(db, f"SELECT count(*) FROM traces WHERE trace_id = '{trace_id}'")[0][0]
            if stored != (1 if done.exists() else 0):
                report.final_problems.append(f"trace {trace_id} of {name} is stored {stored} times")
    report.inbox_files, report.counts, report.seconds = len(dropped), counts(db), round(time.monotonic() - clock)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = run(Path(tmp), kills=args.kills, seed=args.seed)
    from bench.report import publish

    by_phase = {p: sum(k.phase == p for k in report.kills) for p in (*PHASES, "idle")}
    restarts = sorted(k.restart_s for k in report.kills)
    lines = [f"# {len(report.kills)} SIGKILLs of the daemon", "",
             f"`bench/chaos.py --kills {args.kills} --seed {args.seed}` (tiny random student, built-in packs, loopback oracle teacher; "
             f"{report.seconds} s)", "",
             "| kill | target | phase at the kill | detail | approver killed too | at (s) | restart (s) | invariants |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             *[f"| {k.n} | {k.target} | {k.phase} | {k.detail} | {'yes' if k.approver_killed else ''} | {k.at_s} | {k.restart_s} | "
               f"{'hold' if not k.problems else '; '.join(k.problems)} |" for k in report.kills], "",
             "kills by phase: " + ", ".join(f"{p} {c}" for p, c in by_phase.items() if c), "",
             f"restart to daemon_started: median {restarts[len(restarts) // 2]} s, max {restarts[-1]} s", "",
             f"at the end: {', '.join(f'{t} {c}' for t, c in report.counts.items())}; {report.inbox_files} inbox files", "",
             "invariants: " + ("all held after every kill and at the end" if not report.problems else "FAILED: " + "; ".join(report.problems))]
    publish("chaos", lines)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
