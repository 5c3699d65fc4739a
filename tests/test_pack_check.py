"""`packs check` rejects each kind of broken pack with a message naming file and line."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from environments.pack import PackError, check_pack, load_pack, save_pack
from ops.cli import main

ACME = Path(__file__).parent / "data" / "acme"


@pytest.fixture
def pack_dir(tmp_path):
    return Path(shutil.copytree(ACME, tmp_path / "acme"))


def edit_ticket(pack_dir, line, change):
    path = pack_dir / "tickets.jsonl"
    rows = path.read_text().splitlines()
    obj = json.loads(rows[line - 1])
    change(obj)
    rows[line - 1] = json.dumps(obj)
    path.write_text("\n".join(rows) + "\n")


def problems_of(pack_dir):
    return [str(p) for p in check_pack(pack_dir)]


def test_valid_pack_has_no_problems_and_round_trips(pack_dir, tmp_path):
    assert problems_of(pack_dir) == []
    pack = load_pack(pack_dir)
    again = load_pack(save_pack(pack, tmp_path / "copy"))
    assert again.company == pack.company and again.tickets == pack.tickets and again.articles == pack.articles


def test_missing_field(pack_dir):
    edit_ticket(pack_dir, 2, lambda t: t.pop("opening"))
    assert problems_of(pack_dir) == ["tickets.jsonl:2: opening: Field required"]


def test_missing_company_field(pack_dir):
    text = (pack_dir / "company.yaml").read_text().replace("split: train\n", "")
    (pack_dir / "company.yaml").write_text(text)
    assert problems_of(pack_dir) == ["company.yaml: split: Field required"]


def test_unknown_escalation_code(pack_dir):
    edit_ticket(pack_dir, 2, lambda t: t["truth"].update(escalation_reason="angry_customer"))
    (problem,) = problems_of(pack_dir)
    assert problem.startswith("tickets.jsonl:2: truth.escalation_reason:") and "billing_exception" in problem


def test_cited_article_does_not_exist(pack_dir):
    edit_ticket(pack_dir, 3, lambda t: t["truth"].update(kb_articles=["kb-nowhere"]))
    assert problems_of(pack_dir) == ["tickets.jsonl:3: truth.kb_articles: article 'kb-nowhere' does not exist in kb.jsonl"]


def test_cited_article_in_followup(pack_dir):
    edit_ticket(pack_dir, 1, lambda t: t["truth"]["followups"][0]["truth"].update(kb_articles=["kb-gone"]))
    assert problems_of(pack_dir) == ["tickets.jsonl:1: truth.followups.0.truth.kb_articles: article 'kb-gone' does not exist in kb.jsonl"]


@pytest.mark.parametrize("needs", [{"order_id": ""}, {"Order ID!": "A-1"}])
def test_need_the_customer_can_never_give(pack_dir, needs):
    edit_ticket(pack_dir, 3, lambda t: t["truth"].update(needs=needs))
    (problem,) = problems_of(pack_dir)
    assert problem.startswith("tickets.jsonl:3: truth.needs:") and "can never be given" in problem


def test_duplicate_ids(pack_dir):
    edit_ticket(pack_dir, 4, lambda t: t.update(id="t1"))
    kb = pack_dir / "kb.jsonl"
    kb.write_text(kb.read_text() + kb.read_text().splitlines()[0] + "\n")
    assert problems_of(pack_dir) == [
        "kb.jsonl:5: duplicate article id 'kb-refunds' (first on line 1)",
        "tickets.jsonl:4: duplicate ticket id 't1' (first on line 1)",
    ]


def test_broken_json_line_and_every_problem_reported(pack_dir):
    with open(pack_dir / "tickets.jsonl", "a") as f:
        f.write("{not json\n")
    edit_ticket(pack_dir, 2, lambda t: t["truth"].update(escalation_reason="nope"))
    problems = problems_of(pack_dir)
    assert len(problems) == 2 and problems[1].startswith("tickets.jsonl:8: not valid JSON")


def test_load_pack_raises_with_problems(pack_dir):
    (pack_dir / "kb.jsonl").unlink()
    with pytest.raises(PackError, match="kb.jsonl: file is missing"):
        load_pack(pack_dir)


def test_cli_check_exit_codes(pack_dir):
    runner = CliRunner()
    ok = runner.invoke(main, ["packs", "check", str(pack_dir)])
    assert ok.exit_code == 0 and "ok: acme-widgets (train) with 4 articles and 7 tickets" in ok.output
    edit_ticket(pack_dir, 3, lambda t: t["truth"].update(kb_articles=["kb-nowhere"]))
    bad = runner.invoke(main, ["packs", "check", str(pack_dir)])
    assert bad.exit_code == 2 and "tickets.jsonl:3" in bad.output and "kb-nowhere" in bad.output


def test_the_readme_example_pack_loads(tmp_path):
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, lang in (("company.yaml", "yaml"), ("kb.jsonl", "json"), ("tickets.jsonl", "json")):
        block = re.search(rf"`{re.escape(name)}`[^\n]*:\n\n```{lang}\n(.*?)```", readme, re.S)
        assert block, f"README has no {name} example"
        (tmp_path / name).write_text(block.group(1))
    assert check_pack(tmp_path) == []
    pack = load_pack(tmp_path)
    assert pack.id == "acme-widgets" and len(pack.tickets) == 3
