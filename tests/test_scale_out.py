"""Scaling out: parallel jobs build a shared cache entry once (the build lock, its stale-lock rule), and DDP
training on 2 processes writes one entry and one MLflow run, trains the model one process would, and follows
rank 0's build-or-read decisions while another job holds a build lock (Lightning's launcher and torchrun)."""

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy
import psutil
import pytest
from flufl.lock import Lock
from omegaconf import OmegaConf

from fastformers.data.loading import load_examples, make_loader
from fastformers.data.tasks import TASKS
from fastformers.errors import FastformersError
from fastformers.models.loading import load_finetuned, score_examples
from fastformers.run import cache as cache_module
from fastformers.run.cache import StageCache
from fastformers.tracking.runs import ROLE_TAG
from fastformers.training import distributed
from tests.helpers import TINY, TINY_SWEEP, cli, free_port, hold_distill_then_build, runs_of, store


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


# ---------------------------------------------------------------- DDP ranks follow rank 0's build-or-read decisions


def test_a_ddp_worker_follows_rank_0s_decisions_and_stops_when_rank_0_fails_or_goes_silent(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "POLL", 0.01)
    rank0 = distributed.Decisions(tmp_path)
    rank0.publish("finetune", "k1", distributed.READ)
    assert rank0.wait("finetune", "k1") == (distributed.READ, "k1")
    assert rank0.wait("finetune", None) == (distributed.READ, "k1")  # a measurement: rank 0's key is taken
    with pytest.raises(FastformersError, match="stage finetune: rank 0's cache key k1 differs from this rank's k2"):
        rank0.wait("finetune", "k2")
    with pytest.raises(FastformersError, match=r"stage distill: rank 0 published no decision .* \(did rank 0 fail"):
        rank0.wait("distill", "k3", patience=0.1)  # no heartbeat ever
    rank0.fail("RuntimeError: out of memory")
    with pytest.raises(FastformersError, match="stage distill: rank 0 failed: RuntimeError: out of memory"):
        rank0.wait("distill", "k3", patience=60)


def test_one_process_publishes_no_decisions(tmp_path):
    with distributed.leading(tmp_path, OmegaConf.create({"devices": 1, "num_nodes": 1})) as decisions:
        assert decisions is None
    assert not (tmp_path / distributed.DECISIONS).exists()


HELD_RUN = [
    *DDP_RUN,
    "stages=[finetune,distill,evaluate]",
    "student=minilm_l3",
    "student.layers=[1]",  # a 1-layer student of the 2-layer tiny teacher
    "distill.batch_size=8",
    "mlflow.experiment_name=held",
]


def ddp_command(launcher: str, *args: str) -> list[str]:
    """The two ways of starting DDP ranks: Lightning starts ranks 1.. at rank 0's first fit; torchrun starts both
    (no --rdzv-id: the run id is 'none', as in a plain `torchrun --nproc_per_node=2`)."""
    if launcher == "lightning":
        return [sys.executable, "-m", "fastformers.run.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "fastformers.run.cli", *args]  # fmt: skip


def finish_or_kill(job: subprocess.Popen, log: Path, seconds: float) -> int:
    """The job's exit code once every rank has ended (Lightning's rank 1 is not our child: rank 0 may exit first,
    and a rank stuck in a collective only fails once rank 0 is gone); the test fails if that takes `seconds`."""
    deadline = time.monotonic() + seconds
    try:
        code = job.wait(timeout=seconds)
        while any(p.status() != psutil.STATUS_ZOMBIE for p in group_members(job.pid)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        return code
    except (subprocess.TimeoutExpired, AssertionError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"the DDP job hung (killed after {seconds:.0f} s); its log ends:\n{log.read_text()[-3000:]}")


def group_members(group: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group:
                found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_a_ddp_job_reads_an_entry_another_job_builds_while_it_waits_and_does_not_hang(
    launcher, superglue_root, tmp_path
):
    """Rank 0 fits finetune with rank 1, then finds distill's lock held by another job, waits, and reads that job's
    entry. Rank 1 must read it too: before, its own lookup missed and it entered distill's fit alone (a hang)."""
    args = ["hardware=ddp", *HELD_RUN, f"data.root={superglue_root}", f"paths.output_dir={tmp_path / 'outputs'}"]
    log, held = tmp_path / "job.log", tmp_path / "held"
    log.touch()
    other = multiprocessing.get_context("spawn").Process(
        target=hold_distill_then_build, args=(args, str(log), str(held), 300.0)
    )
    other.start()
    deadline = time.monotonic() + 120
    while not held.exists():
        assert other.is_alive() and time.monotonic() < deadline, "the other job never took the distill lock"
        time.sleep(0.2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    with log.open("w") as stream:
        job = subprocess.Popen(ddp_command(launcher, *args), cwd=tmp_path, env=env, stdout=stream,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    code = finish_or_kill(job, log, 300)
    other.join(60)
    output = log.read_text()
    assert code == 0 and other.exitcode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]  # rank 1 too ended without an error
    assert output.count("stage finetune: ran") == 1 and "stage distill: from the cache" in output
    _, runs = runs_of(store(tmp_path), "held")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [run.info.status for run in runs_of(store(tmp_path), "other")[1]] == ["FINISHED"]
    assert (runs[0].data.tags["cache.finetune"], runs[0].data.tags["cache.distill"]) == ("miss", "hit")
    (entry,) = (tmp_path / "outputs" / "cache" / "distill").iterdir()
    assert json.loads((entry / "manifest.json").read_text())["built_by_run"] == "another-job"
    decisions = {
        p.stem: json.loads(p.read_text())["action"] for p in tmp_path.glob("outputs/cache/.ddp/*/run-0/*.json")
    }
    assert decisions == {"finetune": "build", "distill": "read", "evaluate": "build"}
