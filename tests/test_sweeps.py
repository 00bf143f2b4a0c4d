"""Sweeps as a user runs them (the CLI in a subprocess): a tiny pruning_sweep grouped under one MLflow parent
run, its report from MLflow, a killed sweep resumed from the cache, the joblib and submitit launchers, the
Optuna sweeper, a remote tracking server, and the served model answering HTTP requests."""

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastformers.tracking.runs import ROLE_TAG
from tests.helpers import TINY, TINY_SWEEP, cli, free_port, runs_of, store

pytestmark = pytest.mark.slow  # subprocess runs, sweeps and servers: `make test-fast` skips them


def png_size(path: Path) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", blob[16:24])


def test_pruning_sweep_is_grouped_in_mlflow_reuses_the_cache_and_reports(superglue_root, tmp_path):
    cli("-m", *TINY_SWEEP, f"data.root={superglue_root}", "pruning.heads=1.0,0.5", cwd=tmp_path)
    client, runs = runs_of(store(tmp_path), "pruning_sweep")
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    assert parent.info.status == "FINISHED" and len(jobs) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in jobs)
    assert [r.info.run_name for r in jobs] == [
        "cb/tiny_bert/minilm_l3/h1.0-f0.5/int8",
        "cb/tiny_bert/minilm_l3/h0.5-f0.5/int8",
    ]
    first, second = jobs
    assert [second.data.tags[f"cache.{s}"] for s in ("finetune", "distill", "prune")] == ["hit", "hit", "miss"]
    assert second.data.metrics["prune/heads_kept"] == 2 and first.data.metrics["prune/heads_kept"] == 4

    out = tmp_path / "report"
    done = cli(
        "report", "--experiment", "pruning_sweep", "--tracking-uri", store(tmp_path), "--out", str(out), cwd=tmp_path
    )
    assert str(out / "report.md") in done.stdout
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run_id"] for r in rows] == [r.info.run_id for r in jobs]
    for row, run in zip(rows, jobs):
        setting = row["setting"]
        assert setting in ("onnx_fp32", "onnx_int8")
        assert float(row["score"]) == pytest.approx(run.data.metrics["evaluate/val/score"])
        assert float(row["latency_p50_ms"]) == pytest.approx(run.data.metrics[f"benchmark/{setting}/latency_p50_ms"])
        assert float(row["throughput"]) == pytest.approx(run.data.metrics[f"benchmark/{setting}/throughput"])
    assert any(r["pareto"] == "True" for r in rows)
    assert len((out / "report.md").read_text().splitlines()) == 2 + len(rows)
    for name in ("accuracy_vs_latency.png", "accuracy_vs_throughput.png"):
        assert png_size(out / name) == (800, 500)
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    rows = {"rows_cb_tiny_bert_minilm_l3_h1.0-f0.5_int8.png", "rows_cb_tiny_bert_minilm_l3_h0.5-f0.5_int8.png"}
    assert logged == {"report.csv", "report.md", "accuracy_vs_latency.png", "accuracy_vs_throughput.png"} | rows


def test_a_killed_sweep_run_again_redoes_only_the_unfinished_point(superglue_root, tmp_path):
    args = ["-m", *TINY_SWEEP, f"data.root={superglue_root}", "pruning.heads=1.0,0.5"]
    sweep = cli(*args, cwd=tmp_path, wait=False)
    prune_cache = tmp_path / "outputs" / "cache" / "prune"
    deadline = time.time() + 300
    while not (prune_cache.exists() and any(p.name[0] != "." for p in prune_cache.iterdir())):
        assert sweep.poll() is None and time.time() < deadline, "the sweep ended before its first point pruned"
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)  # mid-sweep: the first point's model is pruned, the second never ran
    sweep.wait()
    finished_prune = {p.name for p in prune_cache.iterdir() if p.name[0] != "."}

    cli(*args, cwd=tmp_path)
    _, runs = runs_of(store(tmp_path), "pruning_sweep")
    again = [r for r in runs if r.info.status == "FINISHED" and ROLE_TAG not in r.data.tags]
    assert len(again) == 2
    assert [again[0].data.tags[f"cache.{s}"] for s in ("finetune", "distill", "prune")] == ["hit", "hit", "hit"]
    assert again[1].data.tags["cache.prune"] == "miss"
    assert Path(again[0].data.tags["cache.prune.path"]).name in finished_prune
    assert not [p for p in prune_cache.iterdir() if p.name.endswith(".tmp")]  # no half-written entry left behind


