"""The gate's verdict and the operators' decisions: approve, reject, roll back. Each writes the
decisions log; an operator's refuses what makes no sense with a message that says why and what to
do instead."""

from __future__ import annotations

import structlog

from loop.gate import GateResult
from store import DecisionRow, Store

log = structlog.get_logger("apprentice.operators")


class DecisionRefused(ValueError):
    pass


def _adapter(store: Store, version: str):
    adapter = store.adapter(version)
    if adapter is None:
        known = ", ".join(a.version for a in store.adapters()) or "none yet"
        raise DecisionRefused(f"no adapter {version!r} (known: {known})")
    return adapter


def record_gate(store: Store, version: str, verdict: GateResult, *, baseline: str, metrics: dict, auto_approve: bool) -> str:
    """Store a candidate's verdict: `awaiting_approval` if it passed (promoted at once under the
    auto-approve policy), else `rejected_by_gate`; one `gate` decision row. Returns the outcome."""
    status = "awaiting_approval" if verdict.passed else "rejected_by_gate"
    outcome = "promoted" if verdict.passed and auto_approve else status
    with store.transaction():
        store.set_adapter_status(version, status, metrics=metrics, gate_reason=verdict.reason)
        store.add_decision(DecisionRow(adapter_version=version, action="gate", by="gate", note=f"{outcome} vs {baseline}: {verdict.reason}"))
        if outcome == "promoted":
            store.set_promoted(version, by="auto-approve", note=verdict.reason)
        store.log_event("gate", version=version, outcome=outcome, reason=verdict.reason)
    return outcome


def approve(store: Store, version: str, *, by: str, note: str = "", force: bool = False) -> None:
    """Promote an adapter that passed the gate; one that failed it only with --force and a note."""
    adapter = _adapter(store, version)
    if adapter.status == "promoted":
        raise DecisionRefused(f"{version} is already promoted")
    if adapter.status in ("training", "failed", "candidate"):
        raise DecisionRefused(f"{version} is {adapter.status}: it has not been through the gate yet")
    if adapter.status in ("rejected_by_gate", "rejected", "retired") and not force:
        raise DecisionRefused(f"{version} is {adapter.status} ({adapter.gate_reason or 'see apprentice adapters show'}); "
                              "approve it anyway with --force and a --note saying why")
    if force and not note.strip():
        raise DecisionRefused("--force needs a --note saying why")
    store.set_promoted(version, by=by, note=note, action="approve" if not force else "approve_forced")
    log.info("decision", action="approve", version=version, by=by, forced=force, note=note)


def reject(store: Store, version: str, *, by: str, note: str) -> None:
    adapter = _adapter(store, version)
    if not note.strip():
        raise DecisionRefused("a rejection needs a --note saying why")
    if adapter.status == "promoted":
        raise DecisionRefused(f"{version} is promoted: use `apprentice rollback` to go back to an earlier version")
    if adapter.status == "rejected":
        raise DecisionRefused(f"{version} is already rejected")
    with store.transaction():
        store.set_adapter_status(version, "rejected")
        store.add_decision(DecisionRow(adapter_version=version, action="reject", by=by, note=note))
    log.info("decision", action="reject", version=version, by=by, note=note)


def rollback(store: Store, version: str | None, *, by: str, note: str) -> str | None:
    """Move the promoted pointer back: to `version` (a formerly promoted one), or by default to the
    version promoted before the current one (the base model if none). Returns where it points."""
    current = store.promoted_version()
    if current is None:
        raise DecisionRefused("nothing is promoted: the base model is already live")
    if not note.strip():
        raise DecisionRefused("a rollback needs a --note saying why")
    if version is None:
        history = _promotion_stack(store)
        version = history[-2] if len(history) >= 2 else None
    elif version == current:
        raise DecisionRefused(f"{version} is the promoted version already")
    elif _adapter(store, version).status != "retired":
        raise DecisionRefused(f"{version} was never promoted (it is {store.adapter(version).status}); approve it instead")
    store.set_promoted(version, by=by, note=note, action="rollback")
    log.info("decision", action="rollback", version=version, previous=current, by=by, note=note)
    return version


def _promotion_stack(store: Store) -> list[str | None]:
    """Versions promoted in turn, the base (None) at the bottom: an approval pushes, a rollback pops
    back down to its target."""
    stack: list[str | None] = [None]
    for d in store.decisions():
        if d.action in ("approve", "approve_forced"):
            stack.append(d.adapter_version)
        elif d.action == "rollback":
            while len(stack) > 1 and stack[-1] != d.adapter_version:
                stack.pop()
            if stack[-1] != d.adapter_version:
                stack.append(d.adapter_version)
    return stack
