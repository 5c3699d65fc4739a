"""Full rounds with Ray on CPU and the tiny model, through the real command line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from store import Store

ACME = Path(__file__).parent / "data" / "acme"


def two_company_packs(root: Path) -> Path:
    """acme (train) and a held-out copy of it under another id."""
    shutil.copytree(ACME, root / "acme")
    heldout = Path(shutil.copytree(ACME, root / "acme-heldout"))
    text = (heldout / "company.yaml").read_text().replace("id: acme-widgets", "id: acme-heldout").replace("split: train", "split: heldout")
    (heldout / "company.yaml").write_text(text)
    return root


@pytest.mark.slow
def test_two_rounds_through_apprentice_run(tiny_model_dir, tmp_path):
    packs = two_company_packs(tmp_path / "packs")
    db = tmp_path / "a.db"
    settings = {"packs": packs, "model": tiny_model_dir, "adapters_dir": tmp_path / "adapters", "warm_start_tickets": 6,
                "rollout_tickets": 6, "eval_tickets": 7, "max_new_tokens": 24, "epochs": 1, "rollout_workers": 1, "selection": "mixed"}
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "ops.cli", "run", "--rounds", "2", "--db", str(db), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "apprentice run: held-out metrics" in proc.stdout

    store = Store.open(db)
    adapters = store.adapters()
    assert [a.version for a in adapters] == ["v0001", "v0002"]
    for a in adapters:
        assert a.status in ("awaiting_approval", "rejected_by_gate") and a.gate_reason
        assert a.metrics["n_tickets"] == 7 and "calibration_j_ci" in a.metrics
        assert a.train_metrics["steps"] >= 1 and a.config["examples"] >= 1
        assert (Path(a.path) / "adapter_model.safetensors").exists() and (Path(a.path) / "probe.json").exists()
        assert [e.ticket_id for e in store.evaluations(a.version)] == [e.ticket_id for e in store.evaluations("base")]
    assert {d.adapter_version for d in store.decisions() if d.action == "gate"} == {"v0001", "v0002"}
    # Round 1 cloned the teacher's demonstrations; round 2 rolled the student out and corrected it.
    assert store.episodes(run_kind="demonstration") and store.examples(source="demonstration")
    assert len(store.episodes(run_kind="rollout")) == 6
    assert store.corrections()  # a random tiny model errs on its first step: the teacher repaired it
    assert all(e.company_id == "acme-widgets" for e in store.examples())  # never the held-out company
    # the SCoRe collection picked its tickets by the configured rule, and the free oracle was charged in tokens
    [pick] = [e.payload for e in store.events(kind="selected")]
    assert pick["rule"] == "mixed" and pick["tickets"] == 6 and pick["mean_distance"] is not None
    assert all(e.payload["teacher_tokens"] > 100 * e.payload["teacher_calls"] > 0 for e in store.events(kind="collected"))
    status = subprocess.run([sys.executable, "-m", "ops.cli", "status", "--db", str(db)], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert "last ticket selection: mixed, 6 tickets (round 2)" in status.stdout


@pytest.mark.slow
def test_minimal_loop_runs_two_rounds(tiny_model_dir, tmp_path, capsys):
    from loop.minimal import minimal_loop

    minimal_loop(rounds=2, tickets=4, eval_tickets=2, model=str(tiny_model_dir), out=tmp_path)
    printed = capsys.readouterr().out
    assert "round 1:" in printed and "round 2:" in printed
    assert (tmp_path / "round1" / "adapter_model.safetensors").exists() and (tmp_path / "round2" / "probe.json").exists()


def test_tau_is_fitted_on_training_companies_left_out_of_training(tiny_model_dir, tmp_path, monkeypatch):
    """With `validation_companies`, whole training companies (every policy draw) are never trained on
    (not collected, not in the dataset even when the store holds their examples) and τ is fitted on them."""
    from environments.builtin import build_packs
    from loop import round as round_module
    from loop.records import register_packs
    from loop.round import RoundSettings, RoundSummary, Runtime, collect_demonstrations, ensure_base_evaluated, retrain
    from loop.train import LoraSettings, train_adapter
    from policies.hf import HFStudent
    from policies.protocol import system_prompt
    from policies.teacher import OracleTeacher
    from store import ExampleRow

    packs = build_packs(0, redraws=1)
    trained_on, fitted_on = [], []

    def train(model_dir, conversations, out_dir, settings):
        trained_on.extend(c[0]["content"] for c in conversations)
        return train_adapter(model_dir, conversations, out_dir, settings, progress=False)

    def fit(student, fit_packs, **kwargs):
        fitted_on.append(([p.id for p in fit_packs], kwargs["per_company"]))
        return real_fit(student, fit_packs, **kwargs)

    real_fit = round_module.fit_operating_point
    monkeypatch.setattr(round_module, "fit_operating_point", fit)
    store = Store.open(tmp_path / "a.db")
    rt = Runtime(store=store, packs=packs, student=HFStudent(tiny_model_dir, max_new_tokens=16, batch_size=4),
                 teacher=OracleTeacher(), train=train, model_dir=tiny_model_dir, base_model="tiny", adapters_dir=tmp_path / "adapters",
                 settings=RoundSettings(eval_tickets=1, max_steps=6, escalation_share=0.0, calibration_tickets=1, validation_companies=2),
                 lora=LoraSettings(epochs=1, batch_size=4), progress=False)
    left_out = rt.left_out
    assert len(left_out) == 2 and {p.company.name for p in rt.validation_packs} == left_out
    assert len(rt.validation_packs) == 4 and not {p.id for p in rt.validation_packs} & {p.id for p in rt.train_packs}
    register_packs(store, packs)
    ensure_base_evaluated(rt)
    # the store holds a left-out company's demonstrations too (say, from before the setting): never trained on
    work = [(rt.validation_packs[0], rt.validation_packs[0].tickets[0])] + [(p, p.tickets[0]) for p in rt.train_packs[:3]]
    collect_demonstrations(rt, work, 1)
    # ... but a corrected production trace of a left-out company is trained on: the production loop is for it
    production = [m for m in store.examples()[0].messages]
    production[0] = {"role": "system", "content": "production prompt of " + rt.validation_packs[1].id}
    store.add_examples([ExampleRow(source="production", company_id=rt.validation_packs[1].id, messages=production, has_escalation=False)])
    retrain(rt, 1, RoundSummary(1, "test"))
    assert set(trained_on) == {system_prompt(p.company) for p in rt.train_packs[:3]} | {production[0]["content"]}
    # as many tickets as one per training pack (20 packs), from the 4 packs of the companies left out
    assert fitted_on == [([p.id for p in rt.validation_packs], 5)]
    few = Runtime(store=store, packs=[p for p in packs if p.company.name in left_out or p.company.split == "heldout"], student=None,
                  teacher=None, train=None, model_dir=tmp_path, base_model="tiny", adapters_dir=tmp_path, settings=rt.settings, lora=rt.lora)
    assert few.left_out == frozenset() and few.validation_packs == few.train_packs  # 2 training companies: too few to leave any out


def test_a_later_round_starts_from_the_adapter_that_collected(tiny_model_dir, tmp_path):
    """With `continue_training`, the next adapter starts from the collecting adapter's weights when its
    LoRA shape matches, on the examples new since that one and `replay` times as many older ones, at
    `continued_learning_rate`; another shape, or the setting off, trains a fresh one on every example
    at the LoRA settings' own rate."""
    from dataclasses import replace

    from environments.builtin import build_packs
    from loop.records import register_packs
    from loop.round import RoundSettings, RoundSummary, Runtime, collect_demonstrations, ensure_base_evaluated, retrain
    from loop.train import LoraSettings, train_adapter
    from policies.hf import HFStudent
    from policies.teacher import OracleTeacher

    started = []

    def train(model_dir, conversations, out_dir, settings):
        started.append((settings.start_from, settings.learning_rate))
        return train_adapter(model_dir, conversations, out_dir, settings, progress=False)

    store = Store.open(tmp_path / "a.db")
    rt = Runtime(store=store, packs=build_packs(0), student=HFStudent(tiny_model_dir, max_new_tokens=16, batch_size=4),
                 teacher=OracleTeacher(), train=train, model_dir=tiny_model_dir, base_model="tiny", adapters_dir=tmp_path / "adapters",
                 settings=RoundSettings(eval_tickets=1, max_steps=6, calibration_tickets=1, validation_companies=0, collect_with="newest",
                                        replay=1.0, continued_learning_rate=5e-4),
                 lora=LoraSettings(r=4, alpha=8, epochs=1, batch_size=4, learning_rate=2e-3), progress=False)
    register_packs(store, rt.packs)
    ensure_base_evaluated(rt)
    collect_demonstrations(rt, [(p, p.tickets[0]) for p in rt.train_packs[:2]], 1)
    retrain(rt, 1, RoundSummary(1, "test"))  # nothing trained yet: fresh
    collect_demonstrations(rt, [(p, p.tickets[1]) for p in rt.train_packs[:1]], 2)
    retrain(rt, 2, RoundSummary(2, "test"))  # from v0001, the newest: its new example and one older one
    rt.lora = replace(rt.lora, r=8)
    retrain(rt, 3, RoundSummary(3, "test"))  # v0002's rank differs: fresh
    rt.settings = replace(rt.settings, continue_training=False)
    retrain(rt, 4, RoundSummary(4, "test"))
    v1 = store.adapter("v0001").path
    assert started == [("", 2e-3), (v1, 5e-4), ("", 2e-3), ("", 2e-3)]
    assert store.adapter("v0002").config["start_from"] == v1 and store.adapter("v0002").parent == "v0001"
    assert [e.payload["start_from"] for e in store.events(kind="training_started")] == [None, "v0001", None, None]
    assert [store.adapter(v).config["examples"] for v in ("v0001", "v0002", "v0003", "v0004")] == [2, 2, 3, 3]
    assert store.adapter("v0002").config["examples_through"] == 3  # it has seen every example, through v0001


