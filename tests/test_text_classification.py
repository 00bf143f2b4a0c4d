"""A task on the user's own files (task=text_classification) and the user's own fine-tuned model as the teacher:
the readers of each format, the label set, the one-line errors of bad files, the metrics, and whole runs on a
tiny random model."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from fastformers.data import metrics, text_classification
from fastformers.data.loading import fingerprint, load_examples, texts_of
from fastformers.data.task_config import task_of
from fastformers.data.tasks import TASKS, Task, get_task
from fastformers.errors import FastformersError
from fastformers.models.loading import build_random, load_finetuned
from fastformers.run import pipeline
from fastformers.run.cli import CONF_DIR
from fastformers.stages import teacher as teacher_stage
from tests.helpers import mlflow_runs, tiny_spec

WORDS = {"billing": "charged invoice refund", "shipping": "parcel courier arrived", "account": "password login email"}
ROWS = [
    {"text": f"ticket {i}: my {WORDS[label].split()[i % 3]} problem", "label": label}
    for i, label in enumerate(["billing", "shipping", "account"] * 8)
]


def task_cfg(folder, **changes):
    """conf/task/text_classification.yaml with `dir` set to the folder and `changes` applied."""
    cfg = OmegaConf.load(f"{CONF_DIR}/task/text_classification.yaml")
    cfg.dir = str(folder)
    return OmegaConf.merge(cfg, changes)


def make_task(folder, **changes) -> Task:
    return text_classification.build(text_classification.check(task_cfg(folder, **changes)))


def write(path, rows, fmt=None):
    """Rows as a .csv, .tsv, .jsonl or .parquet file (by suffix)."""
    fmt = fmt or path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        delimiter = "\t" if fmt == ".tsv" else ","
        columns = list(rows[0])
        lines = [delimiter.join(columns)]
        for row in rows:
            cells = [str(row[c]) for c in columns]
            lines.append(delimiter.join(f'"{c}"' if delimiter in c or '"' in c else c for c in cells))
        path.write_text("\n".join(lines) + "\n")
    return path


def write_split_files(folder, suffix=".csv", train=ROWS, val=ROWS[:9], test=None):
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / f"train{suffix}", train)
    write(folder / f"val{suffix}", val)
    if test is not None:
        write(folder / f"test{suffix}", test)
    files = {"train": f"train{suffix}", "val": f"val{suffix}", "test": f"test{suffix}" if test is not None else None}
    return files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_reads_texts_labels_and_line_ids(tmp_path, suffix):
    rows = [dict(row, text=row["text"] + ", with a comma") for row in ROWS]  # quoted in csv
    files = write_split_files(tmp_path, suffix, train=rows)
    task = make_task(tmp_path, files=files)
    assert task.labels == ("account", "billing", "shipping")  # the train file's, sorted
    examples = load_examples(task, "unused", "train")
    assert [e.pairs for e in examples[:2]] == [[(rows[0]["text"], None)], [(rows[1]["text"], None)]]
    assert [task.labels[e.label] for e in examples] == [row["label"] for row in rows]
    first_line = 1 if suffix in (".jsonl", ".parquet") else 2  # csv / tsv: the header is line 1
    assert examples[0].meta == {"line": first_line} and examples[0].uid == f"train:{first_line}"


def test_text_pairs_ids_and_labels_listed_in_config(tmp_path):
    rows = [{"q": f"question {i}", "p": f"passage {i}", "key": i, "answer": i % 2} for i in range(6)]
    write(tmp_path / "train.jsonl", rows)
    write(tmp_path / "val.jsonl", rows)
    files = {"train": "train.jsonl", "val": "val.jsonl"}
    task = make_task(
        tmp_path, files=files, text_field="q", text_pair_field="p", label_field="answer", id_field="key", labels=[1, 0]
    )
    assert task.labels == ("1", "0")  # the config's order: integers (and booleans) named as JSON spells them
    example = load_examples(task, "unused", "val")[3]
    assert example.pairs == [("question 3", "passage 3")] and example.label == 0 and example.uid == "3"
    assert task.submit([example], [1]) == [{"idx": 3, "label": "0"}]
    served = text_classification.build(task.spec, with_files=False)  # a request may leave the id out
    assert served.read({"q": "question", "p": "passage"})[0].meta == {}
    write(tmp_path / "val.jsonl", rows + [{"q": "x", "p": "y", "key": 9, "answer": 2}])
    with pytest.raises(FastformersError, match=r"val.jsonl:7: field answer: \"2\" is not a label of task.labels"):
        load_examples(task, "unused", "val")


def test_a_delimiter_other_than_the_suffixs(tmp_path):
    for split in ("train", "val"):
        (tmp_path / f"{split}.csv").write_text("text;label\nhello, there;a\nbye;b\n")
    task = make_task(tmp_path, delimiter=";")
    assert task.labels == ("a", "b")
    assert [e.pairs[0][0] for e in load_examples(task, "unused", "val")] == ["hello, there", "bye"]


def test_a_label_the_train_file_never_has_is_refused_by_line(tmp_path):
    files = write_split_files(tmp_path, val=ROWS[:2] + [{"text": "where is my money", "label": "refund"}])
    task = make_task(tmp_path, files=files)
    with pytest.raises(FastformersError) as err:
        load_examples(task, "unused", "val")
    message = str(err.value)
    assert message.startswith(f'{tmp_path / "val.csv"}:4: field label: "refund" is not a label of the train file')
    assert "list every label in task.labels" in message and "\n" not in message


def bad_csv(text):
    return lambda folder: (folder / "train.csv").write_text(text)


def bad_bytes(data):
    return lambda folder: (folder / "train.csv").write_bytes(data)


def bad_jsonl(rows):
    return lambda folder: write(folder / "train.jsonl", rows)


def bad_parquet(rows):
    return lambda folder: write(folder / "train.parquet", rows)


BAD_FILES = {
    "missing text column": (
        bad_csv("sentence,label\nhello,billing\nbye,shipping\n"),
        "train.csv:2: field text: missing",
    ),
    "missing label": (bad_jsonl([{"text": "a", "label": "x"}, {"text": "b"}]), "train.jsonl:2: field label: missing"),
    "empty label": (bad_csv("text,label\na,x\nb,\nc,y\n"), "train.csv:3: field label: empty"),
    "empty split": (bad_csv("text,label\n"), "train.csv: the train file has no rows"),
    "tab-separated .csv": (bad_csv("text\tlabel\na\tx\n"), "train.csv:1: one column .* looks tab-separated: rename"),
    "semicolons": (
        bad_csv("text;label\na;x\n"),
        "train.csv:1: one column .* looks semicolon-separated: set task.delim",
    ),
    "ragged row": (bad_csv("text,label\na,x\nb, c,y\n"), "train.csv:3: 3 fields but the header has 2"),
    "not UTF-8": (bad_bytes(b"text,label\na,x\nb\xff,y\n"), "train.csv:3: not valid UTF-8 \\(byte 0xff\\)"),
    "broken quotes": (bad_csv('text,label\n"a" b,x\n'), "train.csv:2: not valid comma-separated text"),
    "number as text": (
        bad_jsonl([{"text": "a", "label": "x"}, {"text": 3, "label": "y"}]),
        "train.jsonl:2: field text: expected a string, got 3",
    ),
    "null as text": (
        bad_parquet([{"text": "a", "label": "x"}, {"text": None, "label": "y"}]),
        "train.parquet:row 2: field text: expected a string, got null",
    ),
    "not parquet": (
        lambda folder: (folder / "train.parquet").write_text("text,label\n"),
        "cannot read .*train.parquet: not a readable Parquet file",
    ),
    "one label": (bad_csv("text,label\na,x\nb,x\n"), 'train.csv: the train file has one label \\("x"\\)'),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_in_one_line_naming_file_line_and_field(tmp_path, case):
    make, message = BAD_FILES[case]
    make(tmp_path)
    train = next(p.name for p in tmp_path.iterdir() if p.stem == "train")
    write(tmp_path / "val.csv", ROWS[:3])
    with pytest.raises(FastformersError, match=message) as err:
        task = make_task(tmp_path, files={"train": train, "val": "val.csv"})  # labels come from the train file
        load_examples(task, "unused", "train")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_empty_eval_split_and_missing_files(tmp_path):
    files = write_split_files(tmp_path, val=ROWS[:1])
    (tmp_path / "val.csv").write_text("text,label\n\n")
    task = make_task(tmp_path, files=files)
    with pytest.raises(FastformersError, match=r"val.csv: split 'val' has no examples"):
        load_examples(task, "unused", "val")
    with pytest.raises(FastformersError, match=r"task.files.test is not set"):
        load_examples(task, "unused", "test")
    with pytest.raises(FastformersError, match=r"missing data file .*nowhere.csv \(task.files.val\)"):
        load_examples(make_task(tmp_path, files=dict(files, val="nowhere.csv")), "unused", "val")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"metrics": ["accuracy", "f2"]}, r"task.metrics=\['accuracy', 'f2'\] must list some of"),
        ({"main_metric": "mcc"}, r"task.main_metric='mcc' must be one of task.metrics"),
        ({"name": "cb"}, r"task.name='cb' is a SuperGLUE task's name"),
        ({"labels": ["a"]}, r"task.labels=\['a'\] must list at least two labels"),
        ({"text_pair_field": "text"}, r"must name different fields"),
        ({"files": {"train": "train.txt"}}, r"task.files.train='train.txt': name a file ending in .jsonl"),
    ],
)
def test_bad_task_configs_are_refused_before_reading(tmp_path, changes, message):
    with pytest.raises(FastformersError, match=message):
        text_classification.check(task_cfg(tmp_path, **changes))


def test_metrics_and_the_chosen_score(tmp_path):
    golds, preds = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]  # TP 2, FN 1, TN 2, FP 1: (4 - 1) / 9
    assert metrics.mcc(golds, preds) == pytest.approx(1 / 3)
    assert metrics.mcc(golds, golds) == 1.0 and metrics.mcc(golds, [1 - g for g in golds]) == -1.0
    assert metrics.mcc(golds, [1] * 6) == 0.0  # a constant prediction
    assert metrics.mcc([0, 1, 2, 2], [0, 1, 2, 2]) == 1.0
    files = write_split_files(tmp_path)
    task = make_task(tmp_path, files=files, metrics=["accuracy", "macro_f1", "mcc"], main_metric="mcc")
    examples = load_examples(task, "unused", "val")[:6]
    for example, gold in zip(examples, [1, 1, 1, 0, 0, 0]):
        example.label = gold
    scores = task.score(examples, preds)
    assert scores["mcc"] == scores["score"] == pytest.approx(1 / 3) and scores["accuracy"] == pytest.approx(4 / 6)
    assert set(scores) == {"accuracy", "macro_f1", "mcc", "score"}


def test_fingerprint_covers_the_users_files_and_keeps_superglue_keys(tmp_path, superglue_root):
    files = write_split_files(tmp_path / "data")
    before = fingerprint("unused", make_task(tmp_path / "data", files=files))
    write(tmp_path / "data" / "val.csv", ROWS[:8])
    assert fingerprint("unused", make_task(tmp_path / "data", files=files)) != before
    # SuperGLUE's cache keys are those of the code before tasks from files (fixture data, pinned)
    assert fingerprint(superglue_root, TASKS["cb"]) == "60d5a425588b20c7"
    assert fingerprint(superglue_root, TASKS["rte"]) == "5fb632b2335ebd7b"


def test_task_of_builds_the_config_and_serving_rebuilds_it_without_files(tmp_path):
    files = write_split_files(tmp_path)
    cfg = OmegaConf.create({"task": task_cfg(tmp_path, files=files, name="tickets")})
    task = task_of(cfg)
    assert task.labels == ("account", "billing", "shipping") and task.spec is not None
    served = text_classification.build(json.loads(json.dumps(task.spec)), with_files=False)  # MLflow model_config
    (example,) = served.read({"text": "my parcel never came"})
    assert example.label is None and served.submit([example], [2]) == [{"label": "shipping"}]
    with pytest.raises(FastformersError, match="not a SuperGLUE task"):
        get_task("glue")


def tiny_data(folder):
    """A tiny labelled train/val csv and an unlabelled test csv."""
    test = [{"text": row["text"]} for row in ROWS[:5]]
    return write_split_files(folder, train=ROWS, val=ROWS[:12], test=test)


def own_cfg(make_cfg, folder, *overrides):
    files = tiny_data(folder)
    return make_cfg(
        "task=text_classification",
        f"task.dir={folder}",
        f"task.files.test={files['test']}",
        "student=tiny_random",
        "finetune.epochs=1",
        "distill.epochs=1",
        *overrides,
    )


@pytest.mark.slow
def test_finetune_distill_evaluate_on_a_users_csv(make_cfg, tmp_path):
    cfg = own_cfg(make_cfg, tmp_path / "data", "stages=[finetune,distill,evaluate]", "evaluate.splits=[val,test]")
    results = pipeline.run(cfg)
    assert {"evaluate/val/accuracy", "evaluate/val/macro_f1", "evaluate/val/score"} <= set(results)
    assert results["evaluate/val/score"] == results["evaluate/val/macro_f1"]  # task.main_metric
    _, (run,) = mlflow_runs(cfg)
    assert run.info.status == "FINISHED" and run.data.params["task.name"] == "text_classification"
    folder = run.data.tags["cache.evaluate.path"]
    lines = [json.loads(line) for line in open(f"{folder}/submission/text_classification.jsonl")]
    assert [line["line"] for line in lines] == [2, 3, 4, 5, 6]
    assert {line["label"] for line in lines} <= {"account", "billing", "shipping"}


def save_users_model(folder, data, id2label=None):
    """A 'fine-tuned' classifier saved by the user (a random tiny BERT with a 3-way head)."""
    task = make_task(data, files=tiny_data(data))
    model, tokenizer = build_random(tiny_spec("bert"), task, texts_of(load_examples(task, "unused", "train")))
    if id2label:
        model.config.id2label = dict(enumerate(id2label))
        model.config.label2id = {name: i for i, name in enumerate(id2label)}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_users_fine_tuned_model_is_the_teacher_as_it_is(make_cfg, tmp_path, caplog):
    users = save_users_model(tmp_path / "users_model", tmp_path / "data")
    overrides = (f"teacher.pretrained={users}", "stages=[distill,evaluate]")
    cfg = own_cfg(make_cfg, tmp_path / "data", *overrides)
    with caplog.at_level(logging.INFO, logger="fastformers"):
        results = pipeline.run(cfg)
    assert list(cfg.stages) == ["teacher", "distill", "evaluate"]  # put in front: no finetune stage ran
    assert "generic output names LABEL_0..LABEL_2: output i is taken as task label i" in caplog.text
    _, (run,) = mlflow_runs(cfg)
    assert "cache.finetune" not in run.data.tags and run.data.tags["cache.teacher"] == "miss"
    assert run.data.params["teacher.sha256"] == teacher_stage.folder_hash(users)
    assert "teacher/val/score" in results and "evaluate/val/score" in results
    copied, tokenizer = load_finetuned(f"{run.data.tags['cache.teacher.path']}/model")
    original, _ = load_finetuned(users)
    batch = tokenizer(["my parcel never came", "refund my invoice"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(copied(**batch).logits, original(**batch).logits)  # not re-trained

    pipeline.run(own_cfg(make_cfg, tmp_path / "data", *overrides))  # same folder: the cache
    save_users_model(users, tmp_path / "data", ["billing", "shipping", "account"])  # changed: taken afresh
    with pytest.raises(FastformersError, match="in another order"):
        pipeline.run(own_cfg(make_cfg, tmp_path / "data", *overrides))
    _, runs = mlflow_runs(cfg)
    assert [r.data.tags.get("cache.teacher") for r in runs] == ["miss", "hit", None]


def test_a_teacher_whose_labels_differ_is_refused(tmp_path):
    data = tmp_path / "data"
    task = make_task(data, files=tiny_data(data))
    where = "teacher.pretrained=/m"
    config = AutoConfig.for_model("bert", num_labels=3)
    config.id2label = {0: "positive", 1: "negative", 2: "neutral"}
    with pytest.raises(FastformersError, match=r"outputs are named \['positive', 'negative', 'neutral'\] but task"):
        teacher_stage.check_labels(config, task, where)
    config.id2label = {0: "billing", 1: "account", 2: "shipping"}
    with pytest.raises(FastformersError, match=r"another order .* task.labels=\[billing,account,shipping\]"):
        teacher_stage.check_labels(config, task, where)
    with pytest.raises(FastformersError, match=r"has 2 outputs \['LABEL_0', 'LABEL_1'\] but task .* has 3 labels"):
        teacher_stage.check_labels(AutoConfig.for_model("bert", num_labels=2), task, where)
    config.id2label = {0: "Account", 1: "Billing", 2: "Shipping"}
    teacher_stage.check_labels(config, task, where)  # the task's names, in its order


def test_a_base_model_or_missing_folder_is_no_teacher(make_cfg, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(FastformersError, match="holds BertModel, not a fine-tuned sequence classifier"):
        pipeline.validate(make_cfg(f"teacher.pretrained={base}", "stages=[evaluate]"))
    with pytest.raises(FastformersError, match="is not a local folder"):
        pipeline.validate(make_cfg(f"teacher.pretrained={tmp_path / 'nowhere'}", "stages=[evaluate]"))
    with pytest.raises(FastformersError, match="'finetune' and 'teacher' both make the teacher"):
        pipeline.validate(make_cfg(f"teacher.pretrained={base}", "stages=[teacher,finetune,evaluate]"))
