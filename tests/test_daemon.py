"""The daemon in a subprocess with the tiny model: it trains by the threshold trigger, survives a
SIGKILL in the middle of training without losing rows, refuses a second instance, switches its
rollout workers to an approved version, and stops on SIGTERM with exit code 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import Store
from tests.test_round import two_company_packs

ROOT = Path(__file__).parents[1]
TABLES = ("episodes", "steps", "corrections", "examples", "evaluations", "decisions")


def start(db, settings, log):
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "run", "--db", str(db), "--log-json", *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def counts(db):
    store = Store.open(db)
    try:
        return {t: store.count(t) for t in TABLES}
    finally:
        store.close()


def statuses(db):
    store = Store.open(db)
    try:
        return {a.version: a.status for a in store.adapters()}
    finally:
        store.close()


def collectors(db):
    store = Store.open(db)
    try:
        return [e.payload["collector"] for e in store.events(kind="collected")]
    finally:
        store.close()


@pytest.mark.slow
def test_daemon_resumes_after_sigkill_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    db = tmp_path / "a.db"
    settings = {"packs": two_company_packs(tmp_path / "packs"), "model": tiny_model_dir, "adapters_dir": tmp_path / "adapters",
                "warm_start_tickets": 6, "rollout_tickets": 3, "eval_tickets": 3, "max_new_tokens": 16, "epochs": 1,
                "retrain_min_examples": 3, "inbox": tmp_path / "inbox",
                "calibration_tickets": 1}  # acme has 7 tickets: the validation split must leave training ones
    log = open(tmp_path / "daemon.log", "ab")
    first = start(db, settings, log)
    try:
        wait_for(lambda: db.exists() and "training" in statuses(db).values(), first, 300, "a training run")
        second = subprocess.run([sys.executable, "-m", "ops.cli", "run", "--db", str(db)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "another apprentice run is using" in second.stderr
        before = counts(db)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert counts(db) == before  # nothing committed was lost
    assert list(statuses(db).values()) == ["training"]

    again = start(db, settings, log)
    try:
        wait_for(lambda: any(s in ("awaiting_approval", "rejected_by_gate", "promoted") for s in statuses(db).values()),
                 again, 300, "the redone training to be gated")
        after = counts(db)
        assert all(after[t] >= before[t] for t in TABLES)
        assert statuses(db)["v0001"] == "failed"
        # An operator approves the gated version; the rollout workers switch to it (the swap is
        # verified by the probe log-probs, else the collection fails) and collect with it.
        gated = next(v for v, s in statuses(db).items() if s in ("awaiting_approval", "rejected_by_gate"))
        approve = subprocess.run([sys.executable, "-m", "ops.cli", "approve", gated, "--db", str(db), "--by", "ana", "--force", "--note", "test"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert approve.returncode == 0, approve.stderr
        wait_for(lambda: collectors(db)[-1:] == [gated], again, 300, f"a collection by {gated}")
        started = time.monotonic()
        again.send_signal(signal.SIGTERM)
        assert again.wait(120) == 0
        assert time.monotonic() - started < 120
    finally:
        if again.poll() is None:
            again.kill()
    assert all(counts(db)[t] >= after[t] for t in TABLES)
    store = Store.open(db)
    assert [e.payload["version"] for e in store.events(kind="training_interrupted")] == ["v0001"]


def test_a_due_retrain_takes_the_turn_before_more_collection(tmp_path, monkeypatch):
    """On the real model the 1-second collect job won every turn and the daemon never trained:
    collect_job must step aside while the retrain trigger is met."""
    from loop import daemon
    from loop.round import RoundSummary, Runtime
    from store import ExampleRow

    from environments.pack import load_pack
    from loop.records import register_packs

    pack = load_pack(ROOT / "tests" / "data" / "acme")
    db = tmp_path / "a.db"
    store = Store.open(db)
    register_packs(store, [pack])
    store.add_examples([ExampleRow(source="demonstration", company_id=pack.id, ticket_id=pack.tickets[i].id,
                                   messages=[{"role": "user", "content": f"hi {i}"}], has_escalation=False) for i in range(3)])
    collected = []
    def collect(rt, round_no):
        collected.append(round_no)
        return RoundSummary(round_no, "base", seconds={"collect": 0.0})

    monkeypatch.setattr(daemon, "collect", collect)
    rt = Runtime(store=store, packs=[], student=None, teacher=None, train=None, model_dir=tmp_path, base_model="tiny",
                 adapters_dir=tmp_path, settings=None, lora=None)
    daemon.Daemon(rt, db, daemon.Triggers(retrain_min_examples=3)).collect_job()
    assert collected == []  # 3 new examples meet the trigger: retrain goes first
    daemon.Daemon(rt, db, daemon.Triggers(retrain_min_examples=4)).collect_job()
    assert collected == [1]


def test_the_inbox_ingests_each_file_once_even_when_stopped_before_the_move(tmp_path, monkeypatch):
    """A stop between a file's ingest transaction and its move to done/ leaves it in the inbox; the
    next scan recognizes it by its digest and only moves it. A later file of the same name keeps both."""
    from environments.pack import load_pack
    from loop import daemon
    from loop.records import register_packs
    from loop.round import Runtime
    from policies.teacher import OracleTeacher
    from tests.test_ingest import openai_line

    pack = load_pack(ROOT / "tests" / "data" / "acme")
    db, inbox = tmp_path / "a.db", tmp_path / "inbox"
    inbox.mkdir()
    store = Store.open(db)
    register_packs(store, [pack])
    rt = Runtime(store=store, packs=[pack], student=None, teacher=OracleTeacher(), train=None, model_dir=tmp_path, base_model="tiny",
                 adapters_dir=tmp_path, settings=None, lora=None)
    job = daemon.Daemon(rt, db, daemon.Triggers(inbox=inbox))
    (inbox / "a.jsonl").write_text(openai_line("i1") + "\n" + openai_line("i2") + "\n")

    def killed(path):
        raise SystemExit("killed before the move")

    monkeypatch.setattr(daemon, "_move_to_done", killed)
    with pytest.raises(SystemExit):
        job.inbox_job()
    assert store.count("traces") == 2 and (inbox / "a.jsonl").exists()
    monkeypatch.undo()
    job.inbox_job()  # the restart's first scan
    assert not (inbox / "a.jsonl").exists() and (inbox / "done" / "a.jsonl").exists()
    assert [e.payload["accepted"] for e in store.events(kind="ingested")] == [2]  # ingested once
    (inbox / "a.jsonl").write_text(openai_line("i3") + "\n")  # a new export under the same name
    job.inbox_job()
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["a.2.jsonl", "a.jsonl"] and store.count("traces") == 3


@pytest.mark.slow
def test_a_rollout_actor_that_dies_is_replaced_on_the_base_model(tiny_model_dir):
    """Ray's memory monitor kills actors when a neighbour eats the RAM (seen on this machine): the call
    that hit the dead actor fails, and the pool comes back with fresh actors on the base model, so
    the next unit's load_adapter swaps and verifies again instead of sampling a stale adapter."""
    from loop.workers import RayStudentPool, StudentOptions, start_ray  # first: it states Ray's auth mode before Ray reads it

    import ray
    from policies.protocol import render_messages
    from environments.episode import Entry
    from environments.pack import load_pack

    start_ray()
    try:
        pool = RayStudentPool(tiny_model_dir, StudentOptions(max_new_tokens=4), n=1, threads=1)
        prompt = render_messages(load_pack(ROOT / "tests" / "data" / "acme").company, [Entry("customer", "hi")])
        first = pool.act([prompt])
        pool.adapter_id = "v0007"  # as if an adapter had been swapped in
        ray.kill(pool._workers[0])
        with pytest.raises(ray.exceptions.RayActorError):
            pool.act([prompt])
        assert pool.adapter_id is None and pool.act([prompt]) == first  # a fresh actor, on the base model
    finally:
        ray.shutdown()


