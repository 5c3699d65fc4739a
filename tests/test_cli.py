"""Every CLI command has --help; the loop's config file documents every key."""

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ops.cli import main
from ops.config import Config, documented_toml, load_config


def commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *commands(main)], ids=lambda p: " ".join(p) or "apprentice")
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert len(result.output.split("\n\n")[1].strip()) > 10  # a real description, not an empty docstring


def test_apprentice_toml_documents_every_key():
    text = (Path(__file__).parents[1] / "apprentice.toml").read_text()
    assert text == documented_toml()
    assert load_config(Path(__file__).parents[1] / "apprentice.toml") == Config()
    assert all(f.metadata.get("help") for f in dataclasses.fields(Config))


@pytest.mark.parametrize("overrides,message", [
    ({"nope": "1"}, "unknown config key"),
    ({"epochs": "many"}, "epochs must be a float"),
    ({"keep_clean": "1.5"}, "keep_clean must lie in"),
    ({"auto_approve": "maybe"}, "auto_approve must be true or false"),
    ({"policy_redraws": "-1"}, "policy_redraws must lie in"),
    ({"continued_learning_rate": "-1e-3"}, "continued_learning_rate must be >= 0"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_eval_unknown_policy_is_a_usage_error():
    result = CliRunner().invoke(main, ["eval", "--policy", "psychic", "--pack", "tests/data/acme"])
    assert result.exit_code == 2 and "unknown policy" in result.output


def test_eval_json_keys(tmp_path):
    import json

    result = CliRunner().invoke(main, ["eval", "--policy", "keyword", "--pack", "tests/data/acme", "--json", "--db", str(tmp_path / "e.db")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("escalation_recall", "over_escalation_rate", "reason_accuracy", "step_acceptability", "first_action_accuracy",
                "valid_json_rate", "resolution_rate", "calibration_j"):
        assert key in data and f"{key}_ci" in data
    assert data["n_tickets"] == 7
    from store import Store

    store = Store.open(tmp_path / "e.db")
    assert store.count("episodes") == 7 and store.count("steps") > 7


def test_policy_redraws_apply_to_the_built_in_packs_only(tmp_path):
    from environments.builtin import build_packs as generate
    from ops.run import build_packs, round_settings

    cfg = load_config(None, {"policy_redraws": "2"})
    packs = build_packs(cfg)
    assert sorted(p.id for p in packs) == sorted(p.id for p in generate(0, redraws=2))
    assert len([p for p in packs if p.company.split == "train"]) == 3 * 10
    assert round_settings(cfg).calibration_tickets == 10 // 3  # the validation tickets are spread over the draws
    own = load_config(None, {"policy_redraws": "2", "packs": str(Path(__file__).parent / "data")})
    assert all("-r" not in p.id for p in build_packs(own)) and round_settings(own).calibration_tickets == 10
