"""SCoRe correction with a scripted student and a teacher fake that shares the real signature."""

import json
import random
from pathlib import Path

from environments.actions import Action
from environments.pack import load_pack
from loop.correct import score_correct
from loop.evaluate import run_episodes
from loop.records import register_packs
from loop.round import store_corrected, training_messages
from policies.policy import Output
from policies.teacher import Demonstration, Judgement, OracleTeacher, Usage
from store import Store

PACK = load_pack(Path(__file__).parent / "data" / "acme")
T3 = next(t for t in PACK.tickets if t.id == "t3")  # needs the order id, then a reply with "3 to 5 days"

CLARIFY = Action(action="clarify", message="What is your order number?")
BAD_REPLY = Action(action="reply", message="It is on its way!")
GOOD_REPLY = Action(action="reply", message="Delivery takes 3 to 5 days.")


class ScriptedStudent:
    """Plays step i of an episode from a fixed script, whatever happened before."""

    name = "student"

    def __init__(self, script):
        self.script = script

    def act(self, episodes):
        return [Output(self.script[min(len(e.steps), len(self.script) - 1)]) for e in episodes]


class TeacherFake:
    """The real Teacher signature; answers judge() from a queue."""

    name = "fake-teacher"

    def __init__(self):
        self.queue = []

    def enqueue(self, judgements):
        self.queue.extend(judgements)

    def judge(self, trajectory, context):
        return self.queue.pop(0)

    def demonstrate(self, prefix, context):
        return Demonstration(CLARIFY)


def rollout(student):
    return run_episodes(student, [(PACK, T3)], progress=False)


def assistant_steps(messages):
    return [json.loads(m["content"]) for m in messages if m["role"] == "assistant"]


def test_example_is_prefix_plus_teacher_step_plus_continuation():
    # The student clarifies (right), replies without the fact (wrong, step 1), and - once the teacher
    # has searched the KB in its place - replies with the fact (its own continuation, step 2).
    student = ScriptedStudent([CLARIFY.to_json(), BAD_REPLY.to_json(), GOOD_REPLY.to_json()])
    episodes = rollout(student)
    assert episodes[0].outcome == "wrong_reply" and len(episodes[0].steps) == 2
    (item,) = score_correct(student, OracleTeacher(), episodes, rng=random.Random(0))
    assert item.fate == "repaired" and [r.step_idx for r in item.repairs] == [1]
    assert item.teacher_steps == {1}
    steps = assistant_steps(training_messages(item.current))
    assert [s["action"] for s in steps] == ["clarify", "search_kb", "reply"]
    assert steps[0]["message"] == CLARIFY.message and steps[2]["message"] == GOOD_REPLY.message
    assert BAD_REPLY.message not in json.dumps(steps)

    store = Store.open(":memory:")
    register_packs(store, [PACK])
    assert store_corrected(store, "oracle", item, 1, None) == 1
    (example,) = store.examples()
    assert assistant_steps(example.messages) == steps and example.source == "simulation"
    (correction,) = store.corrections()
    assert correction.status == "accepted" and correction.student_action["message"] == BAD_REPLY.message
    assert correction.teacher_action["action"] == "search_kb"
    final = store.episodes(run_kind="correction")[0]
    assert [s.actor for s in store.steps(final.id)] == ["student", "teacher", "student"]


def test_a_correction_the_checker_rejects_is_stored_and_not_trained_on():
    student = ScriptedStudent([BAD_REPLY.to_json()])
    teacher = TeacherFake()
    teacher.enqueue([Judgement(0, Action(action="escalate", args={"reason": "churn_risk"}, message="Bye."), "wrong", Usage(1, 10, 5, 0.01))])
    (item,) = score_correct(student, teacher, rollout(student), rng=random.Random(0))
    assert item.fate == "rejected_correction" and not item.kept and not item.repairs[0].verified
    store = Store.open(":memory:")
    register_packs(store, [PACK])
    assert store_corrected(store, teacher.name, item, 1, None) == 0
    assert store.count("examples") == 0
    (correction,) = store.corrections()
    assert correction.status == "rejected" and correction.cost_usd == 0.01 and correction.prompt_tokens == 10


def test_repair_cap_holds():
    student = ScriptedStudent([BAD_REPLY.to_json()])  # wrong at every step it takes
    (item,) = score_correct(student, OracleTeacher(), rollout(student), max_repairs=2, rng=random.Random(0))
    assert item.fate == "repair_cap" and len(item.repairs) == 2 and not item.kept


def test_clean_trajectories_are_kept_with_the_configured_probability():
    student = ScriptedStudent([CLARIFY.to_json(), Action(action="search_kb", args={"query": "shipping"}).to_json(), GOOD_REPLY.to_json()])
    episodes = run_episodes(student, [(PACK, T3)] * 200, progress=False)
    items = score_correct(student, OracleTeacher(), episodes, keep_clean=0.5, rng=random.Random(0))
    kept = sum(i.fate == "clean" for i in items)
    assert all(i.fate in ("clean", "clean_skipped") for i in items) and 70 < kept < 130
