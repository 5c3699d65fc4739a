"""Schema changes: ordered, named migrations, each recorded in `_migrations` once applied.

To change the schema, append a function to MIGRATIONS; never edit one that has shipped.
Each migration and its record commit together, so a crash leaves it either applied or not.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlite_utils import Database

from store.db import transaction
from store.rows import utc_now


def m001_initial(db: Database) -> None:
    statements = [
        """CREATE TABLE companies (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            domain TEXT NOT NULL,
            split TEXT NOT NULL
        )""",
        """CREATE TABLE tickets (
            company_id TEXT NOT NULL REFERENCES companies(id),
            id TEXT NOT NULL,
            opening TEXT NOT NULL,
            truth TEXT NOT NULL,
            PRIMARY KEY (company_id, id)
        )""",
        """CREATE TABLE traces (
            id TEXT PRIMARY KEY,
            company_id TEXT,
            format TEXT NOT NULL,
            raw TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            failure_note TEXT,
            source_file TEXT NOT NULL,
            line_no INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE episodes (
            id INTEGER PRIMARY KEY,
            run_kind TEXT NOT NULL,
            policy TEXT NOT NULL,
            adapter_version TEXT,
            company_id TEXT NOT NULL REFERENCES companies(id),
            ticket_id TEXT,
            trace_id TEXT REFERENCES traces(id),
            round INTEGER,
            outcome TEXT NOT NULL,
            resolved INTEGER,
            escalated INTEGER NOT NULL,
            escalation_reason TEXT,
            should_escalate INTEGER,
            n_steps INTEGER NOT NULL,
            n_valid INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            FOREIGN KEY (company_id, ticket_id) REFERENCES tickets(company_id, id)
        )""",
        "CREATE INDEX episodes_run ON episodes(run_kind, round)",
        "CREATE INDEX episodes_ticket ON episodes(company_id, ticket_id)",
        """CREATE TABLE steps (
            episode_id INTEGER NOT NULL REFERENCES episodes(id),
            idx INTEGER NOT NULL,
            actor TEXT NOT NULL,
            raw TEXT NOT NULL,
            action TEXT,
            valid INTEGER NOT NULL,
            acceptable INTEGER,
            verdict TEXT NOT NULL,
            observation TEXT NOT NULL,
            PRIMARY KEY (episode_id, idx)
        )""",
        """CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            episode_id INTEGER NOT NULL REFERENCES episodes(id),
            step_idx INTEGER NOT NULL,
            student_raw TEXT NOT NULL,
            student_action TEXT,
            teacher TEXT NOT NULL,
            teacher_action TEXT NOT NULL,
            rationale TEXT NOT NULL,
            verified INTEGER NOT NULL,
            status TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            round INTEGER,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX corrections_episode ON corrections(episode_id)",
        """CREATE TABLE examples (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            company_id TEXT NOT NULL REFERENCES companies(id),
            ticket_id TEXT,
            episode_id INTEGER REFERENCES episodes(id),
            correction_id INTEGER REFERENCES corrections(id),
            messages TEXT NOT NULL,
            content_hash TEXT NOT NULL UNIQUE,
            has_escalation INTEGER NOT NULL,
            weight REAL NOT NULL,
            round INTEGER,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX examples_company ON examples(company_id)",
        """CREATE TABLE adapters (
            version TEXT PRIMARY KEY,
            parent TEXT REFERENCES adapters(version),
            path TEXT NOT NULL,
            base_model TEXT NOT NULL,
            status TEXT NOT NULL,
            data_hash TEXT NOT NULL,
            config TEXT NOT NULL,
            train_metrics TEXT NOT NULL,
            metrics TEXT NOT NULL,
            gate_reason TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        # adapter_version is not a foreign key: 'base' (the base model) is evaluated too.
        """CREATE TABLE evaluations (
            adapter_version TEXT NOT NULL,
            company_id TEXT NOT NULL,
            ticket_id TEXT NOT NULL,
            episode_id INTEGER NOT NULL REFERENCES episodes(id),
            escalated INTEGER NOT NULL,
            should_escalate INTEGER NOT NULL,
            reason_correct INTEGER,
            first_action_ok INTEGER NOT NULL,
            resolved INTEGER NOT NULL,
            n_steps INTEGER NOT NULL,
            n_acceptable INTEGER NOT NULL,
            n_outputs INTEGER NOT NULL,
            n_valid INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (adapter_version, company_id, ticket_id),
            FOREIGN KEY (company_id, ticket_id) REFERENCES tickets(company_id, id)
        )""",
        """CREATE TABLE decisions (
            id INTEGER PRIMARY KEY,
            adapter_version TEXT,
            action TEXT NOT NULL,
            "by" TEXT NOT NULL,
            note TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX events_kind ON events(kind)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
    ]
    for sql in statements:
        db.execute(sql)


def m002_trace_versions(db: Database) -> None:
    """A trace id may have several stored versions (a rejected line and its fix, a conflicting
    reuse of the id): `traces.id` becomes the key of one version, `trace_id` the id they share."""
    db.execute("ALTER TABLE traces ADD COLUMN trace_id TEXT")
    db.execute("UPDATE traces SET trace_id = id")
    db.execute("CREATE INDEX traces_trace_id ON traces(trace_id)")


def m003_escalation_scores(db: Database) -> None:
    """p(escalate) per step with its label (escalating was acceptable there), and each evaluated
    ticket's scored decision states, so calibration compares paired across versions."""
    db.execute("ALTER TABLE steps ADD COLUMN p_escalate REAL")
    db.execute("ALTER TABLE steps ADD COLUMN escalation_ok INTEGER")
    db.execute("ALTER TABLE evaluations ADD COLUMN scores TEXT")


MIGRATIONS: list[Callable[[Database], None]] = [
    m001_initial,
    m002_trace_versions,
    m003_escalation_scores,
]


def migrate(db: Database) -> list[str]:
    """Apply the migrations not yet recorded, in order; returns the names applied now."""
    if "_migrations" not in db.table_names():
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    # Read without the write lock first, so opening an up-to-date file never waits for a writer.
    done = {row["name"] for row in db["_migrations"].rows}
    applied = []
    for migration in [m for m in MIGRATIONS if m.__name__ not in done]:
        # Checked again under the write lock: two processes opening a fresh file apply it once.
        with transaction(db):
            if db["_migrations"].count_where("name = ?", [migration.__name__]):
                continue
            migration(db)
            db["_migrations"].insert({"name": migration.__name__, "applied_at": utc_now()})
        applied.append(migration.__name__)
    return applied
