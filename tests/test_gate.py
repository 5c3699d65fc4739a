"""The gate on constructed paired results."""

from loop.gate import gate
from loop.metrics import TicketOutcome

N = 100  # 50 should-escalate tickets, 50 should-not


def outcomes(escalate_should, escalate_not, *, valid_every=None):
    rows = []
    for i in range(N):
        should = i < N // 2
        escalated = (i < escalate_should) if should else (i - N // 2 < escalate_not)
        n_valid = 1 if valid_every is None or i % valid_every else 0
        rows.append(TicketOutcome("c", f"t{i}", should, escalated, should and escalated, True, True, True, 1, 1, n_valid))
    return rows


BASE = outcomes(escalate_should=30, escalate_not=10)  # recall 0.6, over 0.2, J 0.4


def test_j_rises_passes():
    result = gate(outcomes(45, 5), BASE)
    assert result.passed, result.reason
    assert result.comparison.delta["calibration_j"].low > 0


def test_recall_drop_fails_even_when_j_rises():
    result = gate(outcomes(escalate_should=27, escalate_not=0), BASE)  # recall -0.06, over -0.2: J +0.14
    assert result.comparison.delta["calibration_j"].value > 0
    assert not result.passed and "escalation recall drops" in result.reason


def test_low_valid_json_fails():
    result = gate(outcomes(45, 5, valid_every=20), BASE)  # 95% valid
    assert not result.passed and "valid-JSON 0.950" in result.reason


def test_no_change_fails():
    result = gate(BASE, BASE)
    assert not result.passed and "ΔJ" in result.reason
