"""The `apprentice` command line. Every command has --help; data-printing commands have --json."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from environments.actions import REASONS, RESOLUTIONS
from environments.pack import Pack, PackError, check_pack, load_packs

console = Console(width=None if sys.stdout.isatty() else 200)
# bitsandbytes asks, on every import on a CPU with AVX512-BF16, for a kernel it would download from
# a hub at run time; apprentice never downloads, and its fallback is what runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
@click.option("--json-mode/--no-json-mode", default=True, show_default=True,
              help="Decode the student under the protocol's JSON schema, as the loop does (config: json_mode); off is reported.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Student prompts per generation call.")
@click.option("--api-base", default=None, help="Base URL for a teacher:<model> policy (e.g. a vLLM server).")
@click.option("--pack", "pack_dirs", multiple=True, type=click.Path(path_type=Path), help="A pack folder or a folder of packs (repeatable). Default: the built-in held-out packs.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N tickets of each pack's fixed evaluation order.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Record the episodes and steps in this SQLite store.")
@click.option("--no-threshold", is_flag=True, help="Ignore the adapter's operating point τ: the raw greedy student.")
@click.option("--thought-samples", type=click.IntRange(0, 64), default=0, show_default=True,
              help="A thought-first student (config: thought_samples): decide on the mean p(escalate) over this many sampled thoughts.")
@click.option("--comparisons-first/--no-comparisons-first", default=True, show_default=True,
              help="An adapter may write a step thought first where it compares two numbers, under json_mode too, as the loop does (config: comparisons_first).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: reliability diagram and ROC of p(escalate), the operating point marked.")
def eval_cmd(policy_name: str, model: str, adapter: Path | None, load_in_4bit: bool, json_mode: bool, batch_size: int,
             api_base: str | None, pack_dirs: tuple[Path, ...], limit: int | None, as_json: bool, db: Path | None,
             no_threshold: bool, thought_samples: int, comparisons_first: bool, plot: Path | None) -> None:
    """Run a policy over company packs and print its metrics with 95% bootstrap intervals.

    With an adapter that carries an operating point τ the student escalates exactly when its
    p(escalate) ≥ τ (named `student@τ=…`); --no-threshold evaluates its raw greedy choice."""
    from loop.evaluate import evaluate
    from loop.metrics import TicketOutcome, report
    from policies.policy import StudentPolicy, TeacherPolicy, baseline

    adapter_version = None
    if policy_name == "student":
        from policies.hf import HFStudent
        from policies.models import resolve_model

        student = HFStudent(resolve_model(model), adapter=adapter, load_in_4bit=load_in_4bit, batch_size=batch_size, json_mode=json_mode,
                            use_threshold=not no_threshold, thought_samples=thought_samples, comparisons_first=comparisons_first)
        policy = StudentPolicy(student, name=student.name + ("" if json_mode else " (no json-mode)"))
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
    outcomes = [TicketOutcome.of(r) for r in results]
    rep = report(outcomes)
    if plot is not None:
        from loop.calibration import plot_calibration

        tau = student.threshold if policy_name == "student" else None
        plot_calibration(outcomes, tau, plot, title=f"{policy.name} on {', '.join(p.id for p in loaded)}")
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
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of readable console lines.")
def run_cmd(rounds: int | None, config_file: Path | None, sets: tuple[str, ...], db: str | None, method: str | None,
            auto_approve: bool | None, ray_address: str | None, log_json: bool) -> None:
    """Run the loop: rollouts, SCoRe corrections, training, evaluation and the gate.

    Without --rounds it runs as a daemon until SIGINT/SIGTERM: collecting continuously, retraining
    on a trigger, and resuming from the store after any stop.
    """
    from loop.daemon import AlreadyRunning, Daemon, Triggers, lock_store
    from ops.logs import configure_logging
    from ops.run import build_runtime, run_rounds

    configure_logging(json_lines=log_json)
    cfg = _config(config_file, sets, db=db, method=method, auto_approve=auto_approve, ray_address=ray_address)
    if rounds is not None and rounds < 1:
        raise click.BadParameter("must be at least 1", param_hint="--rounds")
    try:
        lock = lock_store(cfg.db)  # noqa: F841 - held until the process ends
    except AlreadyRunning as e:
        click.echo(f"refused: {e}", err=True)
        sys.exit(1)
    rt = build_runtime(cfg, progress=not log_json)
    if rounds is None:
        triggers = Triggers(retrain_min_examples=cfg.retrain_min_examples, retrain_every_minutes=cfg.retrain_every_minutes,
                            inbox=Path(cfg.inbox), inbox_every_s=cfg.inbox_every_seconds, agreements=cfg.production_agreements, weight=cfg.production_weight)
        daemon = Daemon(rt, cfg.db, triggers)
        code = daemon.run()
        # A unit abandoned on stop still runs in a worker thread that a normal exit would wait for,
        # and still calls Ray: shutting Ray down under it makes Ray's core worker end the process
        # with status 1 (seen in bench/chaos.py). Ray's head processes share this process's fate.
        if not daemon.abandoned:
            import ray

            ray.shutdown()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
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
    for col in ("round", "collector", "examples+", "teacher calls", "teacher tokens", "train loss", "adapter", "τ", "recall", "over-esc", "J",
                "valid JSON", "AUROC", "ΔJ vs", "gate"):
        table.add_column(col)
    base = report(outcomes_of(store.evaluations("base")), by_company=False).as_json()
    table.add_row("-", "-", "-", "-", "-", "-", "base", "-", _ci(base, "escalation_recall"), _ci(base, "over_escalation_rate"),
                  _ci(base, "calibration_j"), _ci(base, "valid_json_rate"), _ci(base, "escalation_auroc"), "-", "-")
    for s in summaries:
        u, m = s.teacher_usage, s.metrics
        d = m.get("delta_calibration_j", [None, None, None])
        table.add_row(str(s.round), s.collector, str(s.examples_added), str(u.calls), str(u.prompt_tokens + u.completion_tokens),
                      f"{s.train_loss:.3f}" if s.train_loss is not None else "-", s.version or "-",
                      f"{s.tau:.2g}" if s.tau is not None else "-",
                      _ci(m, "escalation_recall"), _ci(m, "over_escalation_rate"), _ci(m, "calibration_j"), _ci(m, "valid_json_rate"),
                      _ci(m, "escalation_auroc"),
                      f"{m.get('delta_vs')}: {d[0]:+.2f} [{d[1]:+.2f},{d[2]:+.2f}]" if d[0] is not None else "-", s.gate)
    console.print(table)


@main.group("adapters", invoke_without_command=True)
@click.option("--db", default="apprentice.db", show_default=True, help="SQLite store.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def adapters_cmd(ctx: click.Context, db: str, as_json: bool) -> None:
    """List adapter versions with status and headline held-out metrics (`adapters show V` for one)."""
    ctx.obj = {"db": db, "json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    store = _open_store(db)
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


@adapters_cmd.command("show")
@click.argument("version")
@click.option("--changed", type=int, default=5, show_default=True, help="How many changed tickets to print with transcripts.")
@click.pass_context
def adapters_show(ctx: click.Context, version: str, changed: int) -> None:
    """VERSION's per-company metrics next to the promoted version's, per-reason recall, and the
    held-out tickets whose outcome changed, with both transcripts."""
    from dataclasses import asdict

    from loop.status import adapter_details

    try:
        d = adapter_details(_open_store(ctx.obj["db"]), version)
    except KeyError as e:
        raise click.UsageError(str(e.args[0])) from None
    if ctx.obj["json"]:
        click.echo(json.dumps({"version": d.version, "baseline": d.baseline, "candidate": d.candidate.as_json(),
                               "baseline_metrics": d.promoted.as_json() if d.promoted else None,
                               "recall_by_reason": d.recall_by_reason, "trained_on": d.trained_on,
                               "operating_point": d.operating_point, "calibration_plot": d.calibration_plot,
                               "changed": [asdict(c) for c in d.changed]}, indent=2))
        return
    if d.trained_on:
        console.print(f"{version} trained on {sum(d.trained_on.values())} examples: "
                      + ", ".join(f"{n} {source}" for source, n in d.trained_on.items()))
    if d.operating_point:
        op = d.operating_point
        console.print(f"operating point τ = {op['tau']:.2f} (fitted on {op['n_tickets']} validation tickets: recall {op['recall']:.2f}, "
                      f"over-escalation {op['over_escalation']:.2f})")
    if d.calibration_plot:
        console.print(f"calibration plot: {d.calibration_plot}")
    _print_report(f"{version}", d.candidate)
    if d.promoted:
        _print_report(f"{d.baseline} (baseline)", d.promoted)
    table = Table(title=f"escalation recall by reason: {version} vs {d.baseline}")
    for col in ("reason", version, d.baseline):
        table.add_column(col)
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for reason, (c, b) in d.recall_by_reason.items():
        table.add_row(reason, fmt(c), fmt(b))
    console.print(table)
    console.print(f"{len(d.changed)} held-out tickets changed outcome")
    for c in d.changed[:changed]:
        verdict = "now resolved" if c.candidate_resolved else "now failed"
        console.print(f"\n{c.company_id}/{c.ticket_id}: {verdict}\n  {d.baseline}:")
        for line in c.baseline_transcript:
            console.print(f"    {line}", markup=False)
        console.print(f"  {version}:")
        for line in c.candidate_transcript:
            console.print(f"    {line}", markup=False)


# --- production traces ----------------------------------------------------------------------


@main.command("ingest")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@_config_option
@_set_option
@click.option("--db", default=None, help="SQLite store (config: db).")
@click.option("--correct", is_flag=True, help="Then have the configured (litellm) teacher correct every accepted trace now, as the daemon's inbox job does.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def ingest_cmd(files: tuple[Path, ...], config_file: Path | None, sets: tuple[str, ...], db: str | None, correct: bool, as_json: bool) -> None:
    """Store production traces (JSONL, OpenAI-messages or native format), one per line.

    Each line is validated on its own: a bad line is stored as rejected with an error naming it,
    and the good lines go on. Every version of a trace id is kept: the same content again is a
    duplicate (not stored twice), a valid line whose id was only rejected before is accepted (a
    fix), and other content under an accepted id is stored as a reported conflict. Exits 1 only
    when no line of any file could be read.
    """
    from loop.ingest import IngestSummary, ingest_file
    from loop.records import register_packs
    from ops.run import build_packs
    from store import Store

    cfg = _config(config_file, sets, db=db)
    if correct:  # refuse before storing anything
        from ops.run import build_teacher
        from policies.teacher import OracleTeacher

        teacher = build_teacher(cfg)
        if isinstance(teacher, OracleTeacher):
            raise click.UsageError("--correct needs a litellm teacher (--set teacher=...): the oracle knows only simulated tickets")
    packs = build_packs(cfg)
    store = Store.open(cfg.db)
    register_packs(store, packs)
    total = IngestSummary()
    for path in files:
        if not path.exists():
            click.echo(f"{path}: no such file", err=True)
            continue
        total.add(ingest_file(store, path, {p.id for p in packs}))
    out = {**total.counts(), "errors": total.errors, "conflicts": total.conflicts}
    if not as_json:
        fixed = f" ({total.fixed} fixing rejected versions)" if total.fixed else ""
        click.echo(f"accepted {total.accepted}{fixed}, duplicate {total.duplicate}, conflict {total.conflict}, rejected {total.rejected}")
        for kind, lines in (("conflict", total.conflicts), ("rejected", total.errors)):
            for line in lines[:10]:
                click.echo(f"  {kind} {line}")
            if len(lines) > 10:
                click.echo(f"  ... and {len(lines) - 10} more {kind} (see the traces table)")
    if correct and total.readable:
        from loop.production import correct_traces

        summary = correct_traces(store, teacher, packs, agreements=cfg.production_agreements, weight=cfg.production_weight,
                                 progress=not as_json)
        out["correction"] = {"corrected": summary.corrected, "review": summary.review, "no_error": summary.no_error,
                             "teacher_calls": summary.usage.calls, "teacher_cost_usd": summary.usage.cost_usd}
        if not as_json:
            click.echo(f"corrected {summary.corrected}, review {summary.review}, no error {summary.no_error} "
                       f"({summary.usage.calls} teacher calls, ${summary.usage.cost_usd:.4f})")
    if as_json:
        click.echo(json.dumps(out, indent=2))
    if total.readable == 0:
        sys.exit(1)


@main.command("serve")
@_config_option
@_set_option
@click.option("--db", default=None, help="SQLite store (config: db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep loopback unless a proxy fronts it).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--token-env", default="APPRENTICE_TOKEN", show_default=True, help="Environment variable holding the bearer token clients must send.")
@click.option("--max-body-bytes", type=int, default=64_000, show_default=True, help="Larger requests get 413.")
@click.option("--max-messages", type=int, default=64, show_default=True, help="Conversations with more messages get 422.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests admitted at once (one generates, the rest wait); more get 503 with Retry-After.")
def serve_cmd(config_file: Path | None, sets: tuple[str, ...], db: str | None, host: str, port: int, token_env: str,
              max_body_bytes: int, max_messages: int, max_queue: int) -> None:
    """Answer OpenAI chat completions with the promoted adapter; the model name is a company pack id.

    Every answer is stored as a production trace; POST /v1/feedback with a completion's id and a
    failure note sends it to the teacher for correction. The adapter follows promotions.
    """
    import os

    import uvicorn

    from ops.run import build_packs, build_teacher
    from ops.serve import Limits, Service, create_app
    from policies.hf import HFStudent
    from policies.models import resolve_model

    token = os.environ.get(token_env)
    if not token:
        raise click.UsageError(f"set {token_env} to the bearer token clients must send (see --token-env)")
    cfg = _config(config_file, sets, db=db)
    packs = build_packs(cfg)
    student = HFStudent(resolve_model(cfg.model), load_in_4bit=cfg.load_in_4bit, batch_size=max(1, cfg.thought_samples),
                        max_new_tokens=cfg.max_new_tokens, json_mode=cfg.json_mode, seed=cfg.seed, thought_samples=cfg.thought_samples,
                        comparisons_first=cfg.comparisons_first)
    service = Service(cfg.db, packs, student, build_teacher(cfg), token=token, agreements=cfg.production_agreements,
                      weight=cfg.production_weight, limits=Limits(max_body_bytes=max_body_bytes, max_messages=max_messages, max_queue=max_queue))
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")


@main.group("review", invoke_without_command=True)
@_config_option
@_set_option
@click.option("--db", default=None, help="SQLite store (config: db).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def review_cmd(ctx: click.Context, config_file: Path | None, sets: tuple[str, ...], db: str | None, as_json: bool) -> None:
    """Production corrections the teacher's judgements disagreed on, waiting for an operator."""
    from loop.production import review_items

    cfg = _config(config_file, sets, db=db)
    ctx.obj = {"cfg": cfg}
    if ctx.invoked_subcommand is not None:
        return
    items = review_items(_open_store(cfg.db))
    if as_json:
        click.echo(json.dumps([{"id": c.id, "step": c.step_idx, "student": c.student_action, "teacher": c.teacher_action,
                                "rationale": c.rationale} for c in items], indent=2))
        return
    for c in items:
        console.print(f"#{c.id} step {c.step_idx}: {json.dumps(c.student_action)}\n    teacher: {json.dumps(c.teacher_action)} ({c.rationale})", markup=False)
    console.print(f"{len(items)} waiting for review")


