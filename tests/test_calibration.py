"""p(escalate) and the operating point: the calibration metrics, the gate that applies τ while the
student decodes, fitting τ on validation tickets only, and the plot."""

import pytest
import torch

from environments.actions import ACTIONS
from environments.builtin import build_packs
from environments.episode import SupportEpisode
from loop.calibration import fit_operating_point, fit_threshold, own_path_scores, plot_calibration, ticket_scores
from loop.evaluate import validation_tickets
from loop.metrics import TicketOutcome, report
from policies.hf import ESCALATE, EscalationGate, action_first_token_ids
from policies.student import Generation

PACKS = build_packs(0)
TRAIN = [p for p in PACKS if p.company.split == "train"][:2]
HELDOUT = [p for p in PACKS if p.company.split == "heldout"]


def outcome(i: int, scores) -> TicketOutcome:
    return TicketOutcome("acme", f"t{i}", False, False, False, False, True, True, 1, 1, 1, tuple(scores))


def test_a_perfect_ranking_scores_auroc_1_and_a_flipped_one_0():
    states = [(0.9, True), (0.8, True), (0.3, False), (0.1, False), (0.7, True), (0.2, False)]
    perfect = [outcome(i, [s]) for i, s in enumerate(states)]
    flipped = [outcome(i, [(1 - p, y)]) for i, (p, y) in enumerate(states)]
    assert report(perfect, by_company=False).metrics["escalation_auroc"].value == 1.0
    assert report(flipped, by_company=False).metrics["escalation_auroc"].value == 0.0
    m = report(perfect, by_company=False).metrics
    assert m["escalation_brier"].value == pytest.approx(sum((p - y) ** 2 for p, y in states) / 6)
    assert 0 <= m["escalation_ece"].low <= m["escalation_ece"].value <= m["escalation_ece"].high


def test_policies_without_scores_report_calibration_as_nan():
    m = report([outcome(0, []), outcome(1, [])], by_company=False).metrics
    assert all(m[k].value != m[k].value for k in ("escalation_auroc", "escalation_brier", "escalation_ece"))


def test_tau_lies_between_the_scores_it_separates_and_decides_exactly_there():
    scored = [(0.9, True), (0.6, True), (0.55, False), (0.2, False), (0.4, True)]
    tau, recall, over = fit_threshold(scored)
    assert 0.55 < tau < 0.6 and recall == pytest.approx(2 / 3) and over == 0.0
    assert [s >= tau for s, _ in scored] == [True, True, False, False, False]
    # with room for over-escalation, recall rises as far as the limit allows
    tau, recall, over = fit_threshold(scored, max_over_escalation=0.5)
    assert recall == 1.0 and over == 0.5 and 0.2 < tau < 0.4


def gate_scores(tokenizer, p_escalate: float) -> torch.Tensor:
    """Logits over the vocabulary where the six action names' first tokens give escalate p_escalate."""
    ids = action_first_token_ids(tokenizer)
    scores = torch.full((1, len(tokenizer)), -1e4)
    others = (1 - p_escalate) / 5
    for i, token in enumerate(ids):
        scores[0, token] = torch.log(torch.tensor(p_escalate if i == ESCALATE else others))
    return scores


@pytest.mark.parametrize("p, tau, chosen", [(0.31, 0.30, "escalate"), (0.29, 0.30, "other"), (0.95, None, "escalate"), (0.05, None, "other")])
@pytest.mark.parametrize("written", ['{"action":"', '{"thought":"Refund 45 days after purchase.","action":"'])
def test_the_gate_reads_p_escalate_at_the_action_field_and_applies_tau(smollm2_tokenizer, p, tau, chosen, written):
    tok = smollm2_tokenizer
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    generated = tok.encode(written, add_special_tokens=False)
    ids = torch.tensor([prompt + generated])
    gate = EscalationGate(tok, action_first_token_ids(tok), len(prompt), tau, rows=1)
    out = gate(ids, gate_scores(tok, p))
    assert gate.p_escalate == [pytest.approx(p, abs=1e-4)]
    top = int(out[0].argmax())
    escalate = int(action_first_token_ids(tok)[ESCALATE])
    assert (top == escalate) == (chosen == "escalate")
    if tau is not None:  # the other side of τ is closed, not just outscored
        assert (out[0, escalate] == float("-inf")) == (chosen == "other")


