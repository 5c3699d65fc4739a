"""Learning curves: what the student learns from oracle demonstrations, on companies it never saw.

    .venv/bin/python bench/learning.py                       # the recipe comparison behind the defaults
    .venv/bin/python bench/learning.py --variants rationale --sizes 200,400 --lr 1e-3,2e-3

Every variant trains ONE fresh LoRA adapter on oracle demonstrations of built-in training tickets
(drawn from the training pool: never a validation ticket, never a held-out company), escalation
conversations oversampled as a round does, and saves snapshots after each of `--sizes`
conversations. Every snapshot (and the last adapter) gets its p(escalate) scored on the oracle's
states of (loop/calibration.py, cheap: no episode is played):

- the validation split of the training companies under policy numbers drawn with `--val-seed`, never
  trained on (`--val-tickets` per company), where its τ is fitted: recipes are chosen on these numbers,
  which reward reading a policy over remembering a company's; with `--val-domains N`, N whole training
  companies instead, left out of training (the same number of validation tickets in all): a new domain,
  as the held-out pair is;
- `--curve-tickets` per held-out company, at that τ: the curve.

The variant whose last adapter has the highest validation J then plays greedy episodes at its τ,
with the same code as `apprentice eval`, on `--heldout-tickets` per held-out company and on the
hand-written packs in bench/packs (written by hand, in another style; never trained on): the
reported numbers. Validation chooses; the held-out companies only report.

Variants (the training data differ only in the oracle's thought and the key order):
  terse         the oracle's old thoughts ("Policy says escalate: X.", "Look up the policy."), written first
  rationale     the thought names what the customer wants and the policy clause that decides it, written
                first: {"thought", "action", "args", "message"}
  action-first  the rationale, after the action: {"action", "args", "thought", "message"} (apprentice's order)
  facts-first   the rationale without its verdict, written first ("Refund 45 days after purchase; refunds within
                35 days.", then the action): the student compares the numbers it has just written when it acts, and
                p(escalate), read at the action, is not settled by a thought that already said "escalate"
  *-redraw      the same, on the training companies under 5 draws of their policy numbers (seeds seed..seed+4,
                environments.builtin.build_packs): the same refund window never decides every ticket of a company,
                so a threshold learnt per company fails and reading the policy pays

Prints a line per snapshot, writes bench/reports/<name>.md and <name>.png (held-out J at the
validation τ against training minutes, one line per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from environments.builtin import build_packs
from environments.pack import Pack, Ticket, load_packs
from loop.calibration import OperatingPoint, fit_threshold, save_operating_point, ticket_scores
from loop.dataset import oversample_escalations
from loop.evaluate import eval_tickets, run_episodes, training_pool, validation_tickets
from loop.metrics import TicketOutcome, report
from loop.round import RoundSettings, training_messages
from loop.train import LoraSettings, train_adapter
from policies.hf import HFStudent
from policies.models import resolve_model
from policies.policy import OraclePolicy, StudentPolicy
from policies.protocol import ACTION_FIRST, THOUGHT_FIRST, in_order
from report import publish  # bench/report.py: the script's folder is on sys.path

HANDWRITTEN = Path(__file__).parent / "packs"
GATE_OVER_ESCALATION = RoundSettings().max_regression  # what the gate lets over-escalation rise over the base's 0


@dataclass(frozen=True)
class Variant:
    name: str
    rationale: bool = True
    keys: tuple[str, ...] = THOUGHT_FIRST  # the key order of every step the student reads and writes
    lora: dict = dataclasses.field(default_factory=dict)  # LoraSettings overrides
    redraws: int = 0  # training data from the training companies under this many more draws of their policy numbers
    verdict: bool = True  # False: the rationale states the facts and the policy's numbers, not what they decide


VARIANTS = {
    "terse": Variant("terse", rationale=False),
    "rationale": Variant("rationale"),
    "action-first": Variant("action-first", keys=ACTION_FIRST),
    "rationale-redraw": Variant("rationale-redraw", redraws=4),
    "action-first-redraw": Variant("action-first-redraw", keys=ACTION_FIRST, redraws=4),
    "facts-first-redraw": Variant("facts-first-redraw", redraws=4, verdict=False),
    # LoRA on the top 15 of 30 layers: backward stops halfway (bench/train.py measures the speed)
    "action-first-redraw-top15": Variant("action-first-redraw-top15", keys=ACTION_FIRST, redraws=4, lora={"lora_layers": 15}),
}


def with_rationales(pack: Pack, edit: Callable[[str], str]) -> Pack:
    """The pack with every turn's rationale rewritten by `edit`."""
    def rewrite(truth):
        return truth.model_copy(update={"rationale": edit(truth.rationale)})

    def ticket_with(ticket):
        followups = [f.model_copy(update={"truth": rewrite(f.truth)}) for f in ticket.truth.followups]
        return ticket.model_copy(update={"truth": rewrite(ticket.truth).model_copy(update={"followups": followups})})

    return dataclasses.replace(pack, tickets=tuple(ticket_with(t) for t in pack.tickets))


