"""Tracking that survives what happens to real jobs: two first runs at once on a fresh SQLite store, runs whose
process is gone (killed, crashed) and sweeps stopped half-way, a tracking server that is down, and `report` pointed
at a file that is not an MLflow store."""

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fastformers import errors
from fastformers.errors import FastformersError
from fastformers.run import cli, pipeline, sweep
from fastformers.tracking import report
from fastformers.tracking import runs as tracking
from fastformers.tracking import server as tracking_server
from fastformers.tracking.runs import HOST_TAG, PARENT_ENV, PID_START_TAG, PID_TAG, ROLE_TAG


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


def test_a_host_that_does_not_resolve_or_a_silent_resolver_fails_within_the_timeout(monkeypatch):
    with pytest.raises(FastformersError, match=r"no MLflow server answers there \(unknown host\)"):
        tracking_server.check_server("http://no-such-host.invalid:5000")

    def silent(*args, **kwargs):  # a resolver that does not answer (getaddrinfo has no timeout of its own)
        time.sleep(30)

    monkeypatch.setattr(socket, "getaddrinfo", silent)
    started = time.perf_counter()
    with pytest.raises(FastformersError, match=r"\(slow\.example not resolved in 1\.5 s\)"):
        tracking_server.check_server("http://slow.example:5000")
    assert time.perf_counter() - started < 10  # 1.5 s, with room for a loaded machine


@pytest.mark.slow
def test_the_cli_checks_the_server_before_importing_mlflow_or_torch(tmp_path):
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['fastformers', 'experiment=quick', f'paths.output_dir={sys.argv[1]}',"
        " f'mlflow.tracking_uri=http://127.0.0.1:{sys.argv[2]}']\n"
        "try:\n"
        "    runpy.run_module('fastformers.run.cli', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, sorted({'mlflow', 'torch', 'lightning'} & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "outputs"), str(unused_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.splitlines()[-1] == "2 []", done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("fastformers: error: mlflow.tracking_uri=http://127.0.0.1:") and "connection refused" in line


def test_a_stopped_run_ends_killed_and_a_failed_one_failed(make_cfg):
    cfg = make_cfg()
    client = MlflowClient(tracking.tracking_uri(cfg))
    errors.STOPPED_RUNS.clear()
    try:
        with pytest.raises(SystemExit), tracking.start_run(cfg) as stopped:
            try:  # Ctrl-C inside Lightning's fit: it exits 1 while handling the KeyboardInterrupt
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                sys.exit(1)
        with pytest.raises(ValueError), tracking.start_run(cfg) as failed:
            raise ValueError("a bug")
        assert client.get_run(stopped.info.run_id).info.status == "KILLED"
        assert client.get_run(failed.info.run_id).info.status == "FAILED"
        (ended,) = errors.STOPPED_RUNS
        assert ended == f"run {stopped.info.run_id} ({stopped.info.run_name})"
        assert errors.stop_message(signal.SIGINT) == (
            f"fastformers: stopped by SIGINT: run {stopped.info.run_id} ({stopped.info.run_name}) marked KILLED"
        )
    finally:
        errors.STOPPED_RUNS.clear()


Mount = namedtuple("Mount", "mountpoint fstype")


def test_wal_only_on_a_local_disk(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.psutil, "disk_partitions", lambda **kwargs: [Mount("/", "nfs4")])
    nfs = make_cfg("mlflow.experiment_name=on_nfs", "mlflow.tracking_uri=sqlite:///" + str(tmp_path / "nfs.db"))
    tracking.open_experiment(nfs)
    monkeypatch.setattr(
        tracking.psutil, "disk_partitions", lambda **kwargs: [Mount("/", "ext4"), Mount("/nowhere", "nfs")]
    )
    local = make_cfg("mlflow.experiment_name=on_disk", "mlflow.tracking_uri=sqlite:///" + str(tmp_path / "local.db"))
    tracking.open_experiment(local)
    modes = {}
    for name in ("nfs", "local"):
        with sqlite3.connect(tmp_path / f"{name}.db") as con:
            modes[name] = con.execute("PRAGMA journal_mode").fetchone()[0]
    assert modes == {"nfs": "delete", "local": "wal"}


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


def other_process_sql(db: Path, sql: str) -> str:
    """Runs `sql` on `db` from another process, through one connection it closes (its last: SQLite then checkpoints
    and deletes the WAL if no other process holds the store); returns the first column of the first row."""
    code = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); r = c.execute(sys.argv[2]).fetchone(); c.commit()"
    code += "; c.close(); print(r[0] if r else '')"
    return subprocess.run([sys.executable, "-c", code, str(db), sql], check=True, capture_output=True, text=True).stdout


