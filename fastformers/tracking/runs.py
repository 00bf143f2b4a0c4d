"""MLflow: one run per Hydra job, with the resolved config as params; SQLite under outputs/ by default.

Every run (and sweep parent) is tagged with the host and process that own it, so that a run whose process is gone
(killed, crashed, its machine rebooted) is marked KILLED the next time a run starts in its experiment, instead of
staying RUNNING for ever. A local SQLite store is created under a file lock (`<db>.lock`), so that processes started
together on a fresh folder do not race MLflow's table creation and migrations, and is switched to WAL on a local disk;
a tracking server is asked whether it is up before anything else is done (fastformers/tracking/server.py).

A run always records its end: FINISHED, FAILED, or KILLED when a stop signal (SIGTERM, Ctrl-C) ended it, even while
another process or thread writes to the store (see `end_run`)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import socket
import sqlite3
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import psutil
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fastformers.errors import STOPPED_RUNS, FastformersError, stop_signal
from fastformers.tracking.server import check_server

log = logging.getLogger(__name__)

SKIPPED_TAG = "skipped"  # a job that ran no stage (e.g. its task's data is absent here), and why
PARENT_ENV = "FASTFORMERS_SWEEP_RUN_ID"  # set by the sweep callback (fastformers/run/sweep.py) for its jobs
ROLE_TAG = "fastformers.role"  # `sweep` on the parent run, `report` on a standalone report run
HOST_TAG = "fastformers.host"  # the machine whose process owns a run ...
PID_TAG = "fastformers.pid"  # ... that process ...
PID_START_TAG = "fastformers.pid_start"  # ... and when it started (Linux: ticks after boot), against pid reuse
# How long the end of a run is retried while the store stays locked; each try itself waits up to MLflow's SQLite
# busy timeout (`PRAGMA busy_timeout = 20000` on every session), so a writer holding the store for a minute is
# outlasted.
END_RETRY_S = 60.0
# Filesystems on which SQLite's WAL mode is safe: WAL needs shared memory between the processes that open the store,
# which a network filesystem (nfs, cifs, sshfs, lustre ...) does not give; any type not listed keeps the rollback
# journal.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs", "bcachefs", "tmpfs", "ramfs"}
    | {"overlay", "apfs", "hfs", "ufs", "ffs"}
)


def tracking_uri(cfg: DictConfig) -> str:
    return absolute_uri(cfg.mlflow.tracking_uri)


def absolute_uri(uri: str) -> str:
    """A relative `sqlite:///` path is made absolute, so every process of a sweep hits one store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///") :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working directory unless absolute); None for any
    other store, and for an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def sqlite_problem(db: Path, empty_ok: bool) -> str | None:
    """Why `db` cannot be an MLflow store (None if it can): an existing file that is not an SQLite database. An empty
    file is one SQLite would quietly turn into a store; `empty_ok` says whether that is wanted.

    The header is read by SQLite itself, never through open(): closing any other descriptor on the file drops every
    POSIX lock this process's SQLite connections (MLflow's pool) hold on it, and another process closing its last
    connection then checkpoints and deletes the WAL under them: their next writes are lost and the store ends
    "database disk image is malformed" (https://www.sqlite.org/howtocorrupt.html, 2.2)."""
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{db} cannot be read ({err.strerror})"
    if db.is_dir():
        return f"{db} is a folder, not an SQLite database"
    if size == 0:
        return None if empty_ok else f"{db} is an empty file, not an MLflow store (run a job first)"
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            con.execute("PRAGMA schema_version").fetchone()  # reads the header: SQLITE_NOTADB without the magic
    except sqlite3.DatabaseError as err:
        if err.sqlite_errorname == "SQLITE_NOTADB":
            return f"{db} is not an SQLite database, so not an MLflow store"
        return f"{db} cannot be read ({err})"
    return None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Holds an exclusive lock on `<db>.lock` beside a local SQLite store, across processes; a no-op for servers.
    MLflow creates a fresh store's tables and runs its migrations on first use, which two first users at once
    break ("duplicate column name", "Online migration expected to match one row")."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with db.with_name(db.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, and by the kernel if this process dies holding it
        yield