# The part of a built-in rationale that states the decision: "; policy: escalate legal_threat." or
# "; 45 is more than 35: escalate billing_exception." (environments/builtin.py writes no other kind).
VERDICT = re.compile(r"; (?:policy: |\d+ is (?:more than|within) \d+: )[^.]*\.")


def facts_only(rationale: str) -> str:
    """A rationale without its verdict: "Refund 45 days after purchase; refunds within 35 days." """
    return VERDICT.sub(".", rationale)


class Reordered:
    """The student, prompted with its earlier steps (and the contract's example) in another key order."""

    def __init__(self, student: HFStudent, keys: tuple[str, ...]):
        self.student, self.keys = student, keys

    def generate_with_info(self, prompts):
        return self.student.generate_with_info([in_order(p, self.keys) for p in prompts])

    def escalation_probabilities(self, prompts):
        return self.student.escalation_probabilities([in_order(p, self.keys) for p in prompts])


def as_variant(student: HFStudent, variant: Variant):
    return student if variant.keys == ACTION_FIRST else Reordered(student, variant.keys)


def training(seed: int) -> list[Pack]:
    """The built-in training companies under the policy numbers drawn with `seed`."""
    return [p for p in build_packs(seed) if p.company.split == "train"]


def validation(seed: int, val_seed: int, val_domains: int, val_tickets: int) -> tuple[set[str], list[tuple[Pack, Ticket]]]:
    """(the training companies left out of training, the validation tickets τ is fitted on): `val_domains`
    whole companies chosen by `seed` (as many tickets in all as `val_tickets` per training company), or with
    0 the validation split of every training company; both under the policy numbers drawn with `val_seed`."""
    packs = training(val_seed)
    if not val_domains:
        return set(), [(p, t) for p in packs for t in validation_tickets(p, val_tickets)]
    left_out = set(random.Random(seed).sample(sorted(p.id for p in packs), val_domains))
    per_company = val_tickets * len(packs) // val_domains
    return left_out, [(p, t) for p in packs if p.id in left_out for t in eval_tickets(p, per_company)]


