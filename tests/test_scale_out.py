"""Scaling out: parallel jobs build a shared cache entry once (the build lock, its stale-lock rule), and DDP
training on 2 processes writes one entry and one MLflow run and trains the model one process would."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest

from fastformers import cache as cache_module
from fastformers.cache import StageCache
from fastformers.data import load_examples, make_loader
from fastformers.errors import FastformersError
from fastformers.models import load_finetuned, score_examples
from fastformers.tasks import TASKS
from fastformers.tracking import ROLE_TAG
from tests.test_sweeps import TINY, TINY_SWEEP, cli, runs_of, store


def _build_once(root: str, log: str) -> None:
    """One parallel job: build the entry unless another job does; either way read it."""
    cache = StageCache(root)
    with cache.claimed("finetune", "k1") as mine:
        if mine:
            with cache.build("finetune", "k1", {}) as scratch:
                time.sleep(1.0)  # long enough for the other job to find the lock
                (scratch / "model.bin").write_text("weights")
            with open(log, "a") as stream:
                stream.write(f"built by {os.getpid()}\n")
    assert (cache.entry("finetune", "k1") / "model.bin").read_text() == "weights"


def test_parallel_jobs_build_a_shared_entry_once(tmp_path):
    log = tmp_path / "builds.txt"
    jobs = [multiprocessing.Process(target=_build_once, args=(str(tmp_path / "c"), str(log))) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(30)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert not list((tmp_path / "c" / "finetune").glob(".*.lock"))  # released


def _lock(cache: StageCache, holder: dict, age: float = 0.0) -> Path:
    lock = cache.root / "finetune" / ".k1.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"token": "t", **holder}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def _claim_in_thread(cache: StageCache) -> threading.Event:
    done = threading.Event()

    def claim():
        with cache.claimed("finetune", "k1") as mine:
            assert mine
            done.set()

    threading.Thread(target=claim, daemon=True).start()
    return done


def test_a_dead_builders_lock_is_taken_over_and_a_live_ones_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "POLL", 0.05)
    cache = StageCache(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _lock(cache, {"host": cache_module.this_host(), "pid": int(gone.stdout)})  # this host, process gone
    assert _claim_in_thread(cache).wait(5)
    _lock(cache, {"host": "other-node", "pid": 1}, age=cache_module.STALE + 60)  # another host, no heartbeat
    assert _claim_in_thread(cache).wait(5)
    lock = _lock(cache, {"host": "other-node", "pid": 1})  # another host, heartbeat fresh: a live build
    done = _claim_in_thread(cache)
    assert not done.wait(0.5)
    lock.unlink()  # its builder finished (here: without an entry, so this job builds)
    assert done.wait(5)


def test_a_ddp_worker_stops_waiting_when_nobody_builds_the_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "POLL", 0.05)
    with pytest.raises(FastformersError, match=r"stage finetune: entry .* was not written within .* rank 0"):
        StageCache(tmp_path).wait_for("finetune", "k1", idle_timeout=0.2)


@pytest.mark.slow
def test_a_parallel_pruning_sweep_fine_tunes_and_distils_once(superglue_root, tmp_path):
    done = cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *TINY_SWEEP,
        f"data.root={superglue_root}",
        "pruning.heads=1.0,0.5",
        "mlflow.experiment_name=parallel_sweep",
        cwd=tmp_path,
    )
    _, runs = runs_of(store(tmp_path), "parallel_sweep")
    jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for stage in ("finetune", "distill"):
        assert sorted(r.data.tags[f"cache.{stage}"] for r in jobs) == ["hit", "miss"], stage
        assert len({r.data.tags[f"cache.{stage}.path"] for r in jobs}) == 1
    assert done.stdout.count("stage finetune: ran") == 1


DDP_RUN = [
    *TINY,
    "finetune.epochs=2",
    "finetune.batch_size=8",  # the global batch: 4 per rank under DDP; 48 fixture examples = 6 full batches
    "+teacher.arch.hidden_dropout_prob=0.0",  # no dropout: the two layouts then take the same steps
    "+teacher.arch.attention_probs_dropout_prob=0.0",
    "stages=[finetune,evaluate]",
    "mlflow.experiment_name=ddp",
]


@pytest.mark.slow
def test_ddp_on_two_processes_writes_one_entry_and_one_run_and_trains_what_one_process_would(superglue_root, tmp_path):
    """Same global batches, no dropout: DDP's averaged gradients equal one process's up to the order of float sums
    (~1e-7 relative). AdamW divides each step by the root of the squared gradients, so where a gradient is near
    zero that noise becomes a step of up to the learning rate (1e-3 here): after 12 steps the logits agree to
    ~1e-3 (measured: 3e-4), not 1e-6, and the predictions and scores agree exactly."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for folder, layout in ((ddp, "hardware=ddp"), (single, "hardware=cpu")):
        folder.mkdir()
        cli(layout, *DDP_RUN, f"data.root={superglue_root}", cwd=folder)
    entries = {name: list((folder / "outputs" / "cache" / "finetune").iterdir()) for name, folder in
               (("ddp", ddp), ("single", single))}  # fmt: skip
    assert [len(found) for found in entries.values()] == [1, 1]  # one entry, no scratch left by the other rank
    _, runs = runs_of(store(ddp), "ddp")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["hardware.devices"] == "2"
    _, (one,) = runs_of(store(single), "ddp")
    assert runs[0].data.metrics["evaluate/val/score"] == one.data.metrics["evaluate/val/score"]
    examples = load_examples(TASKS["cb"], superglue_root, "val")
    logits = []
    for name in ("ddp", "single"):
        model, tokenizer = load_finetuned(entries[name][0] / "model")
        logits.append(score_examples(model, make_loader(examples, tokenizer, TASKS["cb"], 128, 8)))
    numpy.testing.assert_allclose(logits[0], logits[1], atol=2e-3)
    assert (numpy.argmax(logits[0], 1) == numpy.argmax(logits[1], 1)).all()
    assert not numpy.allclose(logits[0], numpy.zeros_like(logits[0]))
