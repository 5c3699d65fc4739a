"""The `apprentice` command line. Every command has --help; data-printing commands have --json."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from environments.actions import REASONS, RESOLUTIONS
from environments.pack import Pack, PackError, check_pack, load_packs

console = Console(width=None if sys.stdout.isatty() else 200)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """apprentice: keeps a small customer-support agent improving (SCoRe active distillation)."""


# --- packs ------------------------------------------------------------------------------------


@main.group()
def packs() -> None:
    """Build, check and list company packs."""


@packs.command("build")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write one pack folder per company into.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the procedural generator.")
def packs_build(out: Path, seed: int) -> None:
    """Write the built-in company packs (train and held-out) into OUT."""
    from environments.builtin import write_packs

    paths = write_packs(out, seed=seed)
    console.print(f"wrote {len(paths)} packs to {out}")


@packs.command("check")
@click.argument("pack_dir", type=click.Path(path_type=Path))
def packs_check(pack_dir: Path) -> None:
    """Validate the pack in PACK_DIR: print every problem with file and line (exit 2), or a summary."""
    problems = check_pack(pack_dir)
    if problems:
        for p in problems:
            click.echo(f"{pack_dir / p.file}{':' + str(p.line) if p.line is not None else ''}: {p.message}", err=True)
        click.echo(f"{len(problems)} problem(s) in {pack_dir}", err=True)
        sys.exit(2)
    pack = load_packs(pack_dir)[0]
    click.echo(f"ok: {pack.id} ({pack.company.split}) with {len(pack.articles)} articles and {len(pack.tickets)} tickets")


@packs.command("list")
@click.argument("packs_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def packs_list(packs_dir: Path, as_json: bool) -> None:
    """List the companies in PACKS_DIR: split, and ticket counts by resolution and reason."""
    loaded = _load_or_exit([packs_dir])
    rows = []
    for pack in loaded:
        turns = [turn for t in pack.tickets for turn in t.turns]
        rows.append({
            "company": pack.id, "domain": pack.company.domain, "split": pack.company.split,
            "articles": len(pack.articles), "tickets": len(pack.tickets),
            "resolutions": dict(Counter(t.truth.resolution for t in pack.tickets)),
            "reasons": dict(Counter(t.escalation_reason for t in turns if t.escalation_reason)),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"packs in {packs_dir}")
    for col in ("company", "domain", "split", "articles", "tickets", *RESOLUTIONS, *REASONS):
        table.add_column(col.replace("_", " "), justify="right" if col not in ("company", "domain", "split") else "left")
    for r in rows:
        table.add_row(
            r["company"], r["domain"], r["split"], str(r["articles"]), str(r["tickets"]),
            *(str(r["resolutions"].get(k, 0)) for k in RESOLUTIONS), *(str(r["reasons"].get(k, 0)) for k in REASONS),
        )
    console.print(table)


def _load_or_exit(dirs: list[Path]) -> list[Pack]:
    try:
        return [p for d in dirs for p in load_packs(d)]
    except PackError as e:
        click.echo(str(e), err=True)
        sys.exit(2)


# --- eval -------------------------------------------------------------------------------------


@main.command("eval")
@click.option("--policy", "policy_name", default="oracle", show_default=True,
              help="oracle | always-escalate | always-reply | keyword | student | teacher:<litellm model>.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Student base model (with --policy student).")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), default=None, help="LoRA adapter folder for the student.")
@click.option("--4bit", "load_in_4bit", is_flag=True, help="Load the student's base in 4-bit NF4 (bitsandbytes).")
@click.option("--json-mode", is_flag=True, help="Constrain the student's output to start and end as one JSON object (reported).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Student prompts per generation call.")
@click.option("--api-base", default=None, help="Base URL for a teacher:<model> policy (e.g. a vLLM server).")
@click.option("--pack", "pack_dirs", multiple=True, type=click.Path(path_type=Path), help="A pack folder or a folder of packs (repeatable). Default: the built-in held-out packs.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N tickets of each pack's fixed evaluation order.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Record the episodes and steps in this SQLite store.")
def eval_cmd(policy_name: str, model: str, adapter: Path | None, load_in_4bit: bool, json_mode: bool, batch_size: int,
             api_base: str | None, pack_dirs: tuple[Path, ...], limit: int | None, as_json: bool, db: Path | None) -> None:
    """Run a policy over company packs and print its metrics with 95% bootstrap intervals."""
    from loop.evaluate import evaluate
    from loop.metrics import TicketOutcome, report
    from policies.policy import StudentPolicy, TeacherPolicy, baseline

    adapter_version = None
    if policy_name == "student":
        from policies.hf import HFStudent
        from policies.models import resolve_model

        student = HFStudent(resolve_model(model), adapter=adapter, load_in_4bit=load_in_4bit, batch_size=batch_size, json_mode=json_mode)
        policy = StudentPolicy(student, name="student" + (" (json-mode)" if json_mode else ""))
        adapter_version = adapter.name if adapter else None
    elif policy_name.startswith("teacher:"):
        from policies.litellm_teacher import LiteLLMTeacher

        policy = TeacherPolicy(LiteLLMTeacher(policy_name.removeprefix("teacher:"), api_base=api_base), privileged=False)
    else:
        try:
            policy = baseline(policy_name)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--policy") from None
    loaded = _load_or_exit(list(pack_dirs)) if pack_dirs else _builtin_heldout()
    results = evaluate(policy, loaded, limit=limit, progress=not as_json)
    if db is not None:
        from loop.records import record_eval
        from store import Store

        record_eval(Store.open(db), "student" if policy_name == "student" else policy.name, loaded, results, adapter_version=adapter_version)
    rep = report([TicketOutcome.of(r) for r in results])
    if as_json:
        click.echo(json.dumps({"policy": policy.name, **rep.as_json()}, indent=2))
        return
    _print_report(f"{policy.name} on {', '.join(p.id for p in loaded)}", rep)


def _builtin_heldout() -> list[Pack]:
    from environments.builtin import build_packs

    return [p for p in build_packs() if p.company.split == "heldout"]


def _print_report(title: str, rep) -> None:
    table = Table(title=f"{title} ({rep.n_tickets} tickets; 95% bootstrap CI)")
    table.add_column("metric")
    table.add_column("overall", justify="right")
    for company in rep.per_company:
        table.add_column(company, justify="right")
    for name, est in rep.metrics.items():
        table.add_row(name, str(est), *(str(r.metrics[name]) for r in rep.per_company.values()))
    console.print(table)


# --- the loop ---------------------------------------------------------------------------------


def _config(config_file: Path | None, sets: tuple[str, ...], **direct):
    from ops.config import load_config, parse_overrides

    overrides = {k: v for k, v in direct.items() if v is not None}
    try:
        return load_config(config_file, {**parse_overrides(sets), **overrides})
    except (ValueError, OSError) as e:
        raise click.UsageError(str(e)) from None


_config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                              help="TOML config file (see apprentice.toml for every key).")
_set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key (repeatable).")


@main.command("run")
@click.option("--rounds", type=int, default=None, help="Run N rounds and exit with a summary table.")
@_config_option
@_set_option
@click.option("--db", default=None, help="SQLite store (config: db).")
@click.option("--method", type=click.Choice(["score", "offline"]), default=None, help="score (SCoRe) or offline (demonstrations only).")
@click.option("--auto-approve", is_flag=True, default=None, help="Promote a candidate that passes the gate without an operator.")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of starting a local one.")
def run_cmd(rounds: int | None, config_file: Path | None, sets: tuple[str, ...], db: str | None, method: str | None,
            auto_approve: bool | None, ray_address: str | None) -> None:
    """Run the loop: rollouts, SCoRe corrections, training, evaluation and the gate."""
    from ops.run import build_runtime, run_rounds

    cfg = _config(config_file, sets, db=db, method=method, auto_approve=auto_approve, ray_address=ray_address)
    if rounds is None:
        raise click.UsageError("the long-running daemon is not built yet: pass --rounds N")
    if rounds < 1:
        raise click.BadParameter("must be at least 1", param_hint="--rounds")
    rt = build_runtime(cfg)
    summaries = run_rounds(rt, rounds, on_round=lambda s: console.print(f"round {s.round}: {s.version} {s.gate} ({s.gate_reason})"))
    _print_summary(rt.store, summaries)


def _ci(metrics: dict, name: str) -> str:
    value, (low, high) = metrics.get(name), metrics.get(f"{name}_ci", (None, None))
    if value is None:
        return "n/a"
    return f"{value:.2f} [{low:.2f},{high:.2f}]" if low is not None else f"{value:.2f}"


def _print_summary(store, summaries) -> None:
    from loop.metrics import report
    from loop.records import outcomes_of

    table = Table(title="apprentice run: held-out metrics (95% bootstrap CI)")
    for col in ("round", "collector", "examples+", "teacher calls", "teacher tokens", "train loss", "adapter", "recall", "over-esc", "J", "valid JSON", "ΔJ vs", "gate"):
        table.add_column(col)
    base = report(outcomes_of(store.evaluations("base")), by_company=False).as_json()
    table.add_row("-", "-", "-", "-", "-", "-", "base", _ci(base, "escalation_recall"), _ci(base, "over_escalation_rate"),
                  _ci(base, "calibration_j"), _ci(base, "valid_json_rate"), "-", "-")
    for s in summaries:
        u, m = s.teacher_usage, s.metrics
        d = m.get("delta_calibration_j", [None, None, None])
        table.add_row(str(s.round), s.collector, str(s.examples_added), str(u.calls), str(u.prompt_tokens + u.completion_tokens),
                      f"{s.train_loss:.3f}" if s.train_loss is not None else "-", s.version or "-",
                      _ci(m, "escalation_recall"), _ci(m, "over_escalation_rate"), _ci(m, "calibration_j"), _ci(m, "valid_json_rate"),
                      f"{m.get('delta_vs')}: {d[0]:+.2f} [{d[1]:+.2f},{d[2]:+.2f}]" if d[0] is not None else "-", s.gate)
    console.print(table)


@main.command("adapters")
@click.option("--db", default="apprentice.db", show_default=True, help="SQLite store.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def adapters_cmd(db: str, as_json: bool) -> None:
    """List adapter versions with status and headline held-out metrics."""
    from store import Store

    if not Path(db).exists():
        raise click.UsageError(f"no store at {db}")
    store = Store.open(db)
    promoted = store.promoted_version()
    rows = [{"version": a.version, "status": a.status, "parent": a.parent, "promoted": a.version == promoted,
             "train_loss": a.train_metrics.get("train_loss"), "created_at": a.created_at,
             **{k: a.metrics.get(k) for k in ("escalation_recall", "over_escalation_rate", "calibration_j", "valid_json_rate")},
             "gate_reason": a.gate_reason} for a in store.adapters()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"adapters in {db} (promoted: {promoted or 'base'})")
    for col in ("version", "status", "parent", "train loss", "recall", "over-esc", "J", "valid JSON", "gate reason"):
        table.add_column(col)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(r["version"], r["status"], r["parent"] or "base", fmt(r["train_loss"]), fmt(r["escalation_recall"]),
                      fmt(r["over_escalation_rate"]), fmt(r["calibration_j"]), fmt(r["valid_json_rate"]), r["gate_reason"] or "")
    console.print(table)


# --- operators ------------------------------------------------------------------------------


_db_option = click.option("--db", default="apprentice.db", show_default=True, help="SQLite store.")


def _open_store(db: str):
    from store import Store

    if not Path(db).exists():
        raise click.UsageError(f"no store at {db}")
    return Store.open(db)


def _decide(fn, *args, **kwargs):
    from loop.promotion import DecisionRefused

    try:
        return fn(*args, **kwargs)
    except DecisionRefused as e:
        click.echo(f"refused: {e}", err=True)
        sys.exit(1)


@main.command("approve")
@click.argument("version")
@click.option("--by", required=True, help="Who approves (kept in the decisions log).")
@click.option("--note", default="", help="Why.")
@click.option("--force", is_flag=True, help="Approve a version that failed the gate (needs --note).")
@_db_option
def approve_cmd(version: str, by: str, note: str, force: bool, db: str) -> None:
    """Promote VERSION: rollout workers switch to it."""
    from loop.promotion import approve

    _decide(approve, _open_store(db), version, by=by, note=note, force=force)
    click.echo(f"{version} promoted by {by}")


@main.command("reject")
@click.argument("version")
@click.option("--by", required=True, help="Who rejects (kept in the decisions log).")
@click.option("--note", required=True, help="Why.")
@_db_option
def reject_cmd(version: str, by: str, note: str, db: str) -> None:
    """Reject VERSION: it is never promoted nor used for collection."""
    from loop.promotion import reject

    _decide(reject, _open_store(db), version, by=by, note=note)
    click.echo(f"{version} rejected by {by}")


@main.command("rollback")
@click.argument("version", required=False)
@click.option("--by", required=True, help="Who rolls back (kept in the decisions log).")
@click.option("--note", required=True, help="Why.")
@_db_option
def rollback_cmd(version: str | None, by: str, note: str, db: str) -> None:
    """Move the promoted pointer back to VERSION (default: the one promoted before; else the base)."""
    from loop.promotion import rollback

    target = _decide(rollback, _open_store(db), version, by=by, note=note)
    click.echo(f"promoted: {target or 'base model'} (rolled back by {by})")


if __name__ == "__main__":
    main()