def auroc(scored: list[tuple[float, bool]]) -> float:
    pos = [s for s, y in scored if y]
    neg = [s for s, y in scored if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def rates(scored: list[tuple[float, bool]], tau: float) -> tuple[float, float]:
    """(recall, over-escalation) of the tickets' scores at threshold τ."""
    pos = [s >= tau for s, y in scored if y]
    neg = [s >= tau for s, y in scored if not y]
    return sum(pos) / len(pos), sum(neg) / len(neg)


def at(scored: list[tuple[float, bool]], tau: float) -> float:
    """J of the tickets' scores at threshold τ."""
    recall, over = rates(scored, tau)
    return recall - over


def greedy(student, work, max_steps: int) -> dict:
    """The full metric set of greedy episodes (τ applied when the student has one)."""
    outs = [TicketOutcome.of(e.result()) for e in run_episodes(StudentPolicy(student), work, max_steps=max_steps, progress=False)]
    return report(outs, by_company=False).metrics


def by_intent(work, scored: list[tuple[float, bool]], tau: float) -> list[tuple[str, bool, int, int, float]]:
    """(intent, should escalate, tickets, wrong at τ, mean score) per intent, the most often wrong first."""
    groups: dict[tuple[str, bool], list[float]] = {}
    for (_, ticket), (score, escalate) in zip(work, scored):
        groups.setdefault((ticket.truth.intent, escalate), []).append(score)
    rows = [(i, e, len(s), sum((x >= tau) != e for x in s), sum(s) / len(s)) for (i, e), s in groups.items()]
    return sorted(rows, key=lambda r: (-r[3] / r[2], -r[2], r[0]))


def fmt(e) -> str:
    return "n/a" if e.value != e.value else f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="terse,rationale,action-first", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--sizes", default="100,250,500", help="snapshots after this many training conversations")
    parser.add_argument("--tickets", type=int, default=0, help="training tickets demonstrated (default: the largest of --sizes)")
    parser.add_argument("--lr", default="1e-3", help="learning rates (comma-separated: each variant runs at each)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decision-weight", type=float, default=1.0)
    parser.add_argument("--escalation-share", type=float, default=0.3)
    parser.add_argument("--val-tickets", type=int, default=10, help="validation tickets per training company (τ is fitted on them)")
    parser.add_argument("--curve-tickets", type=int, default=30, help="held-out tickets per company scored at every snapshot")
    parser.add_argument("--heldout-tickets", type=int, default=60, help="held-out tickets per company, greedy episodes, last snapshot")
    parser.add_argument("--handwritten-tickets", type=int, default=30, help="tickets per hand-written pack, last snapshot")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-seed", type=int, default=1000, help="policy numbers of the validation companies (never trained on)")
    parser.add_argument("--val-domains", type=int, default=0,
                        help="validate on this many whole training companies, left out of training (0: every company, on --val-seed numbers)")
    parser.add_argument("--name", default="learning", help="report name under bench/reports/")
    parser.add_argument("--keep", default="", help="folder to keep the adapters in (default: a new temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    clock = time.perf_counter()

    packs = build_packs(args.seed)
    train_packs = [p for p in packs if p.company.split == "train"]
    assert args.val_seed not in range(args.seed, args.seed + 1 + max(v.redraws for v in VARIANTS.values())), "validation numbers are trained on"
    heldout = [p for p in packs if p.company.split == "heldout"]
    handwritten = load_packs(HANDWRITTEN) if HANDWRITTEN.is_dir() else []
    left_out, val_work = validation(args.seed, args.val_seed, args.val_domains, args.val_tickets)
    curve_work = [(p, t) for p in heldout for t in eval_tickets(p, args.curve_tickets)]
    model_dir = resolve_model("smollm2-135m")
    hf = HFStudent(model_dir, max_new_tokens=128, batch_size=8)

    keep = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="learning-"))
    snapshot_rows, trained, curves = [], [], {}
    for variant_name in args.variants.split(","):
        for lr in args.lr.split(","):
            variant = VARIANTS[variant_name]
            label = variant.name + (f" lr {lr}" if "," in args.lr else "")
            student = as_variant(hf, variant)
            source = [p for s in range(args.seed, args.seed + 1 + variant.redraws) for p in training(s) if p.id not in left_out]
            if not variant.rationale or not variant.verdict:
                source = [with_rationales(p, facts_only if variant.rationale else lambda _: "") for p in source]
            demos = run_episodes(OraclePolicy(), random.Random(args.seed).sample(training_pool(source), args.tickets or max(sizes)), progress=False)
            conversations = [training_messages(e) for e in demos if e.result().resolved]
            if variant.keys != ACTION_FIRST:
                conversations = [in_order(c, variant.keys) for c in conversations]
            conversations = oversample_escalations(conversations, args.escalation_share, seed=args.seed)
            settings = LoraSettings(epochs=args.epochs, batch_size=args.batch, learning_rate=float(lr), seed=args.seed,
                                    decision_weight=args.decision_weight, **variant.lora)
            started = time.perf_counter()
            out = keep / label.replace(" ", "-")
            result = train_adapter(model_dir, conversations, out, settings, progress=False, snapshots=sizes)
            snaps = sorted(keep.glob(f"{out.name}@*"), key=lambda p: int(p.name.split("@")[1]))
            for snap in snaps + [out]:
                meta = json.loads((snap / "snapshot.json").read_text()) if snap != out else {
                    "conversations": round(len(conversations) * args.epochs), "seconds": result.seconds}
                hf.load_adapter(snap)
                val = ticket_scores(student, val_work)
                tau, _, _ = fit_threshold(val)
                held = ticket_scores(student, curve_work)
                # The gate's corner: against a base that never escalates, over-escalation may rise 2 points at most.
                strict = fit_threshold(val, max_over_escalation=GATE_OVER_ESCALATION)[0]
                row = (label, meta["conversations"], meta["seconds"] / 60, tau, auroc(val), at(val, tau), auroc(held), at(held, tau),
                       strict, *rates(held, strict))
                snapshot_rows.append(row)
                curves.setdefault(label, []).append((row[2], row[7]))
                print(f"{label} @{row[1]}: {row[2]:.1f} train min, τ {tau:.2g}, val AUROC {row[4]:.2f} J {row[5]:.2f}, "
                      f"held-out AUROC {row[6]:.2f} J@τ {row[7]:.2f}; at τ {strict:.2g} (val over-esc ≤ {GATE_OVER_ESCALATION}): "
                      f"held-out recall {row[9]:.2f} over-esc {row[10]:.2f} ({time.perf_counter() - clock:.0f} s)", flush=True)
            save_operating_point(OperatingPoint(tau, 0, 0, 0, len(val), None), out)  # the last adapter's τ
            trained.append((label, variant, out, round(len(conversations) * args.epochs), result, (time.perf_counter() - started) / 60,
                            row[5], (tau, by_intent(val_work, val, tau))))

    # The recipe validation picks (the highest validation J of a last adapter) plays greedy episodes at
    # its τ on the held-out pair and the hand-written packs: the reported numbers.
    label, variant, out, n_conv, result, wall, _, (chosen_tau, intents) = chosen = max(trained, key=lambda t: t[6])
    hf.load_adapter(out)
    student = as_variant(hf, variant)
    held = greedy(student, [(p, t) for p in heldout for t in eval_tickets(p, args.heldout_tickets)], args.max_steps)
    hand = greedy(student, [(p, t) for p in handwritten for t in eval_tickets(p, args.handwritten_tickets)], args.max_steps) \
        if handwritten else None
    print(f"{label} (chosen on validation) final: held-out J {fmt(held['calibration_j'])} valid {fmt(held['valid_json_rate'])} "
          f"({time.perf_counter() - clock:.0f} s); adapters kept in {keep}", flush=True)

    lines = [
        "# Learning curves: oracle demonstrations, held-out companies",
        "",
        f"`bench/learning.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items())}`",
        "",
        f"Real SmolLM2-135M, LoRA r 16 on every layer (-top15: the top 15 of 30), batch {args.batch}, shared-prefix trainer, {torch.get_num_threads()} threads,",
        f"{os.cpu_count()} CPU cores. Whole run: {(time.perf_counter() - clock) / 60:.0f} min.",
        (f"Validation: {len(val_work)} tickets of {', '.join(sorted(left_out))}, training companies left out of training "
         f"(under policy numbers drawn with seed {args.val_seed}); τ is fitted there." if left_out else
         f"Validation: {args.val_tickets} tickets of each of the {len(train_packs)} training companies under policy numbers drawn with seed "
         f"{args.val_seed} (never trained on); τ is fitted there."),
        f"Held out: {', '.join(p.id for p in heldout)}. Hand-written (bench/packs, another author's style, never trained on): "
        f"{', '.join(p.id for p in handwritten) or 'none'}.",
        "",
        "## Every snapshot: p(escalate) on the oracle's states",
        "",
        "A ticket's score is the student's highest p(escalate) over the states the oracle passes through, up to the first where",
        "escalating is right; it escalates at τ when its score reaches τ. Cheap (no episode is played), and the τ comes from",
        "validation only.",
        "",
        f"The last three columns are the gate's corner: τ fitted for the best validation recall with over-escalation ≤ "
        f"{GATE_OVER_ESCALATION}",
        "(what a candidate must keep against the base model, which never escalates), and the held-out rates at it.",
        "",
        "| variant | conversations | train min | τ | validation AUROC | validation J at τ | held-out AUROC | held-out J at τ | "
        "strict τ | held-out recall | held-out over-esc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2g} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.2g} | "
              f"{r[9]:.2f} | {r[10]:.2f} |" for r in snapshot_rows]
    lines += [
        "",
        "## Every variant: its last adapter",
        "",
        "| variant | train conversations | train tokens | train min | wall min (training and scoring) | validation J at τ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {t[0]} | {t[3]} | {t[4].tokens:,} | {t[4].seconds / 60:.1f} | {t[5]:.0f} | {t[6]:.2f} |" for t in trained]
    lines += [
        "",
        "## The recipe validation chose: greedy episodes at its τ (95% bootstrap CIs over tickets)",
        "",
        f"Chosen: **{label}**, the highest validation J at τ of the last adapters "
        f"({', '.join(f'{t[0]} {t[6]:.2f}' for t in trained)}). Only it is played on the held-out pair and the hand-written packs.",
        "",
        "| variant | train conversations | train tokens | train min | wall min | held-out tickets | valid JSON | recall | over-esc. | "
        "reason acc. | J | hand-written valid JSON | hand-written J |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {label} | {n_conv} | {result.tokens:,} | {result.seconds / 60:.1f} | {wall:.0f} | {args.heldout_tickets * len(heldout)} | "
        f"{fmt(held['valid_json_rate'])} | {fmt(held['escalation_recall'])} | {fmt(held['over_escalation_rate'])} | "
        f"{fmt(held['reason_accuracy'])} | {fmt(held['calibration_j'])} | {fmt(hand['valid_json_rate']) if hand else '-'} | "
        f"{fmt(hand['calibration_j']) if hand else '-'} |",
    ]
    lines += [
        "",
        f"## Where the chosen adapter errs on validation, by what the customer wants (at τ {chosen_tau:.2g})",
        "",
        "A ticket is wrong when its score and τ disagree with whether escalating is right: a needless escalation on a",
        "self-serve ticket, a missed one on an escalation ticket. Intents sorted by their share of wrong tickets.",
        "",
        "| intent | escalate? | tickets | wrong | mean score |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {i} | {'yes' if e else 'no'} | {n} | {w} | {m:.2f} |" for i, e, n, w, m in intents]
    plot(curves, Path(__file__).parent / "reports" / f"{args.name}.png")
    lines += ["", f"![held-out J at τ against training minutes]({args.name}.png)"]
    publish(args.name, lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("training minutes (this CPU)")
    ax.set_ylabel("held-out J at the validation τ")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