def test_joblib_launcher_runs_two_jobs_in_parallel_on_a_fresh_store_and_loses_nothing(superglue_root, tmp_path):
    cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY,
        f"data.root={superglue_root}",
        "seed=1,2",
        "mlflow.experiment_name=parallel",
        cwd=tmp_path,
    )
    client, runs = runs_of(store(tmp_path), "parallel")
    jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    assert sorted(r.data.params["seed"] for r in jobs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in jobs:
        assert {"finetune/best_val_score", "evaluate/val/score", "evaluate/val/f1"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "finetune/val_score")) == 1  # one per epoch


def test_submitit_local_launcher_runs_a_job(superglue_root, tmp_path):
    cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        *TINY,
        f"data.root={superglue_root}",
        "mlflow.experiment_name=submitit",
        cwd=tmp_path,
    )
    _, runs = runs_of(store(tmp_path), "submitit")
    (job,) = [r for r in runs if ROLE_TAG not in r.data.tags]
    assert job.info.status == "FINISHED" and "evaluate/val/score" in job.data.metrics


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else "exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def background(*command, cwd: Path, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env_vars}  # uvicorn by name
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def test_a_job_logs_to_a_remote_tracking_server(superglue_root, tmp_path):
    port = free_port()
    server = background(
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root",
        str(tmp_path / "server-artifacts"),
        cwd=tmp_path,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        uri = f"http://127.0.0.1:{port}"
        cli(
            *TINY,
            f"data.root={superglue_root}",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment_name=remote",
            cwd=tmp_path,
        )
        client, (run,) = runs_of(uri, "remote")
        assert run.info.status == "FINISHED" and "evaluate/val/score" in run.data.metrics
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        stop(server)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_logged_model_serves_labels_and_rejects_a_malformed_request(superglue_root, tmp_path):
    cli(
        *TINY,
        f"data.root={superglue_root}",
        "stages=[finetune,export]",
        "precision=int8",
        "precision.min_agreement=0.5",
        "mlflow.experiment_name=serve",
        cwd=tmp_path,
    )
    _, (run,) = runs_of(store(tmp_path), "serve")
    model_files = [p.name for p in (tmp_path / "outputs" / "mlartifacts").rglob("*") if p.is_file()]
    assert sum(name.endswith(".onnx") for name in model_files) == 1, model_files  # the served graph alone
    port = free_port()
    server = background(
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"runs:/{run.info.run_id}/model",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=tmp_path,
        MLFLOW_TRACKING_URI=store(tmp_path),
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        url = f"http://127.0.0.1:{port}/invocations"
        records = [
            {"premise": "The cat sat on the mat.", "hypothesis": "A cat sat.", "idx": 7},
            {"premise": "It rained all day.", "hypothesis": "It was dry.", "idx": 8},
        ]
        status, answer = post(url, json.dumps({"inputs": records}).encode())
        assert status == 200, answer
        assert [p["idx"] for p in answer["predictions"]] == [7, 8]
        assert all(p["label"] in ("entailment", "contradiction", "neutral") for p in answer["predictions"])

        status, answer = post(url, json.dumps({"inputs": [{"premise": "no hypothesis", "idx": 1}]}).encode())
        assert 400 <= status < 500 and "hypothesis" in answer["message"]
        status, _ = post(url, b"{not json")
        assert 400 <= status < 500
    finally:
        stop(server)


def test_a_terminated_job_ends_its_mlflow_run_killed(superglue_root, tmp_path):
    job = cli(
        *TINY,
        f"data.root={superglue_root}",
        "finetune.epochs=50",
        "mlflow.experiment_name=stopped",
        cwd=tmp_path,
        wait=False,
    )
    deadline = time.time() + 120
    while not list((tmp_path / "outputs" / "cache" / "finetune").glob(".*.tmp/checkpoints/*")):  # an epoch is done
        assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-2000:]
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    log = tmp_path / "job.log"
    try:
        assert job.wait(timeout=120) != 0, log.read_text()[-3000:]
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job ignored SIGTERM for 120 s:\n{log.read_text()[-3000:]}") from None
    _, (run,) = runs_of(store(tmp_path), "stopped")
    assert run.info.status == "KILLED", log.read_text()[-3000:]
    (kept,) = (tmp_path / "outputs" / "cache" / "finetune").iterdir()  # no entry: the stopped build's files, kept
    assert ".failed-" in kept.name and list(kept.glob("checkpoints/*"))
