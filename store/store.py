"""The store: typed reads and writes over one SQLite file.

    store = Store.open("apprentice.db")   # creates the file and applies migrations
    episode_id = store.add_episode(episode, steps)

Every write method runs in one transaction (all rows or none); call several inside
`with store.transaction():` to make them one. Nothing here deletes rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from store.db import connect, transaction
from store.migrations import migrate
from store.rows import (
    AdapterRow,
    AdapterStatus,
    CompanyRow,
    CorrectionRow,
    CorrectionStatus,
    DecisionRow,
    EpisodeRow,
    EvaluationRow,
    EventRow,
    ExampleRow,
    ExampleSource,
    Row,
    Split,
    StepRow,
    TicketRow,
    TraceRow,
    from_record,
    to_record,
    utc_now,
)

PROMOTED_KEY = "promoted_version"


class Store:
    def __init__(self, db: Database):
        self.db = db

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (or create) the database at `path` (":memory:" allowed) and bring its schema up to date."""
        db = connect(path)
        migrate(db)
        return cls(db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK if the block raises. Nests as a savepoint."""
        with transaction(self.db):
            yield

    def count(self, table: str) -> int:
        if table not in self.db.table_names():
            raise ValueError(f"no table {table!r}")
        return self.db[table].count

    # -- companies and tickets ---------------------------------------------------------------

    def upsert_companies(self, rows: Iterable[CompanyRow]) -> None:
        with self.transaction():
            self.db["companies"].upsert_all([to_record(r) for r in rows], pk="id")

    def companies(self, *, split: Split | None = None) -> list[CompanyRow]:
        return self._select(CompanyRow, "companies", "id", split=split)

    def upsert_tickets(self, rows: Iterable[TicketRow]) -> None:
        with self.transaction():
            self.db["tickets"].upsert_all([to_record(r) for r in rows], pk=("company_id", "id"))

    def tickets(self, company_id: str) -> list[TicketRow]:
        return self._select(TicketRow, "tickets", "id", company_id=company_id)

    # -- episodes, steps, corrections ----------------------------------------------------------

    def add_episode(self, episode: EpisodeRow, steps: list[StepRow]) -> int:
        """Store an episode and all its steps; returns the episode id."""
        episode = dataclasses.replace(episode, n_steps=len(steps), n_valid=sum(s.valid for s in steps))
        with self.transaction():
            episode_id = self.db["episodes"].insert(to_record(episode)).last_rowid
            records = [to_record(dataclasses.replace(s, episode_id=episode_id)) for s in steps]
            self.db["steps"].insert_all(records)
        return episode_id

    def episode(self, episode_id: int) -> EpisodeRow | None:
        rows = self._select(EpisodeRow, "episodes", "id", id=episode_id)
        return rows[0] if rows else None

    def episodes(
        self,
        *,
        run_kind: str | None = None,
        policy: str | None = None,
        adapter_version: str | None = None,
        company_id: str | None = None,
        ticket_id: str | None = None,
        trace_id: str | None = None,
        round: int | None = None,
    ) -> list[EpisodeRow]:
        """Episodes in insertion order; each given filter must match (None: any)."""
        return self._select(
            EpisodeRow, "episodes", "id", run_kind=run_kind, policy=policy,
            adapter_version=adapter_version, company_id=company_id, ticket_id=ticket_id,
            trace_id=trace_id, round=round,
        )  # fmt: skip

    def steps(self, episode_id: int) -> list[StepRow]:
        return self._select(StepRow, "steps", "idx", episode_id=episode_id)

    def add_correction(self, row: CorrectionRow) -> int:
        with self.transaction():
            return self.db["corrections"].insert(to_record(row)).last_rowid

    def corrections(
        self,
        *,
        episode_id: int | None = None,
        status: CorrectionStatus | None = None,
        round: int | None = None,
    ) -> list[CorrectionRow]:
        return self._select(CorrectionRow, "corrections", "id", episode_id=episode_id, status=status, round=round)

    def set_correction_status(self, correction_id: int, status: CorrectionStatus) -> None:
        """E.g. an operator accepting an unverified ('review') production correction."""
        with self.transaction():
            self._update("corrections", correction_id, status=status)

    # -- training examples ---------------------------------------------------------------------

    def add_examples(self, rows: Iterable[ExampleRow]) -> int:
        """Store the examples not seen before (same messages = same example); returns how many were new."""
        records = [{**to_record(r), "content_hash": r.content_hash} for r in rows]
        with self.transaction():
            before = self.db["examples"].count
            # ON CONFLICT(content_hash), not INSERT OR IGNORE: that would also drop bad rows silently.
            for record in records:
                columns = ", ".join(f"[{c}]" for c in record)
                self.db.execute(
                    f"INSERT INTO examples ({columns}) VALUES ({', '.join('?' * len(record))})"
                    " ON CONFLICT(content_hash) DO NOTHING",
                    list(record.values()),
                )
            return self.db["examples"].count - before

    def examples(
        self, *, exclude_companies: Iterable[str] = (), source: ExampleSource | None = None
    ) -> list[ExampleRow]:
        """All examples so far, oldest first (the dataset is the aggregate, never one round)."""
        excluded = list(exclude_companies)
        where = [f"company_id NOT IN ({', '.join('?' * len(excluded))})"] if excluded else []
        args: list[Any] = list(excluded)
        if source is not None:
            where.append("source = ?")
            args.append(source)
        records = self.db["examples"].rows_where(" AND ".join(where) or None, args, order_by="id")
        return [from_record(ExampleRow, r) for r in records]

    # -- production traces ---------------------------------------------------------------------

    def add_trace(self, row: TraceRow) -> bool:
        """Store a trace version; False (and nothing changes) if its key `id` is already stored."""
        row = row if row.trace_id is not None else dataclasses.replace(row, trace_id=row.id)
        with self.transaction():
            if self.db["traces"].count_where("id = ?", [row.id]):
                return False
            self.db["traces"].insert(to_record(row))
            return True

    def trace_versions(self, trace_id: str) -> list[TraceRow]:
        """Every stored version of one trace id, oldest first."""
        return self._select(TraceRow, "traces", "created_at, id", trace_id=trace_id)

    def set_trace_status(self, trace_id: str, status: str, *, error: str | None = None, failure_note: str | None = None) -> None:
        """New status (and error); a `failure_note`, when given, is recorded too."""
        note = {} if failure_note is None else {"failure_note": failure_note}
        with self.transaction():
            self._update("traces", trace_id, status=status, error=error, updated_at=utc_now(), **note)

    def trace(self, trace_id: str) -> TraceRow | None:
        rows = self._select(TraceRow, "traces", "id", id=trace_id)
        return rows[0] if rows else None

    def traces(self, *, status: str | None = None) -> list[TraceRow]:
        return self._select(TraceRow, "traces", "created_at, id", status=status)

    # -- adapters, evaluations, decisions ------------------------------------------------------

    def next_adapter_version(self) -> str:
        """'v0001', 'v0002', ...: one past the highest version stored."""
        versions = [v for (v,) in self.db.execute("SELECT version FROM adapters")]
        numbers = [int(m[1]) for v in versions if (m := re.fullmatch(r"v(\d+)", v))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def add_adapter(self, row: AdapterRow) -> None:
        with self.transaction():
            self.db["adapters"].insert(to_record(row))

    def set_adapter_status(
        self,
        version: str,
        status: AdapterStatus,
        *,
        metrics: dict[str, Any] | None = None,
        train_metrics: dict[str, Any] | None = None,
        gate_reason: str | None = None,
    ) -> AdapterRow:
        """Move an adapter to `status`, storing the given fields with it; returns the updated row.

        Promotion goes through `set_promoted`, which also moves the pointer.
        """
        with self.transaction():
            current = self.adapter(version)
            if current is None:
                raise KeyError(f"no adapter {version!r}")
            updated = dataclasses.replace(
                current,
                status=status,
                metrics=current.metrics if metrics is None else metrics,
                train_metrics=current.train_metrics if train_metrics is None else train_metrics,
                gate_reason=current.gate_reason if gate_reason is None else gate_reason,
                updated_at=utc_now(),
            )
            self.db["adapters"].update(version, to_record(updated))
        return updated

    def adapter(self, version: str) -> AdapterRow | None:
        rows = self._select(AdapterRow, "adapters", "version", version=version)
        return rows[0] if rows else None

    def adapters(self, *, status: AdapterStatus | None = None) -> list[AdapterRow]:
        return self._select(AdapterRow, "adapters", "version", status=status)

    def add_evaluations(self, rows: Iterable[EvaluationRow]) -> None:
        """Store per-ticket results; re-evaluating an (adapter, ticket) pair replaces its row."""
        with self.transaction():
            self.db["evaluations"].upsert_all(
                [to_record(r) for r in rows], pk=("adapter_version", "company_id", "ticket_id")
            )

    def evaluations(self, adapter_version: str) -> list[EvaluationRow]:
        """One adapter's results, ordered by (company, ticket) so two adapters' lists pair up."""
        return self._select(EvaluationRow, "evaluations", "company_id, ticket_id", adapter_version=adapter_version)

    def add_decision(self, row: DecisionRow) -> int:
        with self.transaction():
            return self.db["decisions"].insert(to_record(row)).last_rowid

    def decisions(self, *, adapter_version: str | None = None) -> list[DecisionRow]:
        return self._select(DecisionRow, "decisions", "id", adapter_version=adapter_version)

    def promoted_version(self) -> str | None:
        """The adapter rollouts should use; None: the base model."""
        return self.meta(PROMOTED_KEY)

    def set_promoted(self, version: str | None, *, by: str, note: str, action: str = "approve") -> None:
        """Point rollouts at `version` (None: the base model), atomically with its consequences.

        The adapter becomes 'promoted', whichever was promoted before becomes 'retired', and a
        decision row records who did it and why (`action`: 'approve', 'rollback', ...).
        """
        with self.transaction():
            if version is not None and self.adapter(version) is None:
                raise KeyError(f"no adapter {version!r}")
            previous = self.promoted_version()
            now = utc_now()
            self.db.execute(
                "UPDATE adapters SET status = 'retired', updated_at = ? WHERE status = 'promoted' AND version IS NOT ?",
                [now, version],
            )
            if version is not None:
                self._update("adapters", version, status="promoted", updated_at=now)
            self.set_meta(PROMOTED_KEY, version)
            self.add_decision(DecisionRow(adapter_version=version, action=action, by=by, note=note, created_at=now))
            self.log_event("promoted", version=version, previous=previous, by=by)

    # -- events and meta -----------------------------------------------------------------------

    def log_event(self, kind: str, **payload: Any) -> int:
        with self.transaction():
            return self.db["events"].insert(to_record(EventRow(kind=kind, payload=payload))).last_rowid

    def events(self, *, kind: str | None = None) -> list[EventRow]:
        return self._select(EventRow, "events", "id", kind=kind)

    def meta(self, key: str) -> str | None:
        rows = list(self.db["meta"].rows_where("key = ?", [key]))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction():
            self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    # -- helpers -------------------------------------------------------------------------------

    def _select(self, cls: type[Row], table: str, order_by: str, **filters: Any) -> list[Row]:
        """Rows of `table` whose columns equal the non-None `filters` (names from code, never input)."""
        given = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"[{column}] = ?" for column in given) or None
        records = self.db[table].rows_where(where, list(given.values()), order_by=order_by)
        return [from_record(cls, r) for r in records]

    def _update(self, table: str, pk: Any, **values: Any) -> None:
        try:
            self.db[table].update(pk, values)
        except NotFoundError:
            raise KeyError(f"no {table} row {pk!r}") from None