def open_experiment(cfg: DictConfig) -> str:
    """Points MLflow at the run's store and returns its experiment's id: the server is checked first; the store's
    first use (tables, migrations) and the get-or-create of the experiment (with its artifacts beside a local store,
    not in the working dir) happen under the store's lock; runs of the experiment whose process is gone are marked
    KILLED."""
    uri = tracking_uri(cfg)
    check_server(uri)
    db = sqlite_path(uri)
    problem = sqlite_problem(db, empty_ok=True) if db else None
    if problem:
        raise FastformersError(f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}: {problem}")
    mlflow.set_tracking_uri(uri)
    name = cfg.mlflow.experiment_name
    with store_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            experiment = found.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:"):
                location = (Path(cfg.paths.output_dir).resolve() / "mlartifacts" / name).as_uri()
            experiment = mlflow.create_experiment(name, artifact_location=location)
        if db is not None:
            use_wal(db)
        end_orphans(MlflowClient(uri), experiment)
    return experiment


def use_wal(db: Path) -> None:
    """Switches a local store to WAL (persistent in the file): readers then never block a writer, so a run can
    record its end while another process or thread reads the store. Not on a network filesystem (see
    `on_local_disk`); a store another process holds right now keeps its journal this time (tried again next run)."""
    if not on_local_disk(db):
        return
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
        try:
            con.execute("PRAGMA journal_mode=WAL").fetchall()
        except sqlite3.OperationalError as err:
            log.debug("%s stays in its journal mode: %s", db, err)


def on_local_disk(path: Path) -> bool:
    """Whether `path` lies on a local filesystem: the type of its mount (the longest mount point above it, from the
    kernel's mount table through psutil) is one of LOCAL_FILESYSTEMS."""
    path = path.resolve()
    mounts = [m for m in psutil.disk_partitions(all=True) if path.is_relative_to(m.mountpoint)]
    if not mounts:
        return False
    return max(mounts, key=lambda m: len(m.mountpoint)).fstype in LOCAL_FILESYSTEMS


