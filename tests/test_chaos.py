"""The reliability benchmarks at a smaller size (slow): the daemon SIGKILLed once in each of its six
phases (bench/chaos.py runs 20), and two rounds against a loopback teacher failing 30% of its calls
with a budget cap that binds (bench/failing_teacher.py)."""

import pytest


@pytest.mark.slow
def test_a_sigkill_in_each_phase_loses_nothing(tiny_model_dir, tmp_path):
    from bench.chaos import PHASES, run

    report = run(tmp_path, kills=len(PHASES), seed=0, model_dir=tiny_model_dir, progress=lambda *_: None)
    assert report.problems == []  # integrity, whole episodes, counts, pointer, recovery, inbox exactly once, exit 0
    assert sorted(k.target for k in report.kills) == sorted(PHASES)
    assert sum(k.phase == k.target for k in report.kills) >= 4  # a phase may end in the random moment before the kill
    assert report.inbox_files >= 1 and report.counts["traces"] > 0 and report.counts["examples"] > 0


@pytest.mark.slow
def test_two_rounds_with_a_teacher_failing_30_percent(tiny_model_dir, tmp_path):
    from bench.failing_teacher import run

    out = run(tmp_path, fail_rate=0.3, warm=10, rollout=6, eval_tickets=2, budget=0.004, model_dir=tiny_model_dir)
    assert out.failed_checks == []  # exit 0, calls accounted, give-ups recorded, nothing unverified trained, cap held
    assert out.figures["asks refused by the budget cap"] > 0  # the cap bound during round 2
    assert out.figures["examples from unverified episodes"] == 0
