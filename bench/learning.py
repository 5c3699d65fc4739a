"""Learning curves: what the student learns from oracle demonstrations, on companies it never saw.

    .venv/bin/python bench/learning.py                       # the recipe comparison behind the defaults
    .venv/bin/python bench/learning.py --variants rationale --sizes 200,400 --lr 1e-3,2e-3

Every variant trains ONE fresh LoRA adapter on oracle demonstrations of built-in training tickets
(drawn from the training pool: never a validation ticket, never a held-out company), escalation
conversations oversampled as a round does, and saves snapshots after each of `--sizes`
conversations. Each snapshot is evaluated greedy, with the same code as `apprentice eval`:

- on the validation split of the training companies (`--val-tickets` per company): recipes are
  chosen on these numbers;
- on a fixed subset of the held-out pair (`--curve-tickets` per company), for the curve;
- the last snapshot also on `--heldout-tickets` per held-out company and on the hand-written packs
  in bench/packs (written by hand, in another style; never trained on): the reported numbers.

Variants (the training data differ only in the oracle's thought and the key order):
  terse         the oracle's old thoughts ("Policy says escalate: X.", "Look up the policy.")
  rationale     the thought names what the customer wants and the policy clause that decides it
  action-first  the rationale, after the action: {"action", "args", "thought", "message"}

Prints a table per variant and snapshot, writes bench/reports/learning.md and learning.png
(held-out J against training minutes, one line per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from environments.builtin import build_packs
from environments.pack import Pack, load_packs
from loop.dataset import oversample_escalations
from loop.evaluate import eval_tickets, run_episodes, training_pool, validation_tickets
from loop.metrics import TicketOutcome, report
from loop.round import training_messages
from loop.train import LoraSettings, train_adapter
from policies.hf import HFStudent
from policies.models import resolve_model
from policies.policy import OraclePolicy, Output, StudentPolicy
from policies.protocol import render_messages
from report import publish  # bench/report.py: the script's folder is on sys.path

HANDWRITTEN = Path(__file__).parent / "packs"
THOUGHT_FIRST = '{"thought": "...", "action": "...", "args": {...}, "message": "..."}'
ACTION_FIRST = '{"action": "...", "args": {...}, "thought": "...", "message": "..."}'


@dataclass(frozen=True)
class Variant:
    name: str
    rationale: bool = True
    action_first: bool = False
    lora: dict = dataclasses.field(default_factory=dict)  # LoraSettings overrides


VARIANTS = {
    "terse": Variant("terse", rationale=False),
    "rationale": Variant("rationale"),
    "action-first": Variant("action-first", action_first=True),
}


def without_rationales(pack: Pack) -> Pack:
    """The pack with every turn's rationale removed: the oracle falls back to its old terse thoughts."""
    def strip(ticket):
        truth = ticket.truth
        followups = [f.model_copy(update={"truth": f.truth.model_copy(update={"rationale": ""})}) for f in truth.followups]
        return ticket.model_copy(update={"truth": truth.model_copy(update={"rationale": "", "followups": followups})})

    return dataclasses.replace(pack, tickets=tuple(strip(t) for t in pack.tickets))


