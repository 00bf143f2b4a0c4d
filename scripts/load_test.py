"""Load test of a run's served model: `mlflow models serve` on 127.0.0.1, N concurrent clients sending the task's
official jsonl records, every answer compared with the offline prediction of the same request (the model loaded
with `mlflow.pyfunc.load_model` here and given the same records together: a dynamic int8 graph computes its
activation scales per batch, so like is compared with like). Prints p50/p99 latency, throughput under load and the
server's peak memory (PSS over its process tree); exits 1 when any answer differs or any request fails.

    python scripts/load_test.py --tracking-uri sqlite:///outputs/mlflow.db --experiment fastformers \
        --data ../shared/data/superglue --clients 8 --requests 400
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

HOST = "127.0.0.1"  # the only address this script ever sends to
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per download otherwise
START_SECONDS = 180.0  # a cold server imports torch, transformers and the engine before it answers /ping


@dataclass
class Result:
    """What the load produced: answers compared, failures, latencies and the server's memory."""

    total: int
    equal: int
    errors: int
    latencies_s: list[float]
    wall_s: float
    records: int
    peak_memory_mb: float
    clients: int
    first_problem: str = ""
    server: dict = field(default_factory=dict)

    def summary(self) -> str:
        p50, p99 = np.percentile(self.latencies_s, [50, 99]) * 1000 if self.latencies_s else (float("nan"),) * 2
        return (
            f"clients {self.clients}, requests {self.total} ({self.records} records): answers equal "
            f"{self.equal}/{self.total}, errors {self.errors}; latency p50 {p50:.1f} ms p99 {p99:.1f} ms; "
            f"throughput {self.total / self.wall_s:.1f} requests/s ({self.records / self.wall_s:.1f} records/s); "
            f"server peak memory {self.peak_memory_mb:.0f} MB (PSS)"
            + (f"; first problem: {self.first_problem}" if self.first_problem else "")
        )


def find_run(tracking_uri: str, run_id: str | None, experiment: str | None) -> str:
    """`run_id`, or the newest run of `experiment` that logged a served model (it carries `served.engine`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id:
        return client.get_run(run_id).info.run_id
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"load_test: no experiment {experiment!r} at {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id], "tags.`served.engine` != ''", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise SystemExit(f"load_test: no run of experiment {experiment!r} logged a served model")
    return runs[0].info.run_id


def official_records(task: str, root: Path, split: str) -> list[dict]:
    """The split's records as the leaderboard's jsonl has them (<root>/<Task>/<split>.jsonl, any case of Task)."""
    folders = [p for p in Path(root).iterdir() if p.name.lower() == task.lower()]
    if not folders or not (folders[0] / f"{split}.jsonl").is_file():
        raise SystemExit(f"load_test: no {split}.jsonl of task {task!r} under {root}")
    lines = (folders[0] / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def make_requests(records: list[dict], count: int, most: int) -> list[list[dict]]:
    """`count` requests of 1 to `most` records each, taken in turn from `records` (so shapes vary as in traffic)."""
    requests, start = [], 0
    for number in range(count):
        size = 1 + number % most
        requests.append([records[(start + i) % len(records)] for i in range(size)])
        start += size
    return requests


def offline_answers(model_uri: str, requests: list[list[dict]]) -> list[list[dict]]:
    """Each request predicted alone, one after another, by the model loaded in this process."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    return [jsonable(model.predict(records)) for records in requests]


