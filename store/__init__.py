"""SQLite store: schema, migrations, typed rows, and the read/write functions the loop uses.

A leaf package: it imports nothing else of the project.
"""

from store.migrations import MIGRATIONS, migrate
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
    Split,
    StepRow,
    TicketRow,
    TraceRow,
    utc_now,
)
from store.store import Store

__all__ = [
    "MIGRATIONS",
    "AdapterRow",
    "AdapterStatus",
    "CompanyRow",
    "CorrectionRow",
    "CorrectionStatus",
    "DecisionRow",
    "EpisodeRow",
    "EvaluationRow",
    "EventRow",
    "ExampleRow",
    "ExampleSource",
    "Split",
    "StepRow",
    "Store",
    "TicketRow",
    "TraceRow",
    "migrate",
    "utc_now",
]
