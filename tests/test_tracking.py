"""Tracking that survives what happens to real jobs: two first runs at once on a fresh SQLite store, runs whose
process is gone (killed, crashed) and sweeps stopped half-way, a tracking server that is down, and `report` pointed
at a file that is not an MLflow store."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fastformers import cli, pipeline, report, sweep, tracking
from fastformers.errors import FastformersError
from fastformers.tracking import HOST_TAG, PARENT_ENV, PID_START_TAG, PID_TAG, ROLE_TAG


def unused_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped), not reused since."""
    for _ in range(10):
        done = subprocess.Popen([sys.executable, "-c", "pass"])
        done.wait()
        try:
            os.kill(done.pid, 0)
        except ProcessLookupError:
            return done.pid
    raise AssertionError("every finished pid was reused at once")


def test_sqlite_path_of_each_uri_form():
    assert tracking.sqlite_path("sqlite:///outputs/mlflow.db") == Path("outputs/mlflow.db")
    assert tracking.sqlite_path("sqlite:////abs/m.db?timeout=5") == Path("/abs/m.db")
    assert tracking.sqlite_path("sqlite:///:memory:") is None
    assert tracking.sqlite_path("http://127.0.0.1:5000") is None


def test_the_store_lock_is_exclusive_between_processes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    probe = (
        "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)"
    )
    lock = tmp_path / "sub" / "mlflow.db.lock"
    with tracking.store_lock(uri):
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0
    with tracking.store_lock("http://127.0.0.1:1"):  # a server: nothing to lock
        pass


def test_a_tracking_server_that_is_down_fails_at_once_naming_the_uri(make_cfg, tmp_path):
    uri = f"http://127.0.0.1:{unused_port()}"
    started = time.perf_counter()
    with pytest.raises(FastformersError) as err:
        pipeline.run(make_cfg(f"mlflow.tracking_uri={uri}"))
    assert time.perf_counter() - started < 10
    assert str(err.value) == (
        f"mlflow.tracking_uri={uri}: no MLflow server answers there (connection refused); start one, or drop the "
        "override to use the local SQLite store"
    )
    assert not (tmp_path / "outputs" / "cache").exists()  # no stage ran


def test_a_sweep_with_a_tracking_server_that_is_down_is_one_line_and_exit_2(make_cfg, capsys):
    uri = f"http://127.0.0.1:{unused_port()}"
    with pytest.raises(SystemExit) as stopped:
        sweep.MlflowSweepCallback().on_multirun_start(make_cfg(f"mlflow.tracking_uri={uri}"))
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fastformers: error: mlflow.tracking_uri={uri}: no MLflow server answers there")


def test_a_run_on_a_store_that_is_not_sqlite_is_refused(make_cfg, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    with pytest.raises(FastformersError, match=r"notes\.txt is not an SQLite database"):
        pipeline.run(make_cfg(f"mlflow.tracking_uri=sqlite:///{text}"))
    assert text.read_text() == "not a database\n"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"run_id,score\n", "is not an SQLite database, so not an MLflow store"), (b"", "is an empty file")],
)
def test_report_refuses_a_file_that_is_not_an_mlflow_store(tmp_path, capsys, content, problem):
    store = tmp_path / "some.txt"
    store.write_bytes(content)
    assert report.main(["--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fastformers: error: report: --tracking-uri sqlite:///{store}: {store} {problem}")
    assert store.read_bytes() == content  # MLflow did not write its schema into it
    assert not (tmp_path / "out").exists()


def test_runs_whose_process_is_gone_are_marked_killed_at_the_next_start(make_cfg, caplog):
    cfg = make_cfg()
    client = MlflowClient(tracking.tracking_uri(cfg))
    experiment = tracking.open_experiment(cfg)
    host = socket.gethostname()
    sleeper = subprocess.Popen(["sleep", "300"])  # alive, and not fastformers
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "fastformers"])
    ids: dict[str, str] = {}
    try:
        started = tracking.process_start(worker.pid)
        runs = {
            "dead": {HOST_TAG: host, PID_TAG: str(dead_pid())},
            "reused": {HOST_TAG: host, PID_TAG: str(worker.pid), PID_START_TAG: "1"},  # the pid of a later process
            "not fastformers": {HOST_TAG: host, PID_TAG: str(sleeper.pid)},  # no start time: judged by its command
            "alive": {HOST_TAG: host, PID_TAG: str(worker.pid), PID_START_TAG: started},
            "alive, no start time": {HOST_TAG: host, PID_TAG: str(worker.pid)},
            "this process": tracking.owner_tags(),  # e.g. the sweep parent of the jobs it runs
            "other host": {HOST_TAG: f"not-{host}", PID_TAG: str(dead_pid())},  # its pids are not this host's
            "untagged": {},  # a run from before the tags: its owner is unknown
        }
        ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in runs.items()}
        with caplog.at_level("WARNING", logger="fastformers.tracking"), tracking.start_run(cfg) as active:
            new = client.get_run(active.info.run_id)
            assert new.data.tags[HOST_TAG] == host and new.data.tags[PID_TAG] == str(os.getpid())
        status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
        killed = {"dead", "reused", "not fastformers"}
        assert status == {name: "KILLED" if name in killed else "RUNNING" for name in runs}
        pid = runs["dead"][PID_TAG]
        assert f"marked run {ids['dead']} (dead) KILLED: its process {pid} on {host} is gone" in caplog.messages
        assert len([m for m in caplog.messages if m.startswith("marked run")]) == len(killed)
    finally:
        for process in (sleeper, worker):
            process.kill()
            process.wait()
        for run_id in ids.values():
            client.set_terminated(run_id, "FINISHED")


