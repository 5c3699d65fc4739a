"""Opening the SQLite file and the one way to write to it: an immediate transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database

BUSY_TIMEOUT_S = 30.0


def connect(path: str | Path) -> Database:
    """A `Database` with WAL, a busy timeout and foreign keys on (":memory:" allowed, no WAL there).

    The connection belongs to the thread that opened it: open one per thread or process; WAL lets
    them read while one writes.
    """
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    # Plugins could register arbitrary hooks on our connection; we need none.
    db = Database(conn, execute_plugins=False)
    db.execute("PRAGMA foreign_keys = ON")
    if str(path) != ":memory:":
        db.enable_wal()
        # NORMAL is durable in WAL mode except against power loss; a killed process loses nothing
        # it committed.
        db.execute("PRAGMA synchronous = NORMAL")
    return db


@contextmanager
def transaction(db: Database) -> Iterator[None]:
    """All or nothing: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception.

    IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so two processes
    never deadlock upgrading read locks. Nested use becomes a savepoint inside the outer one.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.conn.execute("COMMIT")
    except BaseException:
        db.rollback()  # a no-op if the error already ended the transaction
        raise