def test_rollout_actors_share_the_machines_cores():
    from loop.workers import _threads

    cores = os.cpu_count() or 1
    assert _threads(0, 1) == cores and _threads(0, 2) == max(1, cores // 2) and _threads(0, 4 * cores) == 1
    assert _threads(3, 2) == 3  # set in the config: per actor, as written


@pytest.mark.slow
def test_two_rollout_actors_answer_in_order_like_one(tiny_model_dir):
    """A pool splits each call across its actors and puts the answers back in the prompts' order, the
    machine's cores shared among the actors a call uses."""
    from loop.workers import RayStudentPool, StudentOptions, start_ray

    import ray
    import torch
    from policies.protocol import render_messages
    from environments.episode import Entry
    from environments.pack import load_pack

    cores = os.cpu_count() or 1
    company = load_pack(ROOT / "tests" / "data" / "acme").company
    prompts = [render_messages(company, [Entry("customer", text)]) for text in ("hi", "refund please", "where is my order", "bye", "help")]
    start_ray()
    try:
        one = RayStudentPool(tiny_model_dir, StudentOptions(max_new_tokens=6), n=1, threads=1)
        two = RayStudentPool(tiny_model_dir, StudentOptions(max_new_tokens=6), n=2)
        assert len(two._workers) == 2 and two.act(prompts) == one.act(prompts)
        threads = lambda: ray.get([w.__ray_call__.remote(lambda _: torch.get_num_threads()) for w in two._workers])
        assert threads() == [max(1, cores // 2)] * 2  # a call over both actors shares the cores
        assert two.act(prompts[:1]) == one.act(prompts[:1])
        assert threads()[0] == cores  # a call with one prompt gets every core on the actor it uses
    finally:
        ray.shutdown()


def test_recovery_fails_adapters_cut_short_in_training_or_in_evaluation(tmp_path):
    """bench/chaos.py found a SIGKILL during evaluation left the adapter `candidate` for good: never
    gated, never redone. A restart now fails both kinds, and the retrain trigger counts their
    examples as new again."""
    from loop import daemon
    from loop.round import examples_since_training
    from store import AdapterRow, ExampleRow

    store = Store.open(tmp_path / "a.db")
    from environments.pack import load_pack
    from loop.records import register_packs

    register_packs(store, [load_pack(ROOT / "tests" / "data" / "acme")])
    store.add_examples([ExampleRow(source="demonstration", company_id="acme-widgets", messages=[{"role": "user", "content": "x"}],
                                   has_escalation=False)])
    for version, status in (("v0001", "rejected_by_gate"), ("v0002", "candidate"), ("v0003", "training")):
        store.add_adapter(AdapterRow(version=version, parent=None, path=str(tmp_path / version), base_model="tiny", status=status,
                                     config={"examples_through": 1 if version != "v0001" else 0}))
    assert examples_since_training(store) == 0  # v0003 is not counted, but v0002 (never gated) hides the example
    assert daemon.recover(store) == ["v0003", "v0002"]
    assert {a.version: a.status for a in store.adapters()} == {"v0001": "rejected_by_gate", "v0002": "failed", "v0003": "failed"}
    assert [e.kind for e in store.events()][-2:] == ["training_interrupted", "evaluation_interrupted"]
    assert examples_since_training(store) == 1  # redone by the trigger
