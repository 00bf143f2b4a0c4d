"""Each task's reader on files in the official format, its submission shape, and clear errors."""
import json

import pytest

from fastformers.data import load_examples
from fastformers.errors import FastformersError
from fastformers.tasks import TASKS, get_task


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
    with pytest.raises(FastformersError, match="task.name='glue'"):
        get_task("glue")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 3}', r"CB/train.jsonl:2: label 'maybe' is not one of"),
        ('{"premise": "a", "label": "neutral", "idx": 3}', r"CB/train.jsonl:2: missing field 'hypothesis'"),
        ('{"premise": "a", "hypothesis": ', r"CB/train.jsonl:2: not valid JSON"),
        ("[1, 2]", r"CB/train.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    good = '{"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 0}'
    (tmp_path / "CB").mkdir()
    (tmp_path / "CB" / "train.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(FastformersError, match=message):
        load_examples(TASKS["cb"], tmp_path, "train")


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(FastformersError, match=rf"missing data file {tmp_path}/RTE/val.jsonl.*data.download=true"):
        load_examples(TASKS["rte"], tmp_path, "val")


def test_real_shared_data_has_the_official_sizes():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("the shared SuperGLUE files are not on this machine")
    sizes = {"cb": 56, "rte": 277, "copa": 100, "wic": 638, "boolq": 3270, "multirc": 4848}
    for name, size in sizes.items():
        assert len(load_examples(TASKS[name], SHARED_DATA, "val")) == size, name
    assert all(e.label is None for e in load_examples(TASKS["cb"], SHARED_DATA, "test"))
