"""Each task's reader on files in the official format, its submission shape, and clear errors."""

import copy
import json
import random

import pytest

from fastformers.data.fixtures import MAKERS
from fastformers.data.loading import load_examples
from fastformers.data.tasks import TASKS, get_task
from fastformers.errors import FastformersError
from tests.helpers import SHARED_DATA


def test_every_task_reads_its_fixture_splits(superglue_root):
    for name, task in TASKS.items():
        train = load_examples(task, superglue_root, "train")
        test = load_examples(task, superglue_root, "test")
        assert train and test, name
        assert all(e.label is None for e in test), name
        if name != "record":
            assert all(e.label is not None for e in train), name


def test_pair_tasks_keep_field_order_and_label_index(superglue_root):
    ex = load_examples(TASKS["cb"], superglue_root, "val")[1]
    assert ex.pairs[0][0].startswith("The ") and "never" in ex.pairs[0][1]
    assert ex.label == TASKS["cb"].labels.index("contradiction")
    boolq = load_examples(TASKS["boolq"], superglue_root, "val")[0]
    assert boolq.pairs[0][0].startswith("is the ") and boolq.label == 1  # question first, True -> 1


def test_copa_scores_two_candidates_with_the_connective(superglue_root):
    ex = load_examples(TASKS["copa"], superglue_root, "val")[0]  # idx 0 asks for the cause
    assert len(ex.pairs) == 2
    assert ex.pairs[0][1].startswith("because the ")
    effect = load_examples(TASKS["copa"], superglue_root, "val")[1]
    assert effect.pairs[1][1].startswith("so the ")
    assert ex.golds == (ex.label,)


def test_multirc_expands_answers_grouped_by_question(superglue_root):
    examples = load_examples(TASKS["multirc"], superglue_root, "val")
    assert len(examples) == 18 * 2 * 3
    first = examples[0]
    assert first.meta == {"passage": 0, "question": 0, "answer": 0}
    assert first.pairs[0][1].startswith("What is question 0? ")


def test_record_candidates_are_distinct_entities_with_inclusive_ends(superglue_root):
    ex = load_examples(TASKS["record"], superglue_root, "val")[0]
    assert ex.meta["candidates"] == ["Alice", "Bob", "Paris", "Rome"]
    assert ex.golds == (1,) and ex.label == 1
    assert ex.pairs[1][1] == "Bob flew to Rome."


def test_wic_marks_the_target_word_in_both_sentences(superglue_root):
    ex = load_examples(TASKS["wic"], superglue_root, "val")[0]
    first, second = ex.pairs[0]
    word = first.split("*")[1]
    assert first.startswith(f"A *{word}*") and f"the *{word}*" in second


def test_submissions_have_the_leaderboard_shape(superglue_root):
    def submit(name):
        examples = load_examples(TASKS[name], superglue_root, "test")
        return TASKS[name].submit(examples, [1] * len(examples))

    assert submit("boolq")[0] == {"idx": 0, "label": "true"}
    assert submit("wic")[0] == {"idx": 0, "label": "true"}
    assert submit("cb")[0] == {"idx": 0, "label": "contradiction"}
    assert submit("rte")[0] == {"idx": 0, "label": "not_entailment"}
    assert submit("copa")[0] == {"idx": 0, "label": 1}
    assert submit("record")[0] == {"idx": 0, "label": "Bob"}
    multirc = submit("multirc")
    assert len(multirc) == 9
    question = multirc[0]["passage"]["questions"][0]
    assert multirc[0]["idx"] == 0 and question["idx"] == 0
    assert question["answers"][0] == {"idx": 0, "label": 1}
    json.dumps(multirc)  # serialisable as a jsonl line


def test_unknown_task_names_the_field():
    with pytest.raises(FastformersError, match=r"task\.name='glue'"):
        get_task("glue")


DELETE = object()  # a field taken out of the record


def _changed(record: dict, path: tuple, value) -> dict:
    """A copy of `record` with the field at `path` (keys and list indexes) set to `value`, or deleted."""
    record = copy.deepcopy(record)
    *parents, last = path
    target = record
    for step in parents:
        target = target[step]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return record


def _two_lines(root, task: str, second: bytes):
    """A data file whose line 1 is a good fixture record and line 2 is `second`; its path."""
    good = json.dumps(MAKERS[task](random.Random(0), 0, True)).encode()
    (root / task).mkdir()
    path = root / task / "train.jsonl"
    path.write_bytes(good + b"\n" + second + b"\n")
    return path


