"""The long-running daemon: `apprentice run` without --rounds.

One controller process holds the store's lock and runs an APScheduler scheduler whose jobs take
turns on one thread (they share the student and the CPU):

- collect: roll the collecting adapter out on training tickets and SCoRe-correct (continuous);
- retrain: when >= `retrain_min_examples` new accepted examples exist, or `retrain_every_minutes`
  passed since the last training with at least one new example: train, evaluate, gate;
- inbox: ingest the production trace files waiting in the inbox folder and correct them;
- heartbeat: a liveness row `apprentice status` reads.

SIGINT/SIGTERM stop it: the current unit gets `stop_grace_s` to finish, else it is abandoned (an
adapter in training is marked failed), and it exits 0. A restart resumes from the store: an adapter
left `training` or `candidate` (in evaluation) by a crash is marked failed and redone by the retrain
trigger; episodes are written whole, in one transaction each, and an inbox file in one, so nothing
is half-stored (bench/chaos.py: 20 SIGKILLs).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from loop.ingest import file_digest, ingest_file, ingested_before
from loop.production import correct_traces
from loop.round import RoundSummary, Runtime, collect, examples_since_training, retrain
from loop.status import HEARTBEAT_KEY
from policies.teacher import OracleTeacher
from store import Store

log = structlog.get_logger("apprentice.daemon")


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class Triggers:
    retrain_min_examples: int = 50
    retrain_every_minutes: float = 60.0
    inbox: Path = Path("inbox")
    inbox_every_s: float = 60.0
    agreements: int = 2  # production corrections: judgements that must agree
    weight: float = 1.0  # production corrections: training weight
    heartbeat_s: float = 5.0
    stop_grace_s: float = 20.0  # on SIGINT/SIGTERM, how long the current unit may take to finish


def lock_store(db: str | Path) -> IO[str]:
    """An exclusive lock beside the store for the life of this process (the OS drops it on any
    exit, kill -9 included). A second daemon on the same store is refused, naming the holder."""
    path = Path(f"{db}.lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise AlreadyRunning(f"another apprentice run is using {db} ({holder}); stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    handle.flush()
    return handle


def recover(store: Store) -> list[str]:
    """Adapters a crash or a stop left `training`, or `candidate` (trained, its evaluation cut
    short: found by bench/chaos.py, it was never gated), are failed: the retrain trigger redoes them."""
    interrupted = []
    for adapter in store.adapters(status="training") + store.adapters(status="candidate"):
        during = "training" if adapter.status == "training" else "evaluation"
        store.set_adapter_status(adapter.version, "failed", gate_reason=f"interrupted: the daemon stopped during {during}")
        store.log_event(f"{during}_interrupted", version=adapter.version)
        log.warning(f"{during}_interrupted", version=adapter.version)
        interrupted.append(adapter.version)
    return interrupted


def _move_to_done(path: Path) -> None:
    """inbox/x.jsonl -> inbox/done/x.jsonl (x.2.jsonl, ... when that name was taken by an earlier file)."""
    done = path.parent / "done"
    done.mkdir(exist_ok=True)
    target, n = done / path.name, 1
    while target.exists():
        n += 1
        target = done / f"{path.stem}.{n}{path.suffix}"
    path.rename(target)


class Daemon:
    def __init__(self, rt: Runtime, db: str | Path, triggers: Triggers):
        self.rt, self.db, self.triggers = rt, db, triggers
        self.stopping = threading.Event()
        self.abandoned = False  # a stop left a unit running in its thread (see ops/cli.py's exit)
        self._unit = threading.Lock()  # held while a job other than the heartbeat runs
        self._round = rt.store.count("adapters") + 1
        self._last_training = time.monotonic()
        self._local = threading.local()
        # Jobs take turns on one thread (they share the student and the cores); the heartbeat has
        # its own, so liveness never waits behind a training run.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is the design, not news
        self._scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1), "heartbeat": ThreadPoolExecutor(1)},
                                              job_defaults={"coalesce": True, "max_instances": 1})

    def _rt(self) -> Runtime:
        """The runtime with this thread's own store connection (a connection serves one thread)."""
        if not hasattr(self._local, "rt"):
            self._local.rt = dataclasses.replace(self.rt, store=Store.open(self.db))
        return self._local.rt

    # --- jobs ----------------------------------------------------------------------------------

    def collect_job(self) -> None:
        if self.stopping.is_set() or self._retrain_due():
            return  # a due retrain takes the next turn before more is collected
        log.info("collecting", round=self._round)
        summary = collect(self._rt(), self._round)
        log.info("collected", round=self._round, collector=summary.collector, examples_added=summary.examples_added,
                 teacher_calls=summary.teacher_usage.calls, seconds=round(summary.seconds["collect"], 1))

    def retrain_job(self) -> None:
        if self.stopping.is_set() or not self._retrain_due():
            return
        log.info("training_started", round=self._round, new_examples=examples_since_training(self._rt().store))
        summary = retrain(self._rt(), self._round, RoundSummary(self._round, "daemon"))
        self._last_training = time.monotonic()
        log.info("gate", version=summary.version, trained_on=summary.trained_on, outcome=summary.gate, reason=summary.gate_reason,
                 calibration_j=summary.metrics.get("calibration_j"), train_loss=round(summary.train_loss or 0, 4))
        self._round += 1

    def _retrain_due(self) -> bool:
        new = examples_since_training(self._rt().store)
        overdue = time.monotonic() - self._last_training >= self.triggers.retrain_every_minutes * 60
        return new >= self.triggers.retrain_min_examples or (overdue and new > 0)

    def inbox_job(self) -> None:
        """Ingest every trace file waiting in the inbox (then moved to inbox/done/) and correct
        what was accepted; the oracle teacher cannot judge traces without truth, so those wait."""
        files = sorted(self.triggers.inbox.glob("*.jsonl")) if self.triggers.inbox.is_dir() else []
        rt = self._rt()
        companies = {p.id for p in rt.packs}
        for path in files:
            # A file is ingested in one transaction that records its digest; a stop between that
            # commit and the move below leaves it in the inbox, and the next scan only moves it.
            if ingested_before(rt.store, file_digest(path)):
                log.info("already_ingested", file=path.name)
            else:
                log.info("ingesting", file=path.name, bytes=path.stat().st_size)
                result = ingest_file(rt.store, path, companies)
                log.info("ingested", file=path.name, **result.counts())
            _move_to_done(path)
        if rt.store.traces(status="accepted") and not isinstance(rt.teacher, OracleTeacher):
            summary = correct_traces(rt.store, rt.teacher, rt.packs, agreements=self.triggers.agreements, weight=self.triggers.weight)
            log.info("production_corrected", corrected=summary.corrected, review=summary.review, no_error=summary.no_error)

    def heartbeat_job(self) -> None:
        self._rt().store.set_meta(HEARTBEAT_KEY, json.dumps({"pid": os.getpid(), "at": datetime.now(timezone.utc).isoformat()}))

    # --- life cycle ----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        recover(self.rt.store)
        self.rt.store.set_meta(HEARTBEAT_KEY, json.dumps({"pid": os.getpid(), "at": datetime.now(timezone.utc).isoformat()}))
        now = datetime.now(timezone.utc)
        s = self._scheduler
        s.add_job(self._guard(self.heartbeat_job), "interval", seconds=self.triggers.heartbeat_s, executor="heartbeat", id="heartbeat")
        s.add_job(self._guard(self.collect_job), "interval", seconds=1, next_run_time=now, id="collect")
        s.add_job(self._guard(self.retrain_job), "interval", seconds=10, next_run_time=now, id="retrain")
        s.add_job(self._guard(self.inbox_job), "interval", seconds=self.triggers.inbox_every_s, next_run_time=now, id="inbox")
        s.start()
        log.info("daemon_started", pid=os.getpid(), round=self._round)
        while not self.stopping.wait(0.5):
            pass
        log.info("daemon_stopping")
        s.shutdown(wait=False)
        if self._unit.acquire(timeout=self.triggers.stop_grace_s):
            return 0
        # Abandon the unit: what it committed stays (episodes are written whole), and an adapter it
        # was training is failed now, as a restart would. The caller exits without waiting for it.
        self.abandoned = True
        log.warning("unit_abandoned", failed=recover(self.rt.store))
        return 0

    def _guard(self, job):
        def run() -> None:
            try:
                if job == self.heartbeat_job:
                    job()
                    return
                with self._unit:
                    job()
            except BaseException as e:  # a failed unit is logged and retried on the next tick
                if self.stopping.is_set():
                    return  # stopping: an abandoned unit's Ray calls end with SystemExit, nothing to report
                if not isinstance(e, Exception):
                    raise
                self._rt().store.log_event("error", job=job.__name__, error=f"{type(e).__name__}: {e}")
                log.exception("job_failed", job=job.__name__)

        run.__name__ = job.__name__
        return run