def test_the_gate_ignores_positions_before_the_action_field(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = torch.tensor([tok.encode('{"thought":"The action', add_special_tokens=False)])
    gate = EscalationGate(tok, action_first_token_ids(tok), 0, 0.5, rows=1)
    scores = gate_scores(tok, 0.9)
    assert torch.equal(gate(ids, scores.clone()), scores) and gate.p_escalate == [None]


@pytest.mark.parametrize("field", ['"reason":"', '"reason": "'])
def test_the_gate_keeps_an_escalation_reason_to_the_known_codes(smollm2_tokenizer, field):
    """Greedy decoding through the gate, from logits that favour a code that does not exist ("escalate",
    what a student forced to escalate after arguing otherwise wrote), spells a real code, then is free."""
    from environments.actions import REASONS
    from policies.hf import reason_token_ids

    tok = smollm2_tokenizer
    ids = tok.encode('{"thought":"x","action":"escalate","args":{' + field, add_special_tokens=False)
    gate = EscalationGate(tok, action_first_token_ids(tok), 0, None, rows=1)
    wanted = tok.encode("escalate", add_special_tokens=False) + tok.encode('"}', add_special_tokens=False)
    churn = reason_token_ids(tok)[REASONS.index("churn_risk")]
    for step in range(len(churn) + 1):
        scores = torch.zeros(1, len(tok))
        scores[0, wanted[min(step, len(wanted) - 1)]] = 9.0  # the off-protocol continuation
        scores[0, churn[min(step, len(churn) - 1)]] += 1.0  # the model's best real code
        ids.append(int(gate(torch.tensor([ids]), scores)[0].argmax()))
    value = tok.decode(ids).split(field, 1)[1]
    assert value.startswith("churn_risk") and value != "churn_risk"  # the code, then a free token
    assert gate.spelling == {}


@pytest.mark.parametrize("p, tau, action", [(0.9, 0.95, "reply"), (0.3, 0.2, "escalate")])
def test_the_gate_spells_an_action_name_on_its_side_of_tau(smollm2_tokenizer, p, tau, action):
    """A student whose thought argued for escalating, held back by τ, favours a name that does not
    exist ("encouraging", seen in the main command) over every real one: the gate spells the best
    real name on τ's side, `reply` here, then lets the row go on."""
    from policies.hf import action_token_ids

    tok = smollm2_tokenizer
    ids = tok.encode('{"thought":"Refund 52 days after purchase; 52 is more than 35.","action":"', add_special_tokens=False)
    gate = EscalationGate(tok, action_first_token_ids(tok), 0, tau, rows=1)
    junk = tok.encode("encouraging", add_special_tokens=False)
    wanted = action_token_ids(tok)[ACTIONS.index(action)]
    for step in range(len(wanted) + 1):
        scores = gate_scores(tok, p) if step == 0 else torch.zeros(1, len(tok))
        scores[0, junk[min(step, len(junk) - 1)]] = 9.0  # the off-protocol name
        scores[0, wanted[min(step, len(wanted) - 1)]] += 1.0  # the best real name on τ's side
        ids.append(int(gate(torch.tensor([ids]), scores)[0].argmax()))
    value = tok.decode(ids).split('"action":"', 1)[1]
    assert value.startswith(action) and value != action  # the name, then a free token
    assert gate.spelling == {}


class OpeningScorer:
    """A student whose p(escalate) is 0.9 on every state of a ticket that should escalate and 0.1
    elsewhere (a perfect ticket-level ranker); it keeps the openings it was asked about."""

    def __init__(self, packs):
        self.escalating = {t.opening for p in packs for t in p.tickets if t.should_escalate}
        self.openings: set[str] = set()

    def escalation_probabilities(self, prompts):
        openings = [p[1]["content"].removeprefix("Customer: ") for p in prompts]
        self.openings |= set(openings)
        return [0.9 if o in self.escalating else 0.1 for o in openings]


def test_tau_is_fitted_on_validation_tickets_and_refuses_held_out_companies():
    scorer = OpeningScorer(TRAIN)
    point = fit_operating_point(scorer, TRAIN, per_company=5)
    assert point.n_tickets == 10 and 0.1 < point.tau <= 0.9 and point.j == 1.0
    assert scorer.openings == {t.opening for p in TRAIN for t in validation_tickets(p, 5)}
    with pytest.raises(ValueError, match="held out"):
        fit_operating_point(scorer, HELDOUT, per_company=5)
    with pytest.raises(ValueError, match="held out"):
        fit_operating_point(scorer, TRAIN + HELDOUT, per_company=2)


class Guesser:
    """A student that opens every ticket with a search whose thought guesses "escalate", and after it
    escalates at p 0.9 when it reads its own guess (0.1 otherwise, the oracle's steps); escalation
    barred, it replies instead."""

    SEARCH = '{"action":"search_kb","args":{"query":"help"},"thought":"Guess: escalate.","message":""}'
    REPLY = '{"action":"reply","args":{},"thought":"","message":"Here is what applies."}'

    def __init__(self):
        self.calls = 0

    def p(self, messages) -> float:
        return 0.9 if any(m["role"] == "assistant" and "Guess" in m["content"] for m in messages) else 0.1

    def escalation_probabilities(self, prompts):
        return [self.p(m) for m in prompts]

    def without_escalating(self, prompts):
        self.calls += len(prompts)
        return [Generation(self.REPLY if any(m["role"] == "assistant" for m in messages) else self.SEARCH, "a", 1, 1, self.p(messages))
                for messages in prompts]


def test_tau_on_the_students_own_path_sees_what_its_own_steps_lead_to():
    """On the oracle's states the guesser never reads its guess (p 0.1 everywhere); on its own path it
    reads it after its search and scores 0.9 on every ticket where escalating was not already right at
    the opening, which ends there (one state scored)."""
    work = [(p, t) for p in TRAIN for t in validation_tickets(p, 10)]
    guesser = Guesser()
    assert {score for score, _ in ticket_scores(guesser, work)} == {0.1}
    own = own_path_scores(guesser, work)
    at_opening = [SupportEpisode(p, t).escalation_acceptable() for p, t in work]
    assert [score for score, _ in own] == [0.1 if right else 0.9 for right in at_opening]
    assert [e for _, e in own] == [t.should_escalate for _, t in work]
    assert guesser.calls == 2 * len(work) - sum(at_opening)  # the opening, then one reply that ends the ticket
    assert any(at_opening) and not all(at_opening)
    point = fit_operating_point(Guesser(), TRAIN, per_company=10, states="student")
    assert point.states == "student" and point.tau > 0.9 and point.over_escalation == 0  # only τ above its guesses keeps it from escalating


def test_the_plot_is_a_png_of_the_expected_size(tmp_path):
    from PIL import Image

    outcomes = [outcome(i, [(p, y)]) for i, (p, y) in enumerate([(0.9, True), (0.2, False), (0.6, True), (0.4, False)])]
    path = plot_calibration(outcomes, 0.5, tmp_path / "calibration.png", title="v0001")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 360)
        assert len(set(image.convert("L").get_flattened_data())) > 10  # drawn on, not blank


def test_eval_reports_calibration_with_intervals_and_writes_the_plot(tmp_path):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from ops.cli import main

    png = tmp_path / "keyword.png"
    result = CliRunner().invoke(main, ["eval", "--policy", "keyword", "--limit", "8", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for name in ("escalation_auroc", "escalation_brier", "escalation_ece"):  # the keyword rule reports 0/1 probabilities
        assert 0 <= out[name] <= 1 and len(out[f"{name}_ci"]) == 2
    with Image.open(png) as image:
        assert image.size == (800, 360)