@pytest.mark.parametrize(
    "task, path, value, message",
    [
        # text fields: a string (of valid Unicode), never coerced
        ("CB", ("premise",), None, "field premise: expected a string, got null"),
        ("CB", ("hypothesis",), [1], "field hypothesis: expected a string, got [1]"),
        ("RTE", ("premise",), {"a": [1]}, 'field premise: expected a string, got {"a": [1]}'),
        ("RTE", ("hypothesis",), 7, "field hypothesis: expected a string, got 7"),
        ("CB", ("premise",), "a\ud800b", "field premise: not valid Unicode (lone surrogate \\ud800 at character 2)"),
        ("CB", ("hypothesis",), DELETE, "field hypothesis: missing"),
        # ids: an integer, not a boolean, 0 <= idx < 2**63
        ("CB", ("idx",), [3], "field idx: expected an integer, got [3]"),
        ("CB", ("idx",), float("inf"), "field idx: expected an integer, got Infinity"),
        ("RTE", ("idx",), 2**70, "field idx: 1180591620717411303424 is out of range (0 <= idx < 2**63)"),
        ("RTE", ("idx",), -1, "field idx: -1 is out of range (0 <= idx < 2**63)"),
        ("CB", ("idx",), "3", 'field idx: expected an integer, got "3"'),
        ("CB", ("idx",), True, "field idx: expected an integer, got true"),
        ("CB", ("idx",), 3.0, "field idx: expected an integer, got 3.0"),
        # labels: one of the task's values, of the same type (1 is no true, true is no 1)
        ("CB", ("label",), "maybe", 'field label: "maybe" is not one of ["entailment", "contradiction", "neutral"]'),
        ("BoolQ", ("label",), 1, "field label: 1 is not one of [false, true]"),
        ("COPA", ("label",), True, "field label: true is not one of [0, 1]"),
        ("COPA", ("question",), "why", 'field question: "why" is not "cause" or "effect"'),
        ("WiC", ("start1",), False, "field start1: expected an integer, got false"),
        ("WiC", ("end2",), 999, "field end2: word span 13:999 lies outside sentence2 (26 characters)"),
        # nested structures name the path to the field
        ("MultiRC", ("passage", "questions"), {}, "field passage.questions: expected a list, got {}"),
        ("MultiRC", ("passage", "questions", 1), "q", 'field passage.questions[1]: expected an object, got "q"'),
        (
            "MultiRC",
            ("passage", "questions", 0, "idx"),
            None,
            "field passage.questions[0].idx: expected an integer, got null",
        ),
        (
            "MultiRC",
            ("passage", "questions", 0, "answers", 1, "label"),
            2,
            "field passage.questions[0].answers[1].label: 2 is not one of [0, 1]",
        ),
        ("MultiRC", ("passage", "text"), None, "field passage.text: expected a string, got null"),
        ("ReCoRD", ("passage",), "text", 'field passage: expected an object, got "text"'),
        (
            "ReCoRD",
            ("passage", "entities", 2, "end"),
            500,
            "field passage.entities[2].end: span 17..500 lies outside the passage text (57 characters)",
        ),
        (
            "ReCoRD",
            ("passage", "entities", 0, "start"),
            True,
            "field passage.entities[0].start: expected an integer, got true",
        ),
        ("ReCoRD", ("passage", "entities"), [], "field passage.entities: no entities to choose from"),
        ("ReCoRD", ("qas", 0, "idx"), "q1", 'field qas[0].idx: expected an integer, got "q1"'),
        ("ReCoRD", ("qas", 0, "query"), "no slot", "field qas[0].query: has no @placeholder"),
        (
            "ReCoRD",
            ("qas", 0, "answers", 0, "text"),
            ["Bob"],
            'field qas[0].answers[0].text: expected a string, got ["Bob"]',
        ),
        (
            "ReCoRD",
            ("qas", 0, "answers", 0, "end"),
            2**64,
            "field qas[0].answers[0].end: 18446744073709551616 is out of range (0 <= end < 2**63)",
        ),
    ],
)
def test_bad_fields_name_file_line_and_field(tmp_path, task, path, value, message):
    record = _changed(MAKERS[task](random.Random(0), 1, True), path, value)
    data = _two_lines(tmp_path, task, json.dumps(record).encode())
    with pytest.raises(FastformersError) as raised:
        load_examples(get_task(task.lower()), tmp_path, "train")
    assert str(raised.value) == f"{data}:2: {message}"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"premise": "a\xffb"}', "not valid UTF-8 (byte 0xff at column 15)"),
        ('{"premise": "\u00e9'.encode() + b"\xc3", "not valid UTF-8 (byte 0xc3 at column 15)"),
        (b'{"premise": "a", "hypothesis": ', "not valid JSON (Expecting value at column 32)"),
        (b'{"premise": "a" "hypothesis": "b"}', "not valid JSON (Expecting ',' delimiter at column 17)"),
        (b'{"idx": 1' + b"0" * 5000 + b"}", "not valid JSON (a number too long to read)"),
        (b"[" * 100_000, "not valid JSON (nested too deeply)"),
        (b"[1, 2]", "expected a JSON object, got a list"),
        (b"null", "expected a JSON object, got null"),
    ],
)
def test_unreadable_lines_name_file_line_and_column(tmp_path, line, message):
    data = _two_lines(tmp_path, "CB", line)
    with pytest.raises(FastformersError) as raised:
        load_examples(TASKS["cb"], tmp_path, "train")
    assert str(raised.value) == f"{data}:2: {message}"


def test_strict_readers_accept_every_fixture_record_as_written(superglue_root):
    """Texts stay strings and ids stay the file's integers (never coerced: submissions echo them)."""
    for task in TASKS.values():
        for example in load_examples(task, superglue_root, "val"):
            assert all(isinstance(t, str) for pair in example.pairs for t in pair if t is not None)
            assert all(type(v) is int for k, v in example.meta.items() if k in ("idx", "passage", "question", "answer"))


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FastformersError, match=rf"missing data file {tmp_path}/RTE/val.jsonl.*data.download=true"):
        load_examples(TASKS["rte"], tmp_path, "val")


def test_real_shared_data_has_the_official_sizes():
    if not SHARED_DATA.is_dir():
        pytest.skip("the shared SuperGLUE files are not on this machine")
    sizes = {"cb": 56, "rte": 277, "copa": 100, "wic": 638, "boolq": 3270, "multirc": 4848}
    for name, size in sizes.items():
        assert len(load_examples(TASKS[name], SHARED_DATA, "val")) == size, name
    assert all(e.label is None for e in load_examples(TASKS["cb"], SHARED_DATA, "test"))