def jsonable(answer) -> list[dict]:
    """An answer as it would come back over HTTP (numpy ints become ints)."""
    return json.loads(json.dumps(answer, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model_uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow models serve --env-manager local` bound to 127.0.0.1; it starts uvicorn through bash, so the
    interpreter's bin folder goes first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", HOST, "-p", str(port)]
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(server: subprocess.Popen, url: str, log: Path, seconds: float = START_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"load_test: the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"load_test: the server did not answer /ping within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow, bash, uvicorn), SIGKILL if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


class PeakMemory:
    """Samples the PSS (proportional set size: shared pages counted once across the tree) of a process and its
    descendants on a thread until stopped; keeps the largest sum seen."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.root, self.every_s, self.peak_bytes = psutil.Process(pid), every_s, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def tree_pss(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def sample(self) -> None:
        while not self.done.is_set():
            self.peak_bytes = max(self.peak_bytes, self.tree_pss())
            self.done.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self.peak_bytes = self.tree_pss()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def send_all(url: str, requests: list[list[dict]], clients: int, timeout_s: float) -> list[tuple[int, object, float]]:
    """Every request POSTed by `clients` concurrent threads over one pooled client: (status, body, seconds)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=url, timeout=timeout_s, limits=limits) as client:

        def send(records: list[dict]) -> tuple[int, object, float]:
            started = time.perf_counter()
            try:
                answer = client.post("/invocations", json={"inputs": records})
                body = (
                    answer.json()
                    if answer.headers.get("content-type", "").startswith("application/json")
                    else answer.text
                )
                return answer.status_code, body, time.perf_counter() - started
            except httpx.HTTPError as err:
                return 0, f"{type(err).__name__}: {err}", time.perf_counter() - started

        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(send, requests))


def compare(requests, expected, answers, clients: int, wall_s: float, peak_bytes: int) -> Result:
    equal = errors = 0
    first = ""
    for number, ((status, body, _), wanted) in enumerate(zip(answers, expected)):
        if status != 200:
            errors += 1
            first = first or f"request {number}: HTTP {status} {str(body)[:300]}"
        elif body.get("predictions") == wanted:
            equal += 1
        else:
            first = first or f"request {number}: served {body.get('predictions')} offline {wanted}"
    return Result(
        total=len(requests),
        equal=equal,
        errors=errors,
        latencies_s=[seconds for status, _, seconds in answers if status == 200],
        wall_s=wall_s,
        records=sum(len(r) for r in requests),
        peak_memory_mb=peak_bytes / 2**20,
        clients=clients,
        first_problem=first,
    )


def run(
    tracking_uri: str,
    run_id: str,
    records: list[dict],
    clients: int = 8,
    requests: int = 200,
    most_records: int = 4,
    timeout_s: float = 120.0,
    passes: int = 1,
) -> list[Result]:
    """Serves the run's model and sends the requests `passes` times with `clients` threads, every answer compared
    with the offline one: a Result per pass (the first meets a cold server: imports done, shapes not compiled)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    model_uri = f"runs:/{run_id}/model"
    batches = make_requests(records, requests, most_records)
    expected = offline_answers(model_uri, batches)
    tags = mlflow.tracking.MlflowClient(tracking_uri).get_run(run_id).data.tags
    results = []
    with tempfile.TemporaryDirectory(prefix="load_test_") as scratch:
        log, port = Path(scratch) / "server.log", free_port()
        url = f"http://{HOST}:{port}"
        server = start_server(model_uri, tracking_uri, port, log)
        try:
            wait_until_up(server, url, log)
            for _ in range(passes):
                with PeakMemory(server.pid) as memory:
                    started = time.perf_counter()
                    answers = send_all(url, batches, clients, timeout_s)
                    wall_s = time.perf_counter() - started
                results.append(compare(batches, expected, answers, clients, wall_s, memory.peak_bytes))
        finally:
            stop_server(server)
    for result in results:
        result.server = {k: tags.get(f"served.{k}") for k in ("engine", "precision")}
    return results


def all_equal(results: list[Result]) -> bool:
    return all(r.errors == 0 and r.equal == r.total for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the run whose `model` is served")
    which.add_argument("--experiment", help="serve the newest run of this experiment that logged a model")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SUPERGLUE_DIR", "../shared/data/superglue")))
    parser.add_argument("--task", help="the task's folder under --data (default: the run's task.name param)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests in all")
    parser.add_argument("--records", type=int, default=4, help="records per request cycle through 1..this")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for one answer")
    parser.add_argument("--passes", type=int, default=1, help="send the requests this many times (2: cold, warm)")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    run_id = find_run(args.tracking_uri, args.run_id, args.experiment)
    task = args.task or MlflowClient(args.tracking_uri).get_run(run_id).data.params["task.name"]
    records = official_records(task, args.data, args.split)
    results = run(
        args.tracking_uri, run_id, records, args.clients, args.requests, args.records, args.timeout, args.passes
    )
    served = results[0].server
    for number, result in enumerate(results, 1):
        print(
            f"run {run_id} ({task}, served {served['engine']} {served['precision']}), pass {number}: {result.summary()}"
        )
    return 0 if all_equal(results) else 1


if __name__ == "__main__":
    sys.exit(main())
