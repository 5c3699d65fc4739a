"""A teacher that fails: the item it could not answer is recorded and skipped, and the loop goes on.

Unit tests here; the two-round run against a loopback teacher failing 30% of its calls is
`test_two_rounds_with_a_teacher_failing_30_percent` (slow) and bench/failing_teacher.py."""

import random

from loop.correct import score_correct
from loop.evaluate import run_episodes
from loop.records import register_packs
from loop.round import store_corrected
from policies.policy import TEACHER_FAILED, TeacherPolicy
from policies.teacher import Judgement, TeacherUnavailable, Usage
from store import Store
from tests.test_correct import BAD_REPLY, CLARIFY, GOOD_REPLY, PACK, T3, ScriptedStudent


class FailingTeacher:
    """The real Teacher signature; judge() answers from a queue whose exceptions are raised."""

    name = "failing-teacher"

    def __init__(self, answers):
        self.answers = list(answers)

    def _next(self):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def judge(self, trajectory, context):
        return self._next()

    def demonstrate(self, prefix, context):
        return self._next()


def test_a_judgement_the_teacher_cannot_give_is_recorded_and_not_trained_on(tmp_path):
    failed = TeacherUnavailable("teacher x gave no valid answer in 4 attempts", Usage(calls=4))
    teacher = FailingTeacher([Judgement(1, GOOD_REPLY, "quote the delivery time", Usage(calls=1)), failed])
    episodes = run_episodes(ScriptedStudent([CLARIFY.to_json(), BAD_REPLY.to_json()]), [(PACK, T3)], progress=False)
    (item,) = score_correct(ScriptedStudent([CLARIFY.to_json(), BAD_REPLY.to_json()]), teacher, episodes,
                            rng=random.Random(0))
    assert item.fate == "teacher_failed" and not item.kept and item.usage.calls == 5  # failed attempts are paid for
    store = Store.open(tmp_path / "a.db")
    register_packs(store, [PACK])
    assert store_corrected(store, teacher.name, item, 1, None) == 0 and store.count("examples") == 0
    (event,) = store.events(kind="teacher_failed")
    assert "4 attempts" in event.payload["error"] and store.episode(event.payload["episode_id"]).run_kind == "rollout"
    assert [c.verified for c in store.corrections()] == [True]  # the verified repair before the failure is kept


def test_a_demonstration_the_teacher_cannot_give_ends_its_episode_unresolved():
    policy = TeacherPolicy(FailingTeacher([TeacherUnavailable("budget spent", Usage(calls=0))]), privileged=True)
    (episode,) = run_episodes(policy, [(PACK, T3)], progress=False)
    assert episode.done and not episode.result().resolved
    assert episode.steps[0].raw == f"{TEACHER_FAILED}budget spent" and episode.steps[0].action is None