def reorder(text: str) -> str:
    """An action's JSON with `action` and `args` before `thought` (anything unparsable unchanged)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(obj, dict) or "action" not in obj:
        return text
    first = {k: obj[k] for k in ("action", "args", "thought", "message") if k in obj}
    return json.dumps({**first, **obj}, separators=(",", ":"), ensure_ascii=False)


def action_first_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation as an action-first student sees it: the contract's example and every assistant step reordered."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            m = {**m, "content": reorder(m["content"])}
        elif m["role"] == "system":
            m = {**m, "content": m["content"].replace(THOUGHT_FIRST, ACTION_FIRST)}
        out.append(m)
    return out


class ActionFirstPolicy(StudentPolicy):
    """The student, prompted with its earlier steps (and the contract) in action-first order."""

    def act(self, episodes) -> list[Output]:
        prompts = [action_first_messages(render_messages(e.pack.company, e.transcript)) for e in episodes]
        return [Output(g.text, g.p_escalate) for g in self.student.generate_with_info(prompts)]


def outcomes(student: HFStudent, variant: Variant, work: list[tuple[Pack, object]], max_steps: int) -> list[TicketOutcome]:
    policy = (ActionFirstPolicy if variant.action_first else StudentPolicy)(student)
    return [TicketOutcome.of(e.result()) for e in run_episodes(policy, work, max_steps=max_steps, progress=False)]


def summary(outs: list[TicketOutcome]) -> dict:
    m = report(outs, by_company=False).metrics
    return {k: m[k] for k in ("valid_json_rate", "escalation_recall", "over_escalation_rate", "reason_accuracy", "calibration_j")}


def fmt(e) -> str:
    return "n/a" if e.value != e.value else f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="terse,rationale,action-first", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--sizes", default="100,250,500", help="snapshots after this many training conversations")
    parser.add_argument("--lr", default="1e-3", help="learning rates (comma-separated: each variant runs at each)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decision-weight", type=float, default=1.0)
    parser.add_argument("--escalation-share", type=float, default=0.3)
    parser.add_argument("--val-tickets", type=int, default=4, help="validation tickets per training company, per snapshot")
    parser.add_argument("--curve-tickets", type=int, default=20, help="held-out tickets per company, per snapshot")
    parser.add_argument("--heldout-tickets", type=int, default=60, help="held-out tickets per company, last snapshot")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="learning", help="report name under bench/reports/")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    clock = time.perf_counter()

    packs = build_packs(args.seed)
    train_packs = [p for p in packs if p.company.split == "train"]
    heldout = [p for p in packs if p.company.split == "heldout"]
    handwritten = load_packs(HANDWRITTEN) if HANDWRITTEN.is_dir() else []
    model_dir = resolve_model("smollm2-135m")
    student = HFStudent(model_dir, max_new_tokens=128, batch_size=8)

    rows, curves = [], {}
    for variant_name in args.variants.split(","):
        for lr in args.lr.split(","):
            variant = VARIANTS[variant_name]
            label = variant.name + (f" lr {lr}" if "," in args.lr else "")
            source = train_packs if variant.rationale else [without_rationales(p) for p in train_packs]
            n_demos = max(sizes)  # oversampling adds escalation copies; the snapshots count conversations
            demos = run_episodes(OraclePolicy(), random.Random(args.seed).sample(training_pool(source), n_demos), progress=False)
            conversations = [training_messages(e) for e in demos if e.result().resolved]
            if variant.action_first:
                conversations = [action_first_messages(c) for c in conversations]
            conversations = oversample_escalations(conversations, args.escalation_share, seed=args.seed)
            settings = LoraSettings(epochs=args.epochs, batch_size=args.batch, learning_rate=float(lr), seed=args.seed,
                                    decision_weight=args.decision_weight, **variant.lora)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "adapter"
                result = train_adapter(model_dir, conversations, out, settings, progress=False, snapshots=sizes)
                snaps = sorted(Path(tmp).glob("adapter@*"), key=lambda p: int(p.name.split("@")[1]))
                snaps = snaps or [out]
                for i, snap in enumerate(snaps):
                    meta = json.loads((snap / "snapshot.json").read_text()) if (snap / "snapshot.json").exists() else {
                        "conversations": len(conversations) * args.epochs, "seconds": result.seconds}
                    student.load_adapter(snap)
                    val_work = [(p, t) for p in train_packs for t in validation_tickets(p, args.val_tickets)]
                    val = summary(outcomes(student, variant, val_work, args.max_steps))
                    last = i == len(snaps) - 1
                    n_held = args.heldout_tickets if last else args.curve_tickets
                    held_work = [(p, t) for p in heldout for t in eval_tickets(p, n_held)]
                    held_outs = outcomes(student, variant, held_work, args.max_steps)
                    curve_outs = [o for o in held_outs if o.ticket_id in {t.id for p in heldout for t in eval_tickets(p, args.curve_tickets)}]
                    curves.setdefault(label, []).append((meta["seconds"] / 60, report(curve_outs, by_company=False).metrics["calibration_j"]))
                    held = summary(held_outs)
                    hand = summary(outcomes(student, variant, [(p, t) for p in handwritten for t in p.tickets], args.max_steps)) if last and handwritten else None
                    rows.append((label, meta["conversations"], meta["seconds"] / 60, len(held_outs), val, held, hand))
                    print(f"{label} @{meta['conversations']}: val J {fmt(val['calibration_j'])}, held-out J {fmt(held['calibration_j'])} "
                          f"valid {held['valid_json_rate'].value:.2f} ({time.perf_counter() - clock:.0f} s)", flush=True)

    lines = [
        "# Learning curves: oracle demonstrations, held-out companies",
        "",
        f"`bench/learning.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items())}`",
        f"Real SmolLM2-135M, LoRA r 16 on all linear layers, batch {args.batch}, shared-prefix trainer, {torch.get_num_threads()} threads,",
        f"{os.cpu_count()} CPU cores; greedy evaluation, at most {args.max_steps} steps per episode; 95% bootstrap intervals over tickets.",
        f"Validation: {args.val_tickets} tickets of each of the {len(train_packs)} training companies (never trained on). "
        f"Held out: {', '.join(p.id for p in heldout)}. Hand-written: {', '.join(p.id for p in handwritten) or 'none'}.",
        f"Whole run: {(time.perf_counter() - clock) / 60:.0f} min.",
        "",
        "| variant | conversations | train min | validation J | held-out tickets | valid JSON | recall | over-esc. | reason acc. | held-out J | hand-written valid JSON | hand-written J |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, conv, minutes, n, val, held, hand in rows:
        lines.append(f"| {label} | {conv} | {minutes:.1f} | {fmt(val['calibration_j'])} | {n} | {fmt(held['valid_json_rate'])} | "
                     f"{fmt(held['escalation_recall'])} | {fmt(held['over_escalation_rate'])} | {fmt(held['reason_accuracy'])} | "
                     f"{fmt(held['calibration_j'])} | {fmt(hand['valid_json_rate']) if hand else '-'} | {fmt(hand['calibration_j']) if hand else '-'} |")
    plot(curves, Path(__file__).parent / "reports" / f"{args.name}.png")
    lines += ["", f"![held-out J against training minutes]({args.name}.png)"]
    publish(args.name, lines)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in curves.items():
        xs = [x for x, _ in points]
        ys = [e.value for _, e in points]
        err = [[e.value - e.low for _, e in points], [e.high - e.value for _, e in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("training minutes (this CPU)")
    ax.set_ylabel("held-out J (95% CI)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
