"""Collection at equal teacher tokens: which tickets to roll out, and SCoRe against offline distillation.

    .venv/bin/python bench/active.py                          # uniform vs mixed, one SCoRe round each
    .venv/bin/python bench/active.py --arms uniform,offline   # SCoRe vs the teacher demonstrating fresh tickets
    .venv/bin/python bench/active.py --warm DIR               # reuse the warm adapter a run printed (same --warm-tickets, --seed)

Every arm starts from the same warm-start adapter and the same warm-start demonstrations (oracle,
`--warm-tickets` training tickets), collects ONCE with the round's own functions, retrains a fresh
adapter on warm-start + what it kept (escalations oversampled to `--escalation-share`, as a round
does), fits its τ on validation tickets and plays greedy episodes on `--eval-tickets` per held-out
company. A SCoRe arm (`uniform`, `mixed`, `uncertainty`: loop/selection.py's rule) rolls its pick
out and repairs first errors (loop/correct.py); the `offline` arm (`apprentice run --method
offline`) has the teacher demonstrate fresh tickets in full. The oracle teacher is charged in the
student's tokens. The first arm rolls out (or demonstrates) `--tickets` tickets and sets the
teacher-token budget; every later arm collects in chunks until it has spent as much: equal
budgets, not equal ticket counts.

Reports per arm: teacher tokens, tickets collected, repairs per 1,000 teacher tokens, the share of
rollouts that needed no repair, held-out J; and each later arm − the first, ΔJ with a paired
bootstrap CI over the same held-out tickets.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from environments.builtin import build_packs
from loop.calibration import fit_operating_point, save_operating_point
from loop.correct import score_correct
from loop.dataset import oversample_escalations
from loop.evaluate import evaluate, run_episodes, training_pool
from loop.metrics import TicketOutcome, compare, report
from loop.round import training_messages
from loop.selection import select_tickets
from loop.train import LoraSettings, train_adapter
from policies.hf import HFStudent
from policies.models import resolve_model
from policies.policy import StudentPolicy, TeacherPolicy
from policies.student import operating_point
from policies.teacher import OracleTeacher, Usage
from report import publish  # bench/report.py: the script's folder is on sys.path

CHUNK = 8  # tickets rolled out between budget checks (the mixed arm's last chunk is sized to the budget left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", default="", help="warm-start adapter folder, trained on the same --warm-tickets (its τ is fitted when it has none); default: train one")
    parser.add_argument("--warm-tickets", type=int, default=200, help="oracle demonstrations the warm start (and both retrains) use")
    parser.add_argument("--arms", default="uniform,mixed", help="comma-separated, of uniform, mixed, uncertainty, offline; the first sets the budget")
    parser.add_argument("--tickets", type=int, default=60, help="tickets the first arm collects (sets the teacher-token budget)")
    parser.add_argument("--pool", type=int, default=3, help="candidates scored per ticket picked (selection_pool)")
    parser.add_argument("--eval-tickets", type=int, default=30, help="held-out tickets per company, greedy at τ")
    parser.add_argument("--calibration-tickets", type=int, default=10, help="validation tickets per training company τ is fitted on")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--escalation-share", type=float, default=0.3, help="escalation turns oversampled to this share (escalation_share)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--redraws", type=int, default=4, help="policy redraws of the training companies (the policy_redraws default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="active", help="report name under bench/reports/")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    clock = time.perf_counter()

    packs = build_packs(args.seed, args.redraws)
    per_company = max(1, args.calibration_tickets // (1 + args.redraws))  # spread over the draws, as ops/run.py does
    train_packs = [p for p in packs if p.company.split == "train"]
    heldout = [p for p in packs if p.company.split == "heldout"]
    model_dir = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = HFStudent(model_dir, max_new_tokens=128, batch_size=8)
    lora = LoraSettings(epochs=1, batch_size=8, learning_rate=args.lr, seed=args.seed)
    out = Path(tempfile.mkdtemp(prefix="active-"))

    pool = training_pool(train_packs)
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    warm_work, rest = pool[:args.warm_tickets], pool[args.warm_tickets:]  # the rollouts never repeat a warm-start ticket
    demos = run_episodes(TeacherPolicy(OracleTeacher(), privileged=True), warm_work, max_steps=args.max_steps, progress=False)
    warm_conversations = [training_messages(e) for e in demos if e.result().resolved]
    warm = Path(args.warm) if args.warm else out / "warm"
    if not args.warm:
        train_adapter(model_dir, oversample_escalations(warm_conversations, args.escalation_share, seed=args.seed), warm, lora,
                      progress=False)
    if operating_point(warm) is None:
        student.load_adapter(warm)
        save_operating_point(fit_operating_point(student, train_packs, per_company=per_company), warm)
    print(f"warm start: {len(warm_conversations)} demonstrations, adapter {warm} ({time.perf_counter() - clock:.0f} s)", flush=True)

    arms, budget = {}, None
    for rule in args.arms.split(","):
        student.load_adapter(warm)
        policy = StudentPolicy(student)
        teacher = OracleTeacher(count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids))
        n = args.tickets if budget is None else args.tickets * 3 // 2  # a later arm stops at the budget, not at a count
        if rule == "offline":  # fresh tickets, demonstrated in full (never a warm-start ticket)
            tickets, distance = random.Random(args.seed + 1).sample(rest, n), None
        else:
            pick = select_tickets(student, rest, n, rule=rule, tau=operating_point(warm), rng=random.Random(args.seed + 1),
                                  pool_factor=args.pool)
            tickets, distance = list(pick.tickets), pick.mean_distance
            random.Random(args.seed + 2).shuffle(tickets)  # chunks mix the nearest and the random half
        usage, kept, rollouts, repairs, clean = Usage(), [], 0, 0, 0
        start = 0
        while start < len(tickets):
            spent = usage.prompt_tokens + usage.completion_tokens
            size = CHUNK
            if budget is not None:
                if spent >= budget:
                    break
                if rollouts:  # the last chunk sized to what is left of the budget, so the arms spend about the same
                    size = min(CHUNK, max(1, math.ceil((budget - spent) * rollouts / spent)))
            if rule == "offline":
                demonstrator = TeacherPolicy(teacher, privileged=True)
                chunk = run_episodes(demonstrator, tickets[start:start + size], max_steps=args.max_steps, progress=False)
                usage += demonstrator.usage
                rollouts += len(chunk)
                kept += [training_messages(e) for e in chunk if e.result().resolved]
            else:
                chunk = run_episodes(policy, tickets[start:start + size], max_steps=args.max_steps, progress=False)
                for item in score_correct(policy, teacher, chunk, rng=random.Random(args.seed + start)):
                    usage += item.usage
                    rollouts += 1
                    repairs += len(item.repairs)
                    clean += item.fate in ("clean", "clean_skipped")
                    kept += [training_messages(item.current)] if item.kept else []
            start += size
        tokens = usage.prompt_tokens + usage.completion_tokens
        budget = tokens if budget is None else budget
        adapter = out / rule
        conversations = oversample_escalations(warm_conversations + kept, args.escalation_share, seed=args.seed)
        result = train_adapter(model_dir, conversations, adapter, lora, progress=False)
        student.load_adapter(adapter)
        save_operating_point(fit_operating_point(student, train_packs, per_company=per_company), adapter)
        student.load_adapter(adapter)  # escalating at its τ
        outcomes = [TicketOutcome.of(r) for r in evaluate(policy, heldout, limit=args.eval_tickets, max_steps=args.max_steps,
                                                          progress=False)]
        arms[rule] = dict(tokens=tokens, calls=usage.calls, rollouts=rollouts, repairs=repairs, clean=clean, kept=len(kept),
                          tau=student.threshold, mean_distance=distance, loss=result.train_loss, outcomes=outcomes,
                          metrics=report(outcomes, by_company=False).metrics)
        print(f"{rule}: {rollouts} tickets, {tokens:,} teacher tokens, {repairs} repairs, {clean} clean, {len(kept)} kept, "
              f"J {arms[rule]['metrics']['calibration_j']} ({time.perf_counter() - clock:.0f} s)", flush=True)

    first, *later = arms
    lines = [
        f"# Collection at equal teacher tokens: {', '.join(arms)}",
        "",
        f"`bench/active.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items() if v != '')}`",
        "",
        f"Real SmolLM2-135M on {os.cpu_count()} CPU cores; oracle teacher charged in the student's tokens (what a model teacher's",
        f"judge and demonstrate prompts and answers would cost). Warm start: {len(warm_conversations)} oracle demonstrations; one",
        f"collection per arm, then a fresh adapter on warm start + kept (escalations oversampled to {args.escalation_share}), τ on",
        f"validation tickets, greedy on {args.eval_tickets} held-out tickets per company ({', '.join(p.id for p in heldout)}).",
        f"Whole run: {(time.perf_counter() - clock) / 60:.0f} min.",
        "",
        "| arm | teacher tokens | teacher calls | tickets | repairs per 1k tokens | rollouts needing no repair | kept | "
        "mean abs(p - τ) of the pick | τ after | valid JSON | recall | over-esc. | held-out J |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rule, a in arms.items():
        m = a["metrics"]
        dist = "-" if a["mean_distance"] is None else f"{a['mean_distance']:.2f}"
        per_1k = f"{1000 * a['repairs'] / max(a['tokens'], 1):.2f}" if rule != "offline" else "-"  # demonstrations repair nothing
        no_repair = f"{a['clean'] / max(a['rollouts'], 1):.2f}" if rule != "offline" else "-"
        lines.append(f"| {rule} | {a['tokens']:,} | {a['calls']} | {a['rollouts']} | {per_1k} | {no_repair} | {a['kept']} | {dist} | "
                     f"{a['tau']:.2g} | {m['valid_json_rate']} | {m['escalation_recall']} | {m['over_escalation_rate']} | "
                     f"{m['calibration_j']} |")
    lines.append("")
    for rule in later:
        delta = compare(arms[rule]["outcomes"], arms[first]["outcomes"]).delta
        lines.append(f"{rule} − {first}, paired over the same held-out tickets: ΔJ {delta['calibration_j']}, "
                     f"Δ valid JSON {delta['valid_json_rate']}.")
    publish(args.name, lines)


if __name__ == "__main__":
    main()
