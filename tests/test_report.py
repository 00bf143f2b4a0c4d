"""The report's paper layouts read back from MLflow runs: Table 3 (cumulative ablation rows) and Table 4 (one row
per task, a skipped task saying why, the submission files in one archive)."""

import json
import shutil
import zipfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import matthews_corrcoef

from fastformers.data.fixtures import write_diagnostics
from fastformers.data.tasks import DIAGNOSTICS
from fastformers.run import pipeline
from fastformers.tracking.report import ablation_table, collect, experiment_runs, report, row_points
from fastformers.tracking.runs import SKIPPED_TAG


def log_run(name, params, metrics, tags=None, files=None, tmp_path=None):
    with mlflow.start_run(run_name=name, tags=tags or {}):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for relative, text in (files or {}).items():
            path = tmp_path / relative.split("/")[-1]
            path.write_text(text)
            mlflow.log_artifact(str(path), relative.rsplit("/", 1)[0])


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def bench(setting, wall, speedup, joules=None):
    values = {
        f"benchmark/{setting}/wall_seconds": wall,
        f"benchmark/{setting}/speedup": speedup,
        f"benchmark/{setting}/throughput": 100 / wall,
        f"benchmark/{setting}/latency_p50_ms": wall,
    }
    return values | ({f"benchmark/{setting}/joules_per_example": joules} if joules else {})


def test_ablation_rows_read_cumulative_and_per_step_speedups(store, tmp_path):
    mlflow.set_experiment("ablation")
    rows = [
        (1, "baseline", "baseline", 10.0, 1.0),
        (2, "dynamic_length", "dynamic_length", 5.0, 2.0),
        (3, "distillation", "distilled", 2.5, 4.0),
    ]
    for order, name, setting, wall, speedup in reversed(rows):  # logged out of order: the table sorts by row
        log_run(
            f"boolq/{order}",
            {"row.order": order, "row.name": name, "row.setting": setting, "task.name": "boolq"},
            {"evaluate/val_60-100pct/score": 0.7 - order / 100} | bench(setting, wall, speedup),
        )
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ablation").experiment_id])
    table = ablation_table(runs)
    assert table[2].startswith("| baseline | baseline | 10 | 1 | 1 | 0.69 |")
    assert table[3].startswith("| dynamic_length | dynamic_length | 5 | 2 | 2 | 0.68 |")
    assert table[4].startswith("| distillation | distilled | 2.5 | 2 | 4 | 0.67 |")


def test_a_multi_task_experiment_gets_a_task_table_with_skips_and_one_submission_archive(store, tmp_path):
    mlflow.set_experiment("tasks")
    missing_ax = {"evaluate/diagnostics_missing.json": '["AX-b.jsonl (no /x/AX-b/AX-b.jsonl)"]'}
    for task, joules in (("cb", 0.5), ("rte", 0.25)):
        log_run(
            task,
            {"task.name": task},
            {"finetune/best_val_score": 0.85, "evaluate/val/accuracy": 0.8, "evaluate/val/score": 0.8}
            | bench("baseline", 10.0, 1.0, 1.0)
            | bench("system", 2.0, 5.0, joules),
            files={f"evaluate/submission/{task.upper()}.jsonl": '{"idx": 0, "label": "entailment"}\n'}
            | (missing_ax if task == "rte" else {}),
            tmp_path=tmp_path,
        )
    log_run("record", {"task.name": "record"}, {}, tags={SKIPPED_TAG: "missing data file /x/ReCoRD/train.jsonl"})
    files = report(store, "tasks", tmp_path / "out")
    table = (tmp_path / "out" / "tasks.md").read_text().splitlines()
    assert table[2] == "| cb | 0.85 | accuracy 0.8000 (val) | 5x (system) | 2.0x | CB.jsonl |"
    assert table[3] == "| record | not run: missing data file /x/ReCoRD/train.jsonl | | | | |"
    assert table[4] == "| rte | 0.85 | accuracy 0.8000 (val) | 5x (system) | 4.0x | RTE.jsonl |"
    with zipfile.ZipFile(tmp_path / "out" / "superglue_submission.zip") as bundle:
        assert sorted(bundle.namelist()) == ["CB.jsonl", "MISSING.txt", "RTE.jsonl"]
        missing = bundle.read("MISSING.txt").decode().splitlines()
    assert missing == [
        "BoolQ.jsonl: no run of this experiment made it",
        "COPA.jsonl: no run of this experiment made it",
        "MultiRC.jsonl: no run of this experiment made it",
        "ReCoRD.jsonl: missing data file /x/ReCoRD/train.jsonl",
        "WiC.jsonl: no run of this experiment made it",
        "AX-b.jsonl: no /x/AX-b/AX-b.jsonl",
        "AX-g.jsonl: no run of this experiment made it",
    ]
    assert table[-1].startswith("The archive lacks 7 of the leaderboard's 9 files")
    assert tmp_path / "out" / "superglue_submission.zip" in files


def test_a_task_without_data_is_skipped_with_the_reason_when_asked(make_cfg, superglue_root, tmp_path):
    data = shutil.copytree(superglue_root, tmp_path / "data")
    shutil.rmtree(data / "CB")
    assert pipeline.run(make_cfg("data.skip_missing=true", data_root=data)) == {}
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fastformers").experiment_id])
    assert run.info.status == "FINISHED" and "missing data file" in run.data.tags[SKIPPED_TAG]