def _review_decision(ctx: click.Context, correction_id: int, accept: bool, by: str, note: str) -> None:
    from loop.production import ReviewError, decide_review
    from ops.run import build_packs

    cfg = ctx.obj["cfg"]
    try:
        decide_review(_open_store(cfg.db), build_packs(cfg), correction_id, accept=accept, by=by, note=note, weight=cfg.production_weight)
    except ReviewError as e:
        click.echo(f"refused: {e}", err=True)
        sys.exit(1)
    click.echo(f"correction {correction_id} {'accepted' if accept else 'rejected'} by {by}")


@review_cmd.command("accept")
@click.argument("correction_id", type=int)
@click.option("--by", required=True, help="Who decides (kept in the decisions log).")
@click.option("--note", default="", help="Why.")
@click.pass_context
def review_accept(ctx: click.Context, correction_id: int, by: str, note: str) -> None:
    """Trust correction CORRECTION_ID: it becomes a training row."""
    _review_decision(ctx, correction_id, True, by, note)


@review_cmd.command("reject")
@click.argument("correction_id", type=int)
@click.option("--by", required=True, help="Who decides (kept in the decisions log).")
@click.option("--note", required=True, help="Why.")
@click.pass_context
def review_reject(ctx: click.Context, correction_id: int, by: str, note: str) -> None:
    """Drop correction CORRECTION_ID: it is never trained on."""
    _review_decision(ctx, correction_id, False, by, note)


