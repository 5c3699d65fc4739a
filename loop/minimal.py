"""The whole idea in one synchronous function: no Ray, no store, no scheduler. Read this first.

    python -m loop.minimal --rounds 2 --tickets 40 --eval-tickets 10

Round 1 clones teacher demonstrations; every later round rolls the student out, lets the teacher
correct each trajectory's FIRST wrong step (the student continues from there), and retrains on
everything kept so far. Each adapter gets its operating point τ on p(escalate), fitted on
validation tickets of the training companies, and is gated against the previous best on held-out
companies.
The full version, with the store, Ray workers and operators, is loop/round.py.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from environments.builtin import build_packs
from loop.calibration import fit_operating_point, save_operating_point
from loop.correct import score_correct
from loop.evaluate import evaluate, run_episodes, training_pool
from loop.gate import gate
from loop.metrics import TicketOutcome
from loop.round import training_messages
from loop.train import LoraSettings, train_adapter
from policies.hf import HFStudent
from policies.models import resolve_model
from policies.policy import StudentPolicy, TeacherPolicy
from policies.teacher import OracleTeacher


def minimal_loop(rounds: int, tickets: int, eval_tickets: int, model: str, out: Path) -> None:
    packs = build_packs(0)
    train_packs = [p for p in packs if p.company.split == "train"]
    heldout = [p for p in packs if p.company.split == "heldout"]
    model_dir = resolve_model(model)
    student, teacher = HFStudent(model_dir, max_new_tokens=128), OracleTeacher()
    policy = StudentPolicy(student)
    best = [TicketOutcome.of(r) for r in evaluate(policy, heldout, limit=eval_tickets)]  # the base model
    best_adapter: Path | None = None
    conversations: list[list[dict[str, str]]] = []  # aggregated over rounds, never reset
    for round_no in range(1, rounds + 1):
        rng = random.Random(round_no)
        work = rng.sample(training_pool(train_packs), tickets)  # never a validation ticket
        if round_no == 1:  # warm start: the teacher plays every step
            episodes = run_episodes(TeacherPolicy(teacher, privileged=True), work)
            kept = [e for e in episodes if e.result().resolved]
        else:  # SCoRe: the student acts, the teacher repairs its first error, the student goes on
            rollouts = run_episodes(policy, work)
            kept = [c.current for c in score_correct(policy, teacher, rollouts, rng=rng) if c.kept]
        conversations += [training_messages(e) for e in kept]
        adapter = out / f"round{round_no}"
        # from the weights of the adapter that collected (none in round 1): each round adds its pass
        settings = LoraSettings(epochs=1, learning_rate=1e-3, start_from=str(best_adapter or ""))
        result = train_adapter(model_dir, conversations, adapter, settings)
        student.load_adapter(adapter)
        save_operating_point(fit_operating_point(student, train_packs), adapter)  # τ on validation tickets
        student.load_adapter(adapter)  # now escalating exactly when p(escalate) >= τ
        candidate = [TicketOutcome.of(r) for r in evaluate(policy, heldout, limit=eval_tickets)]
        verdict = gate(candidate, best)
        print(f"round {round_no}: {len(kept)} kept, {len(conversations)} examples, loss {result.train_loss:.3f}, τ {student.threshold}, "
              f"J {verdict.candidate.metrics['calibration_j']}, gate {'pass' if verdict.passed else 'fail'}: {verdict.reason}")
        if verdict.passed:  # the next candidate must beat this one, and collects the next data
            best, best_adapter = candidate, adapter
        else:
            student.load_adapter(best_adapter)


def main() -> None:
    parser = argparse.ArgumentParser(description="apprentice's loop in one function (no Ray, no store).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tickets", type=int, default=40, help="training tickets per round")
    parser.add_argument("--eval-tickets", type=int, default=10, help="held-out tickets per company")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        minimal_loop(args.rounds, args.tickets, args.eval_tickets, args.model, Path(out))


if __name__ == "__main__":
    main()
