"""Scaling out: parallel jobs build a shared cache entry once (the build lock, its stale-lock rule), and DDP
training on 2 processes writes one entry and one MLflow run and trains the model one process would."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy
import pytest
from flufl.lock import Lock

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
    assert not list((tmp_path / "c" / "finetune").glob(".k1.lock*"))  # released: lock, claims, owner files


def _held(cache: StageCache, owner: dict, expired: bool = False) -> Lock:
    """The entry's build lock as another builder holds it: a flufl lock with `owner` recorded beside its claim."""
    path = cache.root / "finetune" / ".k1.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = Lock(str(path), lifetime=timedelta(seconds=cache_module.LEASE))
    lock.lock()
    Path(lock.claimfile + cache_module.OWNER_SUFFIX).write_text(json.dumps(owner))
    if expired:  # its last refresh is long past: flufl breaks it
        os.utime(path, (time.time() - 120, time.time() - 120))
    return lock


def _claim_in_thread(cache: StageCache) -> tuple[threading.Thread, list[bool]]:
    """A job claiming the entry; the list gets what `claimed` yielded once the claim is released."""
    got: list[bool] = []

    def claim():
        with cache.claimed("finetune", "k1") as mine:
            got.append(mine)

    thread = threading.Thread(target=claim, daemon=True)
    thread.start()
    return thread, got


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)


def _owner(**changes) -> dict:
    return {**cache_module.owner_identity(), **changes}


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(lambda: _owner(pid=_dead_pid()), id="pid-gone"),
        pytest.param(lambda: _owner(started=1.0), id="pid-reused"),  # our pid, another start time
    ],
)
def test_a_dead_builders_lock_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch, owner, capsys):
    monkeypatch.setattr(cache_module, "POLL", 0.05)
    cache = StageCache(tmp_path)
    _held(cache, owner())  # its lease is fresh for LEASE seconds: only the owner check can end it
    thread, got = _claim_in_thread(cache)
    thread.join(60)
    assert got == [True]
    assert not list((tmp_path / "finetune").glob(".k1.lock*"))  # released: the lock, claims and owner files
    assert "waiting for" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(lambda: _owner(pid_ns=1, pid=_dead_pid()), id="container-same-host-name"),
        pytest.param(lambda: _owner(host="other-node", pid=_dead_pid()), id="other-host"),
    ],
)
def test_a_live_lease_of_another_namespace_or_host_is_waited_for_an_expired_one_taken_over(
    tmp_path, monkeypatch, owner, capsys
):
    monkeypatch.setattr(cache_module, "POLL", 0.05)
    cache = StageCache(tmp_path)
    held = owner()
    lock = _held(cache, held)  # its pid does not exist here, which proves nothing in another namespace or host
    thread, got = _claim_in_thread(cache)
    thread.join(3)
    assert thread.is_alive() and got == []  # still waiting
    lock.unlock()  # its builder finished (here: without an entry, so this job builds)
    thread.join(60)
    assert got == [True]
    assert f"stage finetune: waiting for {held['pid']}@{held['host']}, which is building it" in capsys.readouterr().out
    _held(cache, owner(), expired=True)  # its builder died: nobody refreshed the lease
    thread, got = _claim_in_thread(cache)
    thread.join(60)
    assert got == [True]


def test_a_builder_keeps_refreshing_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "HEARTBEAT", 0.05)
    cache = StageCache(tmp_path)
    lock = tmp_path / "finetune" / ".k1.lock"
    with cache.claimed("finetune", "k1") as mine:
        assert mine
        first = lock.stat().st_mtime  # the end of the lease
        deadline = time.monotonic() + 60
        while lock.stat().st_mtime <= first:  # mtime has 1 s steps here (flufl writes whole seconds)
            assert time.monotonic() < deadline, "the lease was never refreshed"
            time.sleep(0.1)
        assert lock.stat().st_mtime > time.time() + cache_module.LEASE - 30
    assert not lock.exists()


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
