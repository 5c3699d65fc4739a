"""The promotion gate: a candidate must measurably improve escalation calibration on the same
held-out tickets as the promoted adapter (or the base model), and regress on nothing that matters."""

from __future__ import annotations

from dataclasses import dataclass

from loop.metrics import Comparison, Report, TicketOutcome, compare, report


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    comparison: Comparison
    candidate: Report


def gate(candidate: list[TicketOutcome], baseline: list[TicketOutcome], *, min_valid_json: float = 0.99,
         max_regression: float = 0.02, seed: int = 0) -> GateResult:
    """Pass when ΔJ > 0 with its paired-bootstrap 95% interval above 0, escalation recall and
    over-escalation each no worse by more than `max_regression`, and valid-JSON ≥ `min_valid_json`."""
    comparison = compare(candidate, baseline, seed=seed)
    cand = report(candidate, seed=seed, by_company=False)
    d = comparison.delta
    failures = []
    if not d["calibration_j"].low > 0:
        failures.append(f"ΔJ {d['calibration_j']} does not lie above 0")
    if d["escalation_recall"].value < -max_regression:
        failures.append(f"escalation recall drops {-d['escalation_recall'].value:.3f} (> {max_regression})")
    if d["over_escalation_rate"].value > max_regression:
        failures.append(f"over-escalation rises {d['over_escalation_rate'].value:.3f} (> {max_regression})")
    valid = cand.metrics["valid_json_rate"].value
    if not valid >= min_valid_json:
        failures.append(f"valid-JSON {valid:.3f} < {min_valid_json}")
    ranking = f"ΔAUROC {d['escalation_auroc']}, ΔBrier {d['escalation_brier']}"
    if failures:
        return GateResult(False, "; ".join(failures) + f" ({ranking})", comparison, cand)
    return GateResult(True, f"ΔJ {d['calibration_j']} on {comparison.n_tickets} paired tickets ({ranking})", comparison, cand)