@contextmanager
def start_run(cfg: DictConfig) -> Iterator[mlflow.ActiveRun]:
    """Starts this job's run and ends it when the `with` block is left: FINISHED, FAILED on an exception, KILLED when
    a stop signal ended it (MLflow's own `ActiveRun` would say FAILED, and Lightning turns the stop into
    SystemExit(1))."""
    if os.environ.pop("MLFLOW_RUN_ID", None):
        log.warning("ignoring MLFLOW_RUN_ID from the environment: each job gets its own run")
    experiment = open_experiment(cfg)
    run = mlflow.start_run(experiment_id=experiment, run_name=cfg.mlflow.run_name, tags=parent_tags() | owner_tags())
    status = "FAILED"
    try:
        mlflow.log_params(flat_params(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run
        status = "FINISHED"
    except BaseException as err:
        if stop_signal(err) is not None:
            status = "KILLED"
            release_interrupted(err)
        raise
    finally:
        end_run(tracking_uri(cfg), run, status)


def release_interrupted(err: BaseException) -> None:
    """Drops what a stopped call left behind: a signal that lands inside an MLflow write leaves the SQLite statement
    it interrupted alive in the traceback's frames, and that statement keeps its lock on the store (the run's end
    would then wait on this very process, and fail "database is locked")."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # frames still running (the callers) are left as they are
        pending += [current.__context__, current.__cause__]
    gc.collect()


def end_run(uri: str, run: mlflow.ActiveRun, status: str) -> None:
    """Records the run's end and closes it in MLflow. A stopped run that cannot be recorded says so in one line
    (the next run's `end_orphans` marks it KILLED); a run that finished but cannot record it fails naming the store."""
    problem = write_end(uri, run.info.run_id, status)
    with quiet_store_errors(), contextlib.suppress(MlflowException):
        mlflow.end_run(status)  # pops the active run (and writes the status once more)
    name = f"run {run.info.run_id} ({run.info.run_name})"
    if problem is None:
        if status == "KILLED":
            STOPPED_RUNS.append(name)
        return
    if status != "FINISHED":
        log.warning("could not mark %s %s: %s", name, status, problem)
        return
    raise FastformersError(f"mlflow.tracking_uri={uri}: could not record the end of {name}: {problem}")


def write_end(uri: str, run_id: str, status: str) -> str | None:
    """Sets a run's end status, retried for END_RETRY_S while the store is locked, under the store's lock (so the
    ends of a sweep's processes do not contend with each other); None once written, else why not (one line)."""
    deadline = time.monotonic() + END_RETRY_S
    with store_lock(uri), quiet_store_errors():
        while True:
            try:
                MlflowClient(uri).set_terminated(run_id, status)
                return None
            except MlflowException as err:
                if err.error_code != "TEMPORARILY_UNAVAILABLE" or time.monotonic() > deadline:
                    return str(err).strip().splitlines()[0]
            gc.collect()  # a statement left by an interrupted write may only now be unreachable
            time.sleep(1.0)


@contextmanager
def quiet_store_errors() -> Iterator[None]:
    """Silences MLflow's SQL store logger, which logs a full traceback for every "database is locked" before
    raising it; the caller retries, then reports in one line."""
    logger = logging.getLogger("mlflow.store.db.utils")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def owner_tags() -> dict[str, str]:
    """The host and process that own a run started here (see `end_orphans`)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    started = process_start(os.getpid())
    return tags | ({PID_START_TAG: started} if started else {})


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from its third field (the state) on; None without /proc or without that process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces and parentheses


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None without /proc."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_gone(pid: int, started: str | None) -> bool:
    """Whether process `pid` of this host has ended: it does not exist or is a zombie, or the pid now belongs to
    another process (one started at another time than `started`, or, where that was not recorded, one that is not
    fastformers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, another user's
        pass
    fields = proc_stat(pid)
    if fields is None:
        return False  # no /proc: alive is all that can be told
    if fields[0] in ("Z", "X"):
        return True
    if started and len(fields) > 19:
        return fields[19] != started
    try:
        return b"fastformers" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def end_orphans(client: MlflowClient, experiment: str) -> list[str]:
    """Marks KILLED the RUNNING runs of `experiment` (sweep parents included) owned by a process of this host that
    is gone; returns their ids. Runs of other hosts, and runs without owner tags, are left alone."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    ended = []
    for run in running:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if pid == os.getpid() or not process_gone(pid, tags.get(PID_START_TAG)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning(
            "marked run %s (%s) KILLED: its process %d on %s is gone", run.info.run_id, run.info.run_name, pid, host
        )
        ended.append(run.info.run_id)
    return ended


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted params (`task.name`, `finetune.learning_rate`, ...)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:6000]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class PipelineRunLogger(MLFlowLogger):
    """Lightning's MLflow logger writing into the pipeline's run; the pipeline, not the Trainer, ends it."""

    def finalize(self, status: str = "success") -> None:
        pass


def lightning_logger(cfg: DictConfig) -> PipelineRunLogger:
    run = mlflow.active_run()
    return PipelineRunLogger(
        tracking_uri=tracking_uri(cfg),
        run_id=run.info.run_id if run else None,
        experiment_name=cfg.mlflow.experiment_name,
    )


def parent_tags() -> dict[str, str]:
    """Tags that put a job's run under its sweep's parent (the UI nests runs by `mlflow.parentRunId`)."""
    parent = os.environ.get(PARENT_ENV)
    return {"mlflow.parentRunId": parent, "sweep": parent} if parent else {}
