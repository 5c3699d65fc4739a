"""Approve / reject / rollback, their refusals, and the audit rows they leave."""

import pytest
from click.testing import CliRunner

from loop.gate import gate
from loop.promotion import DecisionRefused, approve, record_gate, reject, rollback
from ops.cli import main
from store import AdapterRow, Store


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "a.db")
    for v, status in (("v0001", "awaiting_approval"), ("v0002", "awaiting_approval"), ("v0003", "rejected_by_gate"), ("v0004", "training")):
        s.add_adapter(AdapterRow(version=v, parent=None, path=f"adapters/{v}", base_model="m", status=status, gate_reason="ΔJ too small"))
    return s


def actions(store):
    return [(d.adapter_version, d.action, d.by) for d in store.decisions()]


def test_approve_then_rollback_to_base(store):
    approve(store, "v0001", by="ana", note="looks good")
    assert store.promoted_version() == "v0001" and store.adapter("v0001").status == "promoted"
    approve(store, "v0002", by="ana")
    assert store.adapter("v0001").status == "retired"
    assert rollback(store, None, by="bo", note="v0002 over-escalates") == "v0001"
    assert store.promoted_version() == "v0001" and store.adapter("v0002").status == "retired"
    assert rollback(store, None, by="bo", note="back to base") is None
    assert store.promoted_version() is None
    assert actions(store) == [("v0001", "approve", "ana"), ("v0002", "approve", "ana"), ("v0001", "rollback", "bo"), (None, "rollback", "bo")]


@pytest.mark.parametrize("call,message", [
    (lambda s: approve(s, "v0009", by="a"), "no adapter 'v0009'"),
    (lambda s: approve(s, "v0003", by="a"), "approve it anyway with --force"),
    (lambda s: approve(s, "v0003", by="a", force=True), "--force needs a --note"),
    (lambda s: approve(s, "v0004", by="a"), "has not been through the gate"),
    (lambda s: reject(s, "v0001", by="a", note=""), "needs a --note"),
    (lambda s: rollback(s, None, by="a", note="x"), "nothing is promoted"),
])
def test_refusals_leave_no_decision(store, call, message):
    with pytest.raises(DecisionRefused, match=message):
        call(store)
    assert store.decisions() == [] and store.promoted_version() is None


def test_approving_twice_and_rejecting_the_promoted_are_refused(store):
    approve(store, "v0001", by="a")
    with pytest.raises(DecisionRefused, match="already promoted"):
        approve(store, "v0001", by="a")
    with pytest.raises(DecisionRefused, match="use `apprentice rollback`"):
        reject(store, "v0001", by="a", note="no")
    assert len(store.decisions()) == 1


def test_forced_approval_and_rejection_are_logged(store):
    approve(store, "v0003", by="ana", note="gate too strict on a small set", force=True)
    reject(store, "v0002", by="bo", note="tone")
    assert store.adapter("v0002").status == "rejected"
    assert actions(store) == [("v0003", "approve_forced", "ana"), ("v0002", "reject", "bo")]


@pytest.mark.parametrize("auto_approve", [False, True])
def test_the_gate_verdict_decides_the_status(store, auto_approve):
    from tests.test_gate import BASE, outcomes

    for v in ("v0005", "v0006"):
        store.add_adapter(AdapterRow(version=v, parent=None, path=f"adapters/{v}", base_model="m", status="candidate"))
    passed, failed = gate(outcomes(45, 5), BASE), gate(BASE, BASE)
    assert record_gate(store, "v0005", passed, baseline="base", metrics={"J": 0.8}, auto_approve=auto_approve) == (
        "promoted" if auto_approve else "awaiting_approval")
    assert record_gate(store, "v0006", failed, baseline="base", metrics={"J": 0.4}, auto_approve=auto_approve) == "rejected_by_gate"
    assert store.adapter("v0006").status == "rejected_by_gate" and "ΔJ" in store.adapter("v0006").gate_reason
    assert store.adapter("v0005").metrics == {"J": 0.8}
    if auto_approve:  # the policy promotes what passed, and says so in the decisions log
        assert store.promoted_version() == "v0005" and store.adapter("v0005").status == "promoted"
        assert actions(store) == [("v0005", "gate", "gate"), ("v0005", "approve", "auto-approve"), ("v0006", "gate", "gate")]
    else:  # it waits for an operator
        assert store.promoted_version() is None and store.adapter("v0005").status == "awaiting_approval"
        assert actions(store) == [("v0005", "gate", "gate"), ("v0006", "gate", "gate")]


def test_cli_refusal_exits_1_with_the_reason(store, tmp_path):
    db = str(tmp_path / "a.db")
    ok = CliRunner().invoke(main, ["approve", "v0001", "--by", "ana", "--db", db])
    assert ok.exit_code == 0 and "v0001 promoted by ana" in ok.output
    again = CliRunner().invoke(main, ["approve", "v0001", "--by", "ana", "--db", db])
    assert again.exit_code == 1 and "refused: v0001 is already promoted" in again.output


def test_status_sees_the_lock_and_the_queue(store, tmp_path):
    from loop.daemon import AlreadyRunning, lock_store
    from loop.status import status

    db = tmp_path / "a.db"
    st = status(store, db)
    assert not st.daemon_alive and st.promoted == "base" and st.awaiting_approval == ["v0001", "v0002"]
    handle = lock_store(db)
    try:
        assert status(store, db).daemon_alive and f"pid {__import__('os').getpid()}" in status(store, db).daemon
        with pytest.raises(AlreadyRunning, match="another apprentice run is using"):
            lock_store(db)
    finally:
        handle.close()
    assert not status(store, db).daemon_alive


def test_collecting_adapter_promoted_or_newest(store):
    from loop.round import collecting_adapter

    assert collecting_adapter(store, "promoted") is None  # nothing promoted: the base model
    assert collecting_adapter(store, "newest") == "v0003"  # the gate refused it, but it is the learner's latest
    approve(store, "v0001", by="ana")
    assert collecting_adapter(store, "promoted") == "v0001"
    reject(store, "v0003", by="ana", note="do not roll this out")
    assert collecting_adapter(store, "newest") == "v0002"