def test_a_rerun_point_replaces_its_older_run_and_fronts_are_per_task(store):
    mlflow.set_experiment("table")
    for name, score in (("cb/int8", 0.5), ("rte/int8", 0.6), ("cb/int8", 0.9)):  # cb re-run last
        log_run(name, {"task.name": name[:-5]}, {"evaluate/val/score": score} | bench("system", 1.0, 3.0))
    _, runs = experiment_runs(MlflowClient(store), "table")
    rows, _ = collect(runs, "table", None)
    assert [(r.run, r.score) for r in rows] == [("cb/int8", 0.9), ("rte/int8", 0.6)]
    assert all(r.pareto for r in rows)  # as fast and a lower score, but of another task: not dominated
    rows, _ = collect(runs, "table", None, all_runs=True)
    assert [r.score for r in rows] == [0.5, 0.6, 0.9]


@pytest.mark.slow
def test_rtes_model_answers_the_diagnostics_whose_files_are_there(make_cfg, superglue_root, tmp_path):
    data = write_diagnostics(shutil.copytree(superglue_root, tmp_path / "data"))
    (data / "AX-g" / "AX-g.jsonl").unlink()
    results = pipeline.run(make_cfg("task=rte", "evaluate.splits=[val,test]", data_root=data))
    assert not any(k.startswith("evaluate/AX-g") for k in results)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fastformers").experiment_id])
    entry = Path(run.data.tags["cache.evaluate.path"])
    lines = [json.loads(line) for line in (entry / "submission" / "AX-b.jsonl").read_text().splitlines()]
    assert [line["idx"] for line in lines] == list(range(12))
    assert {line["label"] for line in lines} <= {"entailment", "not_entailment"}
    golds = [json.loads(line)["label"] for line in (data / "AX-b" / "AX-b.jsonl").read_text().splitlines()]
    assert results["evaluate/AX-b/mcc"] == pytest.approx(matthews_corrcoef(golds, [line["label"] for line in lines]))
    assert json.loads((entry / "diagnostics_missing.json").read_text())[0].startswith("AX-g.jsonl (no ")


def test_winogender_parity_counts_pairs_predicted_alike():
    (axb, axg) = DIAGNOSTICS["RTE"]
    examples = [e for i in range(4) for e in axg.read({"premise": "p", "hypothesis": "h", "idx": i, "pair_id": i // 2,
                                                        "label": "entailment"})]  # fmt: skip
    scores = axg.score(examples, [0, 0, 0, 1])  # pair 0 alike, pair 1 split
    assert scores["gender_parity"] == 0.5 and scores["accuracy"] == 0.75
    assert axb.name == "AX-b" and axg.name == "AX-g"


def bench_row(name, score, throughput, gate=None, skipped=None, passed=None):
    metrics = {} if skipped else {"score": score, "throughput": throughput, "throughput_lo": throughput * 0.9,
                                  "throughput_hi": throughput * 1.1, "latency_p50_ms": 1000 / throughput,
                                  "gflops_per_example": 2.0}  # fmt: skip
    if passed is not None:
        metrics["gate_passed"] = passed
    return {"name": name, "skipped": skipped, "metrics": metrics, "gate": gate}


def test_a_benchmark_run_plots_every_row_with_gated_out_rows_marked_and_the_pick_labelled(store, tmp_path):
    mlflow.set_experiment("speed")
    interval = {"score_delta_lo_points": -2.0, "score_delta_hi_points": 1.0}
    bench_json = {
        "reference": "onnx_int8_stock",
        "pick": "ours",
        "agreement_reference": "onnx_fp32",
        "rows": [
            bench_row("onnx_fp32", 0.80, 50),
            bench_row("onnx_int8_stock", 0.79, 80, interval, passed=1.0),
            bench_row("ours", 0.80, 120, interval, passed=1.0),
            bench_row(
                "broken", 0.60, 150, {"score_delta_lo_points": -25.0, "score_delta_hi_points": -15.0}, passed=0.0
            ),
            bench_row("openvino_bf16", 0, 0, skipped="this CPU offers no bf16 arithmetic"),
        ],
    }
    log_run(
        "rte/speed",
        {"task.name": "rte"},
        {"evaluate/val/score": 0.8} | bench("ours", 1.0, 3.0),
        tags={"benchmark.pick": "ours"},
        files={"benchmark/benchmark.json": json.dumps(bench_json)},
        tmp_path=tmp_path,
    )
    files = report(store, "speed", tmp_path / "out")
    assert tmp_path / "out" / "rows_rte_speed.png" in files
    points = row_points(bench_json)
    assert [p.name for p in points] == ["onnx_fp32", "onnx_int8_stock", "ours", "broken"]  # one marker per timed row
    assert [p.gated_out for p in points] == [False, False, False, True]
    assert [p.label for p in points] == ["", "reference", "pick", ""]
    assert points[2].score_lo == pytest.approx(0.78) and points[2].score_hi == pytest.approx(0.81)  # fp32 + delta
    assert points[2].gmacs == 1.0 and points[2].throughput_lo == pytest.approx(108)


def test_a_multi_task_experiment_plots_each_task_against_its_own_teacher(store, tmp_path):
    mlflow.set_experiment("table")
    for task in ("cb", "rte"):
        log_run(task, {"task.name": task}, {"finetune/best_val_score": 0.85, "evaluate/val/score": 0.8}
                | bench("system", 2.0, 5.0))  # fmt: skip
    files = {path.name for path in report(store, "table", tmp_path / "out")}
    assert "tasks_vs_teacher.png" in files and "accuracy_vs_latency.png" not in files  # no front across tasks
