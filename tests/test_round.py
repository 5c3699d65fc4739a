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
