"""MLflow: one run per Hydra job, with the resolved config as params; SQLite under outputs/ by default.

Every run (and sweep parent) is tagged with the host and process that own it, so that a run whose process is gone
(killed, crashed, its machine rebooted) is marked KILLED the next time a run starts in its experiment, instead of
staying RUNNING for ever. A local SQLite store is created under a file lock (`<db>.lock`), so that processes started
together on a fresh folder do not race MLflow's table creation and migrations; a tracking server is asked whether it
is up before anything else is done."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fastformers.errors import FastformersError

log = logging.getLogger(__name__)

SKIPPED_TAG = "skipped"  # a job that ran no stage (e.g. its task's data is absent here), and why
PARENT_ENV = "FASTFORMERS_SWEEP_RUN_ID"  # set by the sweep callback (fastformers/sweep.py) for its jobs
ROLE_TAG = "fastformers.role"  # `sweep` on the parent run, `report` on a standalone report run
HOST_TAG = "fastformers.host"  # the machine whose process owns a run ...
PID_TAG = "fastformers.pid"  # ... that process ...
PID_START_TAG = "fastformers.pid_start"  # ... and when it started (Linux: ticks after boot), against pid reuse
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
SERVER_TIMEOUT_S = 4.0  # how long a tracking server gets to answer /health before a run refuses to start


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
    file is one SQLite would quietly turn into a store; `empty_ok` says whether that is wanted."""
    try:
        with db.open("rb") as stream:
            head = stream.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return f"{db} is a folder, not an SQLite database"
    except OSError as err:
        return f"{db} cannot be read ({err.strerror})"
    if not head:
        return None if empty_ok else f"{db} is an empty file, not an MLflow store (run a job first)"
    if head != SQLITE_MAGIC:
        return f"{db} is not an SQLite database, so not an MLflow store"
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


def check_server(uri: str, setting: str = "mlflow.tracking_uri") -> None:
    """Fails at once, naming the URI, when nothing answers at an http(s) tracking URI (MLflow would retry for
    minutes, then print tracebacks). Any answer counts as up (an HTTP error, a TLS handshake this check does not
    configure): MLflow itself then says what is wrong."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        if isinstance(getattr(err, "reason", err), ssl.SSLError):  # it answered; MLflow has its own TLS settings
            return
        reason = why_unreachable(err)
    raise FastformersError(
        f"{setting}={uri}: no MLflow server answers there ({reason}); start one, or drop the override to use the "
        "local SQLite store"
    )


def why_unreachable(err: BaseException) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer in {SERVER_TIMEOUT_S:g} s"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    return str(getattr(reason, "strerror", None) or reason)


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
        end_orphans(MlflowClient(uri), experiment)
    return experiment


def start_run(cfg: DictConfig) -> mlflow.ActiveRun:
    """Starts this job's run; leaving the `with` block on an exception marks it FAILED (mlflow does that)."""
    if os.environ.pop("MLFLOW_RUN_ID", None):
        log.warning("ignoring MLFLOW_RUN_ID from the environment: each job gets its own run")
    experiment = open_experiment(cfg)
    run = mlflow.start_run(experiment_id=experiment, run_name=cfg.mlflow.run_name, tags=parent_tags() | owner_tags())
    try:  # the caller's `with` owns the run only once this returns: a failure (or SIGTERM) before must end it
        mlflow.log_params(flat_params(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    except BaseException:
        mlflow.end_run("FAILED")  # as the `with` block ends a run that raised
        raise
    return run


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