def test_a_thought_first_round_trains_on_thoughts_first_and_stores_apprentice_s_order(tiny_model_dir, tmp_path):
    """With `thought_first` (config: thought_samples > 0) the adapter trains on every step and on the
    contract's example written thought first, as its sampling student reads them; the store keeps
    apprentice's own order, so the same examples can train either kind of student."""
    from environments.builtin import build_packs
    from loop.records import register_packs
    from loop.round import RoundSettings, RoundSummary, Runtime, collect_demonstrations, ensure_base_evaluated, retrain
    from loop.train import LoraSettings, train_adapter
    from policies.hf import HFStudent
    from policies.protocol import THOUGHT_FIRST, reorder, step_example
    from policies.teacher import OracleTeacher

    trained_on = []

    def train(model_dir, conversations, out_dir, settings):
        trained_on.extend(conversations)
        return train_adapter(model_dir, conversations, out_dir, settings, progress=False)

    store = Store.open(tmp_path / "a.db")
    rt = Runtime(store=store, packs=build_packs(0), student=HFStudent(tiny_model_dir, max_new_tokens=16, batch_size=4, thought_samples=2),
                 teacher=OracleTeacher(), train=train, model_dir=tiny_model_dir, base_model="tiny", adapters_dir=tmp_path / "adapters",
                 settings=RoundSettings(eval_tickets=1, max_steps=4, calibration_tickets=1, validation_companies=0, thought_first=True),
                 lora=LoraSettings(r=4, alpha=8, epochs=1, batch_size=4), progress=False)
    register_packs(store, rt.packs)
    ensure_base_evaluated(rt)
    collect_demonstrations(rt, [(p, p.tickets[0]) for p in rt.train_packs[:2]], 1)
    retrain(rt, 1, RoundSummary(1, "test"))
    steps = [m["content"] for c in trained_on for m in c if m["role"] == "assistant"]
    assert steps and all(s.startswith('{"thought":') for s in steps)
    assert all(step_example(THOUGHT_FIRST) in c[0]["content"] and step_example() not in c[0]["content"] for c in trained_on)
    stored = [m["content"] for e in store.examples() for m in e.messages if m["role"] == "assistant"]
    assert all(s.startswith('{"action":') for s in stored) and {reorder(s, THOUGHT_FIRST) for s in stored} == set(steps)
    assert store.adapter("v0001").status in ("rejected_by_gate", "awaiting_approval")  # calibrated and evaluated by the sampling student