def test_checking_a_store_this_process_has_open_loses_none_of_its_writes(tmp_path):
    """Every job checks its store (`sqlite_problem`) while MLflow's pooled connections to it are open. Had that
    dropped their locks (a plain open()/close() of the file does), the other process's last close would delete the
    WAL under them: the write after it would go to the deleted file (a "Run not found", then a malformed store)."""
    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as con:  # idle between statements, as MLflow's pooled ones are
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE runs (id INTEGER)")
        con.execute("INSERT INTO runs VALUES (1)")
        con.commit()
        assert tracking.sqlite_problem(db, empty_ok=False) is None
        other_process_sql(db, "INSERT INTO runs VALUES (2)")
        con.execute("INSERT INTO runs VALUES (3)")
        con.commit()
        assert other_process_sql(db, "SELECT group_concat(id) FROM runs").split() == ["1,2,3"]
        assert other_process_sql(db, "PRAGMA integrity_check").split() == ["ok"]


def test_the_store_check_refuses_a_folder_and_a_file_with_only_the_magic_of_sqlite(tmp_path):
    assert tracking.sqlite_problem(tmp_path / "none.db", empty_ok=False) is None
    assert tracking.sqlite_problem(tmp_path, empty_ok=True) == f"{tmp_path} is a folder, not an SQLite database"
    fake = tmp_path / "fake.db"
    fake.write_bytes(b"SQLite format 3\x00" + bytes(84))  # the magic, then a header SQLite rejects (page size 0)
    assert tracking.sqlite_problem(fake, empty_ok=False) == f"{fake} is not an SQLite database, so not an MLflow store"


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
        with caplog.at_level("WARNING", logger="fastformers.tracking.runs"), tracking.start_run(cfg) as active:
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
        errors.STOPPED_RUNS.clear()


TINY = ["teacher=tiny_bert", "finetune.batch_size=8"]


def launch(*args: str, cwd: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop(PARENT_ENV, None)
    with (cwd / log).open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fastformers.run.cli", *args],
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
    assert sorted(r.info.status for r in runs if ROLE_TAG not in r.data.tags) == ["FINISHED", "KILLED"], log


@pytest.mark.slow
def test_a_job_stopped_while_another_process_writes_to_the_store_ends_killed_in_one_line(superglue_root, tmp_path):
    out = tmp_path / "outputs"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", PARENT_ENV)}
    args = [*TINY, f"data.root={superglue_root}", f"paths.output_dir={out}", "finetune.epochs=200"]
    with (tmp_path / "job.out").open("w") as stdout, (tmp_path / "job.err").open("w") as stderr:
        job = subprocess.Popen(
            [sys.executable, "-m", "fastformers.run.cli", *args],
            cwd=tmp_path,
            env=env | {"PYTHONUNBUFFERED": "1"},
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    deadline = time.time() + 300
    while not list((out / "cache" / "finetune").glob(".*.tmp/checkpoints/*")):  # it trains, its run is open
        assert job.poll() is None and time.time() < deadline, (tmp_path / "job.err").read_text()[-3000:]
        time.sleep(0.5)
    writer = sqlite3.connect(out / "mlflow.db", timeout=60, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the store's write lock ...
    os.killpg(job.pid, signal.SIGTERM)
    time.sleep(4)  # ... while the job is stopped, for a few seconds
    writer.execute("ROLLBACK")
    writer.close()
    code = finish(job, 180)
    err = (tmp_path / "job.err").read_text()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fastformers").experiment_id])
    assert (code, run.info.status) == (128 + signal.SIGTERM, "KILLED"), err[-3000:]
    assert "Traceback" not in err + (tmp_path / "job.out").read_text()
    assert err.splitlines()[-1] == (
        f"fastformers: stopped by SIGTERM: run {run.info.run_id} ({run.info.run_name}) marked KILLED"
    )
