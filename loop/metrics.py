"""Per-policy metrics over tickets, 95% bootstrap intervals, and the paired comparison.

The behaviour metrics are ratios of sums over tickets, so one bootstrap resample of tickets gives
every metric at once. The calibration metrics score the policy's p(escalate) at every decision
state against the checker's label (escalating was acceptable there): AUROC, Brier and ECE (10
equal-mass bins); a resample of tickets weights each ticket's states by how often it was drawn.
Paired comparisons resample the same tickets for both policies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from environments.episode import EpisodeResult

N_BOOTSTRAP = 1000
METRICS = (
    "escalation_recall",
    "over_escalation_rate",
    "reason_accuracy",
    "step_acceptability",
    "first_action_accuracy",
    "valid_json_rate",
    "resolution_rate",
    "calibration_j",
)
CALIBRATION = ("escalation_auroc", "escalation_brier", "escalation_ece")
ECE_BINS = 10


@dataclass(frozen=True)
class TicketOutcome:
    """What one episode on one ticket contributes to the metrics (also what the store keeps)."""

    company_id: str
    ticket_id: str
    should_escalate: bool
    escalated: bool
    correct_escalation: bool
    reason_correct: bool  # meaningful only when correct_escalation
    first_action_ok: bool
    resolved: bool
    n_steps: int
    n_acceptable: int
    n_valid: int
    scores: tuple[tuple[float, bool], ...] = ()  # (p(escalate), escalating was acceptable) at each scored state

    @classmethod
    def of(cls, r: EpisodeResult) -> TicketOutcome:
        return cls(
            r.company_id, r.ticket_id, r.should_escalate, r.escalated, r.correct_escalation, bool(r.reason_correct),
            r.first_action_ok, r.resolved, len(r.steps), r.n_acceptable, r.n_valid,
            tuple((s.p_escalate, s.escalation_ok) for s in r.steps if s.p_escalate is not None),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.company_id, self.ticket_id)


@dataclass(frozen=True)
class Estimate:
    value: float  # nan when the metric has no denominator (e.g. recall with no should-escalate ticket)
    low: float
    high: float

    def __str__(self) -> str:
        if np.isnan(self.value):
            return "n/a"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class Report:
    n_tickets: int
    metrics: dict[str, Estimate]
    per_company: dict[str, Report]

    def as_json(self) -> dict:
        out: dict = {"n_tickets": self.n_tickets}
        for name, est in self.metrics.items():
            out[name] = _num(est.value)
            out[f"{name}_ci"] = [_num(est.low), _num(est.high)]
        if self.per_company:
            out["per_company"] = {c: r.as_json() for c, r in self.per_company.items()}
        return out


@dataclass(frozen=True)
class Comparison:
    """Candidate minus baseline on the tickets both were evaluated on."""

    n_tickets: int
    delta: dict[str, Estimate]


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


def _columns(outcomes: list[TicketOutcome]) -> dict[str, np.ndarray]:
    cols = {f.name: np.array([getattr(o, f.name) for o in outcomes], dtype=float) for f in fields(TicketOutcome)
            if f.name not in ("company_id", "ticket_id", "scores")}
    cols["reason_ok"] = cols["reason_correct"] * cols["correct_escalation"]
    cols["not_should"] = 1.0 - cols["should_escalate"]
    cols["over"] = cols["escalated"] * cols["not_should"]
    cols["recalled"] = cols["escalated"] * cols["should_escalate"]
    cols["one"] = np.ones(len(outcomes))
    return cols


def _ratios(cols: dict[str, np.ndarray], idx_B_N: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for each row of resampled ticket indices: arrays of shape [B]."""

    def s(name: str) -> np.ndarray:
        return cols[name][idx_B_N].sum(axis=1)

    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "escalation_recall": s("recalled") / s("should_escalate"),
            "over_escalation_rate": s("over") / s("not_should"),
            "reason_accuracy": s("reason_ok") / s("correct_escalation"),
            "step_acceptability": s("n_acceptable") / s("n_steps"),
            "first_action_accuracy": s("first_action_ok") / s("one"),
            "valid_json_rate": s("n_valid") / s("n_steps"),
            "resolution_rate": s("resolved") / s("one"),
        }
    out["calibration_j"] = out["escalation_recall"] - out["over_escalation_rate"]
    return out