def test_a_sweep_parent_is_tagged_with_its_process_and_ended_when_the_multirun_stops(make_cfg, monkeypatch):
    monkeypatch.delenv(PARENT_ENV, raising=False)
    cfg = make_cfg()
    client = MlflowClient(tracking.tracking_uri(cfg))
    experiment = tracking.open_experiment(cfg)
    gone = client.create_run(
        experiment, tags={ROLE_TAG: "sweep", HOST_TAG: socket.gethostname(), PID_TAG: str(dead_pid())}
    )
    callback = sweep.MlflowSweepCallback()
    try:
        callback.on_multirun_start(cfg)
        parent = client.get_run(os.environ[PARENT_ENV])
        assert parent.info.status == "RUNNING" and parent.data.tags[PID_TAG] == str(os.getpid())
        assert client.get_run(gone.info.run_id).info.status == "KILLED"  # a sweep start ends orphans too
        cli._end_sweep("KILLED")  # what `entry` does when a job is stopped by SIGTERM (or Ctrl-C)
        assert client.get_run(parent.info.run_id).info.status == "KILLED"
        cli._end_sweep("FAILED")  # ended once: a later call changes nothing
        assert client.get_run(parent.info.run_id).info.status == "KILLED"

        callback.on_multirun_start(cfg)  # a sweep that ends normally stays FINISHED
        finished = os.environ[PARENT_ENV]
        callback.on_multirun_end(cfg)
        sweep.end_parent("FAILED")  # the exit hook, after the end: a no-op
        assert client.get_run(finished).info.status == "FINISHED"
    finally:
        sweep.end_parent("FINISHED")


TINY = ["teacher=tiny_bert", "finetune.batch_size=8"]


def launch(*args: str, cwd: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop(PARENT_ENV, None)
    with (cwd / log).open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fastformers.cli", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(job: subprocess.Popen, seconds: float = 600) -> int:
    try:
        return job.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        raise


@pytest.mark.slow
def test_two_first_runs_at_once_on_a_fresh_store_both_finish(superglue_root, tmp_path):
    for attempt in range(3):
        cwd = tmp_path / str(attempt)
        cwd.mkdir()
        out = cwd / "outputs"
        args = ["experiment=quick", f"data.root={superglue_root}", f"paths.output_dir={out}"]
        jobs = [launch(*args, cwd=cwd, log=f"job{i}.log") for i in range(2)]
        codes = [finish(job) for job in jobs]
        logs = "\n".join((cwd / f"job{i}.log").read_text()[-2000:] for i in range(2))
        assert codes == [0, 0], logs
        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("quick").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"], logs


@pytest.mark.slow
def test_a_sweep_terminated_in_its_second_job_ends_its_parent_killed(superglue_root, tmp_path):
    job = launch(
        "-m",
        *TINY,
        f"data.root={superglue_root}",
        "finetune.epochs=1,50",
        "mlflow.experiment_name=stopped",
        cwd=tmp_path,
        log="sweep.log",
    )
    db = tmp_path / "outputs" / "mlflow.db"
    deadline = time.time() + 300
    jobs: list = []
    while len(jobs) < 2:  # the second job's run exists: the first one finished
        assert job.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(1)
        if db.exists():
            with tracking.store_lock(f"sqlite:///{db}"):  # the sweep may be creating the store's tables right now
                client = MlflowClient(f"sqlite:///{db}")
                found = client.get_experiment_by_name("stopped")
            runs = client.search_runs([found.experiment_id]) if found else []
            jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    os.killpg(job.pid, signal.SIGTERM)
    assert finish(job, 120) != 0
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    log = (tmp_path / "sweep.log").read_text()[-3000:]
    assert parent.info.status == "KILLED", log
    assert sorted(r.info.status for r in runs if ROLE_TAG not in r.data.tags) == ["FAILED", "FINISHED"], log
