"""End to end on fixture data with a tiny model: fine-tune, evaluate, MLflow, cache, failures, CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastformers.errors import FastformersError
from fastformers.run import pipeline
from tests.helpers import mlflow_runs, rescored


@pytest.mark.slow
def test_finetune_lowers_the_loss_and_logs_everything_to_mlflow(make_cfg):
    cfg = make_cfg("finetune.epochs=10", "finetune.learning_rate=5e-3", "evaluate.splits=[val,test]")
    results = pipeline.run(cfg)

    client, runs = mlflow_runs(cfg)
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["task.name"] == "cb" and run.data.params["finetune.epochs"] == "10"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "finetune/train_loss_epoch")]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    assert run.data.metrics["evaluate/val/score"] == pytest.approx(results["evaluate/val/score"])
    assert {"evaluate/val/accuracy", "evaluate/val/f1", "finetune/parameters"} <= set(run.data.metrics)
    assert results["evaluate/val/accuracy"] > 0.5  # 3 balanced classes: chance is 1/3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert "evaluate/predictions_val.jsonl" in artifacts
    submission = [a.path for a in client.list_artifacts(run.info.run_id, "evaluate/submission")]
    assert submission == ["evaluate/submission/CB.jsonl"]
    assert not client.list_artifacts(run.info.run_id, "finetune/model")  # weights stay in the cache


@pytest.mark.slow
def test_test_split_gets_a_leaderboard_file(make_cfg):
    cfg = make_cfg("task=rte", "finetune.epochs=1", "evaluate.splits=[test]")
    pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    folder = run.data.tags["cache.evaluate.path"]
    lines = [json.loads(line) for line in open(f"{folder}/submission/RTE.jsonl")]
    assert len(lines) == 9 and set(lines[0]) == {"idx", "label"}
    assert {line["label"] for line in lines} <= {"entailment", "not_entailment"}


@pytest.mark.slow
def test_stage_cache_is_reused_and_invalidated_by_upstream_settings(make_cfg):
    pipeline.run(make_cfg("finetune.epochs=1"))
    pipeline.run(make_cfg("finetune.epochs=1", "evaluate.batch_size=7"))  # only evaluate changed
    pipeline.run(make_cfg("finetune.epochs=1", "finetune.learning_rate=2e-3"))  # upstream changed
    _, runs = mlflow_runs(make_cfg())
    tags = [(r.data.tags["cache.finetune"], r.data.tags["cache.evaluate"]) for r in runs]
    assert tags == [("miss", "miss"), ("hit", "miss"), ("miss", "miss")]
    assert runs[1].data.metrics["finetune/best_val_score"] == runs[0].data.metrics["finetune/best_val_score"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, teacher", [("copa", "tiny_roberta"), ("record", "tiny_bert"), ("multirc", "tiny_roberta")]
)
def test_candidate_and_grouped_tasks_run_end_to_end(make_cfg, task, teacher):
    whole_splits = [
        "task.train_split=train",
        "task.eval_split=val",
    ]  # the fixture files are tiny: not scale=cpu's shares
    cfg = make_cfg(f"task={task}", f"teacher={teacher}", "finetune.epochs=1", *whole_splits)
    results = pipeline.run(cfg)
    metrics, count = rescored(cfg)  # the predictions it wrote (grouped by question), scored again
    assert count and results["evaluate/val/score"] == pytest.approx(metrics["score"])
    metric = {"copa": "accuracy", "record": "f1", "multirc": "f1a"}[task]
    assert f"evaluate/val/{metric}" in results


@pytest.mark.slow
def test_a_failing_stage_marks_the_run_failed_and_keeps_finished_stages(make_cfg, superglue_root, tmp_path):
    data = shutil.copytree(superglue_root, tmp_path / "data")
    (data / "CB" / "test.jsonl").write_text('{"premise": "x", "hypothesis": "y", "idx": 0}\n{"premise": \n')
    cfg = make_cfg("finetune.epochs=1", "evaluate.splits=[val,test]", data_root=data)
    with pytest.raises(FastformersError, match=r"CB/test.jsonl:2: not valid JSON"):
        pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED"
    assert run.data.tags["cache.finetune"] == "miss"
    assert os.path.isfile(f"{run.data.tags['cache.finetune.path']}/model/model.safetensors")
    assert "cache.evaluate" not in run.data.tags


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[evaluate]"], "'evaluate' needs the 'model' output of an earlier stage"),
        (["stages=[finetune,distil]"], "unknown stage 'distil'"),
        (["finetune.learning_rate=0"], "finetune.learning_rate=0 must be a positive number"),
        (["task.name=glue"], "task.name='glue' is not a SuperGLUE task"),
        (["student.family=roberta"], "distillation stays within one family"),
        (["evaluate.splits=[dev]"], "split 'dev' is not train, val, test"),
        (["hardware.accelerator=tpu"], "hardware.accelerator='tpu' must be cpu, gpu or auto"),
    ],
)
def test_bad_configs_fail_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


def _cli(*args, cwd):
    env = {**os.environ, "MLFLOW_RUN_ID": "stray-run-id"}
    return subprocess.run(
        [sys.executable, "-m", "fastformers.run.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_runs_a_job_and_reports_bad_input_in_one_line(superglue_root, tmp_path):
    ok = _cli("teacher=tiny_bert", f"data.root={superglue_root}", "finetune.epochs=1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "outputs" / "mlflow.db").is_file()
    assert list((tmp_path / "outputs" / "runs").glob("*/*/.hydra/config.yaml"))

    missing = _cli("teacher=tiny_bert", f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert missing.returncode == 2
    error_lines = [line for line in missing.stderr.splitlines() if line.startswith("fastformers: error:")]
    assert error_lines == [
        f"fastformers: error: missing data file {tmp_path}/nowhere/CB/train.jsonl "
        "(set data.download=true to fetch the official archive, or data.root / $SUPERGLUE_DIR)"
    ]

    unknown = _cli("task=glue", cwd=tmp_path)
    assert unknown.returncode != 0 and "task" in unknown.stderr and "glue" in unknown.stderr


@pytest.mark.slow
def test_cli_prints_the_composed_config(tmp_path):
    shown = _cli("--cfg", "job", "task=rte", "teacher=roberta_base", cwd=tmp_path)
    assert shown.returncode == 0
    assert "name: rte" in shown.stdout and "pretrained: roberta-base" in shown.stdout


def test_learning_rate_is_the_models_unless_the_task_pins_one():
    from hydra import compose, initialize_config_dir

    from fastformers.run.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):

        def rates(*overrides):
            cfg = compose("config", overrides=list(overrides))
            return cfg.finetune.learning_rate, cfg.distill.learning_rate

        assert rates("task=cb") == (1e-4, 1e-4)  # minilm_l6's own rate
        assert rates("task=cb", "teacher=bert_base") == (2e-5, 2e-5)
        assert rates("task=rte") == (3e-5, 3e-5)  # pinned by conf/task/rte.yaml
        assert rates("task=rte", "finetune.learning_rate=5e-5") == (5e-5, 5e-5)


def test_the_cpu_scale_sizes_the_big_tasks_down_and_the_paper_scale_uses_the_official_splits():
    from hydra import compose, initialize_config_dir

    from fastformers.run.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):

        def sizes(*overrides):
            cfg = compose("config", overrides=list(overrides))
            return cfg.task.train_split, cfg.task.eval_split, cfg.task.max_seq_length, cfg.finetune.epochs

        assert sizes("task=multirc") == ("train[:3%]", "val[:10%]", 256, 1)
        assert sizes("task=multirc", "scale=paper") == ("train", "val", 512, 3)
        assert sizes("experiment=superglue_table", "task=wic") == ("train", "val", 128, 1)
        assert sizes("task=wic", "scale=paper") == ("train", "val", 128, 5)
        assert sizes("task=boolq") == ("val[:60%]", "val[60%:]", 256, 2)  # no BoolQ train file here
        assert sizes("task=boolq", "scale=paper") == ("train", "val", 512, 3)
        assert sizes("task=rte") == sizes("task=rte", "scale=paper")  # small tasks run whole at both scales


def test_the_paper_scale_composes_with_its_hub_models_and_a_gpu_and_says_so_without_one(superglue_root, tmp_path):
    import torch
    from hydra import compose, initialize_config_dir

    from fastformers.run.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=boolq_ablation",
                "+ablation=int8",
                "scale=paper",
                f"data.root={superglue_root}",
                f"paths.output_dir={tmp_path}",
            ],
        )
    assert (cfg.teacher.pretrained, cfg.student.name) == ("roberta-base", "distilroberta")
    assert (cfg.hardware.accelerator, cfg.hardware.train_precision) == ("gpu", "16-mixed")
    if not torch.cuda.is_available():
        with pytest.raises(FastformersError, match=r"hardware.accelerator=gpu \(gpu\): torch \S+ sees no CUDA device"):
            pipeline.run(cfg)
        assert not os.path.exists(cfg.paths.cache_dir)


@pytest.mark.slow
def test_the_training_precision_is_part_of_the_trained_models_key(make_cfg):
    pipeline.run(make_cfg("stages=[finetune]", "finetune.epochs=1"))
    pipeline.run(make_cfg("stages=[finetune]", "finetune.epochs=1", "hardware.train_precision=bf16-mixed"))
    pipeline.run(make_cfg("stages=[finetune]", "finetune.epochs=1"))
    _, runs = mlflow_runs(make_cfg())
    assert [run.data.tags["cache.finetune"] for run in runs] == ["miss", "miss", "hit"]