# --- operators ------------------------------------------------------------------------------


@main.command("status")
@click.option("--db", default="apprentice.db", show_default=True, help="SQLite store.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def status_cmd(db: str, as_json: bool) -> None:
    """Is the daemon alive; what is promoted, pending, collected and spent; recent errors."""
    from dataclasses import asdict

    from loop.status import status

    st = status(_open_store(db), db)
    if as_json:
        click.echo(json.dumps(asdict(st), indent=2))
        return
    console.print(f"daemon: {st.daemon}")
    console.print(f"promoted: {st.promoted}; awaiting approval: {', '.join(st.awaiting_approval) or 'none'}")
    console.print(f"examples: {st.examples} ({st.examples_since_training} since the last training)")
    console.print(f"teacher today: {st.teacher_calls_today} calls, {st.teacher_tokens_today} tokens, ${st.teacher_cost_today_usd:.4f}")
    console.print(f"last ticket selection: {st.last_selection}")
    traces = ", ".join(f"{n} {state}" for state, n in sorted(st.traces.items())) or "none"
    console.print(f"production traces: {traces}; {st.production_examples} production training rows")
    for line in st.last_errors or ["none"]:
        console.print(f"last errors: {line}" if line != "none" else "last errors: none")


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


@main.group("console", invoke_without_command=True)
@_config_option
@_set_option
@click.option("--db", default=None, help="SQLite store (config: db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep loopback unless a TLS proxy fronts it).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.pass_context
def console_cmd(ctx: click.Context, config_file: Path | None, sets: tuple[str, ...], db: str | None, host: str, port: int) -> None:
    """The operators' web console: overview, adapters, comparisons, approve/reject/rollback, review, audit log.

    Operators log in with a token; `apprentice console add-operator NAME` makes one. Decisions go
    through the same functions as `apprentice approve/reject/rollback/review`, with the same refusals.
    """
    from ops.console import OperatorsError, load_operators

    cfg = _config(config_file, sets, db=db)
    ctx.obj = {"cfg": cfg}
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from ops.console import Console, create_app
    from ops.run import build_packs

    _open_store(cfg.db).close()  # refuses a missing store
    try:
        console_app = Console(cfg.db, load_operators(cfg.operators_file), build_packs(cfg), production_weight=cfg.production_weight)
    except OperatorsError as e:
        raise click.UsageError(f"{e} (operators file: {cfg.operators_file})") from None
    click.echo(f"apprentice console on http://{host}:{port} over {cfg.db} ({len(console_app.operators)} operators in {cfg.operators_file})")
    uvicorn.run(create_app(console_app), host=host, port=port, log_level="warning")


@console_cmd.command("add-operator")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="May look at every page, may not decide.")
@click.pass_context
def console_add_operator(ctx: click.Context, name: str, read_only: bool) -> None:
    """Add operator NAME to the operators file and print their login token (shown once; only its hash is kept)."""
    from ops.console import OperatorsError, add_operator

    path = ctx.obj["cfg"].operators_file
    try:
        token = add_operator(path, name, "read-only" if read_only else "operator")
    except OperatorsError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"added {name} ({'read-only' if read_only else 'operator'}) to {path}; their token, shown once:\n{token}")


if __name__ == "__main__":
    main()