def _calibration(outcomes: list[TicketOutcome], idx_B_N: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, Brier and ECE of p(escalate) for each row of resampled ticket indices: arrays of shape [B]."""
    B = idx_B_N.shape[0]
    ticket_S = np.array([i for i, o in enumerate(outcomes) for _ in o.scores], dtype=int)
    p_S = np.array([p for o in outcomes for p, _ in o.scores], dtype=float)
    y_S = np.array([y for o in outcomes for _, y in o.scores], dtype=float)
    if not len(p_S):
        return {m: np.full(B, np.nan) for m in CALIBRATION}
    counts_B_N = np.zeros((B, len(outcomes)))
    np.add.at(counts_B_N, (np.repeat(np.arange(B), idx_B_N.shape[1]), idx_B_N.ravel()), 1)
    w_B_S = counts_B_N[:, ticket_S]  # each state weighs as often as its ticket was drawn
    with np.errstate(invalid="ignore", divide="ignore"):
        # AUROC: P(p of a positive state > p of a negative one), ties counting half, over distinct p values.
        values_U, u_S = np.unique(p_S, return_inverse=True)
        onehot_S_U = np.zeros((len(p_S), len(values_U)))
        onehot_S_U[np.arange(len(p_S)), u_S] = 1
        pos_B_U, neg_B_U = (w_B_S * y_S) @ onehot_S_U, (w_B_S * (1 - y_S)) @ onehot_S_U
        below_B_U = np.cumsum(neg_B_U, axis=1) - neg_B_U
        auroc_B = (pos_B_U * (below_B_U + neg_B_U / 2)).sum(axis=1) / (pos_B_U.sum(axis=1) * neg_B_U.sum(axis=1))
        total_B = w_B_S.sum(axis=1)
        brier_B = (w_B_S * (p_S - y_S) ** 2).sum(axis=1) / total_B
        # ECE: |mean p - share of positives| per bin, weighted by the bin's share; bins of equal mass in the full sample.
        bin_S = np.empty(len(p_S), dtype=int)
        bin_S[np.argsort(p_S, kind="stable")] = np.arange(len(p_S)) * ECE_BINS // len(p_S)
        bins_S_K = np.zeros((len(p_S), ECE_BINS))
        bins_S_K[np.arange(len(p_S)), bin_S] = 1
        gap_B_K = np.abs((w_B_S * p_S) @ bins_S_K - (w_B_S * y_S) @ bins_S_K)
        ece_B = gap_B_K.sum(axis=1) / total_B
    return {"escalation_auroc": auroc_B, "escalation_brier": brier_B, "escalation_ece": ece_B}


def _all_metrics(outcomes: list[TicketOutcome], cols: dict[str, np.ndarray], idx_B_N: np.ndarray) -> dict[str, np.ndarray]:
    return {**_ratios(cols, idx_B_N), **_calibration(outcomes, idx_B_N)}


def _interval(point: float, samples_B: np.ndarray) -> Estimate:
    samples_B = samples_B[~np.isnan(samples_B)]
    if np.isnan(point) or samples_B.size == 0:
        return Estimate(float(point), float("nan"), float("nan"))
    low, high = np.percentile(samples_B, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def _resample(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(N_BOOTSTRAP, n))


def report(outcomes: list[TicketOutcome], *, seed: int = 0, by_company: bool = True) -> Report:
    """The metrics over these tickets with 95% percentile-bootstrap intervals (resampling tickets)."""
    if not outcomes:
        raise ValueError("no tickets to compute metrics on")
    cols = _columns(outcomes)
    point = _all_metrics(outcomes, cols, np.arange(len(outcomes))[None, :])
    boot = _all_metrics(outcomes, cols, _resample(len(outcomes), seed))
    metrics = {m: _interval(float(point[m][0]), boot[m]) for m in METRICS + CALIBRATION}
    per_company = {}
    if by_company:
        companies = sorted({o.company_id for o in outcomes})
        if len(companies) > 1:
            per_company = {c: report([o for o in outcomes if o.company_id == c], seed=seed, by_company=False) for c in companies}
    return Report(len(outcomes), metrics, per_company)


def compare(candidate: list[TicketOutcome], baseline: list[TicketOutcome], *, seed: int = 0) -> Comparison:
    """Paired bootstrap of candidate − baseline over the tickets both have (same resampled tickets)."""
    base = {o.key: o for o in baseline}
    pairs = [(o, base[o.key]) for o in candidate if o.key in base]
    if not pairs:
        raise ValueError("the two policies share no evaluated ticket")
    cands, bases = [c for c, _ in pairs], [b for _, b in pairs]
    cand_cols, base_cols = _columns(cands), _columns(bases)
    idx = np.arange(len(pairs))[None, :]
    point_c, point_b = _all_metrics(cands, cand_cols, idx), _all_metrics(bases, base_cols, idx)
    resampled = _resample(len(pairs), seed)
    boot_c, boot_b = _all_metrics(cands, cand_cols, resampled), _all_metrics(bases, base_cols, resampled)
    delta = {m: _interval(float(point_c[m][0] - point_b[m][0]), boot_c[m] - boot_b[m]) for m in METRICS + CALIBRATION}
    return Comparison(len(pairs), delta)
