"""Does the student's own rationale know better than its first token? Escalation scores read after the thought.

    .venv/bin/python bench/verdict.py --adapter /tmp/run/adapters/v0001 --adapter /tmp/run/adapters/v0002 --cache /tmp/verdict

apprentice's student writes its action first and its rationale after it ({"action", "args", "thought",
"message"}), and p(escalate) is read at the action's first token: before the student has written a word of
reasoning. Yet the rationale it then writes often argues the other way ("36 is more than 35: escalate
billing_exception." after a `search_kb`), and in the round-2 rollouts of one main-command run (training companies)
the rationale said "escalate" in 11 of 18 states where escalating was right and in 0 of 55 where it was
not, while p(escalate) ranked those states at AUROC 0.73. This scores one action-first adapter (as the
round trains it) on the oracle's states, as `fit_operating_point` does, with six readouts per state:

- `p(escalate)`: the first token of the action, what the product reads today;
- `verdict`: 1 if the greedy step's thought says "escalate", else 0;
- `verdict, then p`: (verdict + p(escalate)) / 2: the verdict first, p(escalate) orders within each side;
- `re-read`: p(escalate) read after the student's own thought, written first: `{"thought": <its thought>,
  "action": "` (an order the action-first student never trained on);
- `verdict, escalation barred`: the verdict of a second greedy step whose action may not be `escalate`
  (a thought that follows an escalation tends to back it; this one cannot), and `barred verdict, then p`.

Each state's step is decoded greedily, under the action schema (json_mode), without τ. A ticket's score
is its highest over the oracle's states up to the first where escalating is right. Validation is what
the round fits τ on: the training companies the round left out of training (the config's seed), as many
tickets as it uses; the held-out pair only reports, at the gate's corner fitted on validation.

Measured on the main command's v0001 (bench/reports/verdict.md): none beats p(escalate) at the gate's
corner; a thought mostly backs the action it follows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

from environments.pack import Pack, Ticket
from loop.calibration import fit_threshold, ticket_scores
from loop.evaluate import eval_tickets, validation_tickets
from ops.config import Config, load_config
from loop.round import Runtime
from ops.run import build_packs, round_settings
from policies.hf import ESCALATE, HFStudent
from policies.models import resolve_model
from policies.student import Message
from learning import GATE_OVER_ESCALATION, auroc, rates  # bench/learning.py
from report import publish
from thoughts import interval  # bench/thoughts.py

READOUTS = ("p(escalate)", "verdict", "verdict, then p", "re-read", "verdict, escalation barred", "barred verdict, then p")
ESCALATES = re.compile(r"\bescalate\b", re.IGNORECASE)


class Readouts:
    """A scoring student that decodes each state's whole step once and keeps every readout of it;
    `escalation_probabilities` answers with one of them (`use`), the others are read back by `Replay`."""

    def __init__(self, student: HFStudent):
        self.student, self.rows, self.use = student, [], "p(escalate)"

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float]:
        out = []
        free = self.student.generate_with_info(prompts)
        # Barred: p(escalate) never reaches τ 2, every step spells another action. A step that did not
        # escalate is what the barred one would be (greedy, the same best other action).
        again = [i for i, g in enumerate(free) if _action(g.text) == "escalate"]
        barred = list(free)
        self.student.threshold = 2.0
        try:
            for i, b in zip(again, self.student.generate_with_info([prompts[i] for i in again]) if again else []):
                barred[i] = b
        finally:
            self.student.threshold = None
        for prompt, g, b in zip(prompts, free, barred):
            thought, p = _thought(g.text), g.p_escalate or 0.0
            verdict, barred_verdict = float(bool(ESCALATES.search(thought))), float(bool(ESCALATES.search(_thought(b.text))))
            row = {"p(escalate)": p, "verdict": verdict, "verdict, then p": (verdict + p) / 2,
                   "re-read": self.reread(prompt, thought), "verdict, escalation barred": barred_verdict,
                   "barred verdict, then p": (barred_verdict + p) / 2, "text": g.text, "barred": b.text}
            self.rows.append(row)
            out.append(row[self.use])
        return out

    @torch.inference_mode()
    def reread(self, prompt: list[Message], thought: str) -> float:
        s = self.student
        lead = s.tokenizer('{"thought":' + json.dumps(thought, ensure_ascii=False) + ',"action":"', add_special_tokens=False).input_ids
        ids = torch.tensor([s._render(prompt) + lead], device=s.device)
        logits = s.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
        return torch.softmax(logits[s._action_ids.to(logits.device)].float(), dim=-1)[ESCALATE].item()


def _field(text: str, key: str) -> str:
    try:
        return str(json.loads(text).get(key, ""))
    except (json.JSONDecodeError, AttributeError):
        return ""


def _thought(text: str) -> str:
    return _field(text, "thought")


def _action(text: str) -> str:
    return _field(text, "action")


class Replay:
    """One readout of the recorded rows, in the order ticket_scores visits the states."""

    def __init__(self, rows: list[dict], readout: str):
        self.rows, self.readout, self.next = rows, readout, 0

    def escalation_probabilities(self, prompts: list[list[Message]]) -> list[float]:
        chunk = self.rows[self.next : self.next + len(prompts)]
        self.next += len(prompts)
        return [r[self.readout] for r in chunk]


def work_lists(cfg: Config, curve_tickets: int) -> tuple[list[str], list[tuple[Pack, Ticket]], list[tuple[Pack, Ticket]]]:
    """The round's validation tickets (what `retrain` fits τ on) and the held-out pair's fixed evaluation tickets."""
    # Only the packs and the settings are read: the round's own split, nothing else of a runtime.
    rt = Runtime(store=None, packs=build_packs(cfg), student=None, teacher=None, train=None, model_dir=None, base_model=cfg.model,
                 adapters_dir=None, settings=round_settings(cfg), lora=None)
    val_work = [(p, t) for p in rt.validation_packs for t in validation_tickets(p, rt.calibration_per_pack)]
    held_work = [(p, t) for p in rt.heldout_packs for t in eval_tickets(p, curve_tickets)]
    return sorted(rt.left_out), val_work, held_work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", action="append", required=True, help="an action-first adapter folder (repeatable)")
    parser.add_argument("--config", type=Path, default=None, help="the apprentice.toml the adapter's run used (default: defaults)")
    parser.add_argument("--curve-tickets", type=int, default=30, help="held-out tickets per company")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep each adapter's scored states in this folder (<adapter name>.json) and reuse them: "
                             "an adapter scored before is reported again without the model")
    parser.add_argument("--name", default="verdict", help="report name under bench/reports/")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(args.config)
    left_out, val_work, held_work = work_lists(cfg, args.curve_tickets)
    hf = HFStudent(resolve_model(cfg.model), max_new_tokens=cfg.max_new_tokens, json_mode=True, use_threshold=False)
    table = []
    for adapter in args.adapter:
        cached = args.cache / f"{Path(adapter).name}.json" if args.cache else None
        if cached and cached.exists():
            scored = json.loads(cached.read_text())
        else:
            hf.load_adapter(adapter)
            started = time.perf_counter()
            scorer = Readouts(hf)
            ticket_scores(scorer, val_work)
            n_val = len(scorer.rows)
            ticket_scores(scorer, held_work)
            scored = {"validation": scorer.rows[:n_val], "heldout": scorer.rows[n_val:], "minutes": (time.perf_counter() - started) / 60}
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(scored))
        minutes = scored["minutes"]
        for readout in READOUTS:
            val = ticket_scores(Replay(scored["validation"], readout), val_work)
            held = ticket_scores(Replay(scored["heldout"], readout), held_work)
            try:
                corner = fit_threshold(val, max_over_escalation=GATE_OVER_ESCALATION)[0]
            except ValueError:  # every score that escalates a ticket escalates too many: the corner escalates none
                corner = float("inf")
            vr, vo = rates(val, corner)
            held_tp = sum(s >= corner for s, e in held if e)
            held_fp = sum(s >= corner for s, e in held if not e)
            row = (Path(adapter).name, readout, f"{auroc(val):.2f}", f"{corner:.3g}", f"{vr:.2f}, {vo:.2f}",
                   interval(held, auroc), interval(held, lambda x: rates(x, corner)[0]), interval(held, lambda x: rates(x, corner)[1]),
                   f"{held_tp}/{sum(e for _, e in held)}, {held_fp}/{sum(not e for _, e in held)}", f"{minutes:.1f}")
            table.append(row)
            print(" | ".join(row), flush=True)
    lines = [
        "# Escalation read after the rationale",
        "",
        f"`bench/verdict.py {' '.join('--adapter ' + a for a in args.adapter)} --curve-tickets {args.curve_tickets}`",
        "",
        f"Real SmolLM2-135M with each adapter, greedy steps under the action schema, without τ; {torch.get_num_threads()} threads. "
        "The last column is each adapter's scoring time (`--cache` reports a scored adapter again without the model).",
        f"Validation: {len(val_work)} tickets of {', '.join(left_out) or 'every training company'} (the round's τ tickets, "
        f"left out of training). Held out: {len(held_work)} tickets of tunewave and wayfarer-trips; 95% bootstrap intervals over tickets.",
        "A ticket's score is its highest readout over the oracle's states up to the first where escalating is right. "
        f"The gate's corner: τ for the best validation recall with over-escalation ≤ {GATE_OVER_ESCALATION}, applied to the held-out pair.",
        "",
        "| adapter | readout | val. AUROC | corner τ | val. recall, over-esc. | held-out AUROC | held-out recall | held-out over-esc. | "
        "held-out escalated (right, needless) | minutes (adapter) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + ["| " + " | ".join(r) + " |" for r in table]
    publish(args.name, lines)


if __name__ == "__main__":
    main()