def test_a_comparisons_first_round_trains_the_comparing_steps_thought_first(tiny_model_dir, tmp_path):
    """With `comparisons_first` the adapter trains on the refund-window ticket's opening step thought
    first and on every other step action first; the store keeps apprentice's own order."""
    from environments.builtin import build_packs
    from loop.records import register_packs
    from loop.round import RoundSettings, RoundSummary, Runtime, collect_demonstrations, ensure_base_evaluated, retrain
    from loop.train import LoraSettings, train_adapter
    from policies.hf import HFStudent
    from policies.protocol import compares_numbers
    from policies.teacher import OracleTeacher

    trained_on = []

    def train(model_dir, conversations, out_dir, settings):
        trained_on.extend(conversations)
        return train_adapter(model_dir, conversations, out_dir, settings, progress=False)

    store = Store.open(tmp_path / "a.db")
    rt = Runtime(store=store, packs=build_packs(0), student=HFStudent(tiny_model_dir, max_new_tokens=16, batch_size=4, json_mode=True,
                                                                      comparisons_first=True),
                 teacher=OracleTeacher(), train=train, model_dir=tiny_model_dir, base_model="tiny", adapters_dir=tmp_path / "adapters",
                 settings=RoundSettings(eval_tickets=1, max_steps=4, calibration_tickets=1, validation_companies=0, comparisons_first=True,
                                        calibration_states="student"),
                 lora=LoraSettings(r=4, alpha=8, epochs=1, batch_size=4), progress=False)
    register_packs(store, rt.packs)
    ensure_base_evaluated(rt)
    pack = rt.train_packs[0]
    refund = next(t for t in pack.tickets if t.truth.intent == "refund_request")
    other = next(t for t in pack.tickets if t.truth.intent not in ("refund_request", "team_pricing"))
    collect_demonstrations(rt, [(pack, refund), (pack, other)], 1)
    retrain(rt, 1, RoundSummary(1, "test"))
    steps = [m["content"] for c in trained_on for m in c if m["role"] == "assistant"]
    first = [s for s in steps if s.startswith('{"thought":')]
    assert first and all(compares_numbers(s) for s in first)
    assert all(s.startswith('{"action":') and not compares_numbers(s) for s in steps if s not in first)
    stored = [m["content"] for e in store.examples() for m in e.messages if m["role"] == "assistant"]
    assert all(s.startswith('{"action":') for s in stored)
    assert store.adapter("v0001").status in ("rejected_by_gate", "awaiting_approval")  # calibrated and evaluated by that student
    assert store.adapter("v0001").train_metrics["operating_point"]["states"] == "student"  # τ on its own path
