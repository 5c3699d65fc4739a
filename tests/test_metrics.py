import math

from loop.metrics import TicketOutcome, compare, report


def outcome(i, should, escalated, *, reason_ok=True, company="c", valid=2, steps=2):
    return TicketOutcome(company, f"t{i}", should, escalated, should and escalated, reason_ok, True, True, steps, steps, valid)


def test_metric_definitions():
    rows = [outcome(0, True, True), outcome(1, True, False), outcome(2, False, True), outcome(3, False, False),
            outcome(4, False, False), outcome(5, True, True, reason_ok=False, valid=1)]
    m = report(rows).metrics
    assert math.isclose(m["escalation_recall"].value, 2 / 3)
    assert math.isclose(m["over_escalation_rate"].value, 1 / 3)
    assert math.isclose(m["calibration_j"].value, 1 / 3)
    assert math.isclose(m["reason_accuracy"].value, 1 / 2)
    assert math.isclose(m["valid_json_rate"].value, 11 / 12)
    assert m["escalation_recall"].low <= m["escalation_recall"].value <= m["escalation_recall"].high


def test_reason_accuracy_is_nan_without_correct_escalations():
    m = report([outcome(0, False, False), outcome(1, True, False)]).metrics
    assert math.isnan(m["reason_accuracy"].value)


def test_paired_delta_interval():
    base = [outcome(i, i % 2 == 0, False) for i in range(40)]
    better = [outcome(i, i % 2 == 0, i % 2 == 0) for i in range(40)]
    d = compare(better, base).delta["calibration_j"]
    assert d.value == 1.0 and d.low > 0
    same = compare(base, base).delta["calibration_j"]
    assert same.value == 0 and same.low == 0 and same.high == 0


def test_per_company_reports():
    rows = [outcome(i, i % 2 == 0, True, company=c) for c in ("a", "b") for i in range(4)]
    rep = report(rows)
    assert set(rep.per_company) == {"a", "b"} and rep.per_company["a"].n_tickets == 4
    js = rep.as_json()
    assert set(js) >= {"escalation_recall", "escalation_recall_ci", "n_tickets", "calibration_j_ci"}
