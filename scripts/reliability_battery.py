"""The reliability battery (issue 15): bad data, bad config, bad weights, an unreachable or damaged tracking store,
killed and concurrent processes, and a fuzz of the data readers, replayed against a fresh output folder.

    .venv/bin/python scripts/reliability_battery.py [--out DIR] [--only NAME,...] [--fuzz-lines N] [--pairs N]

Each case runs `fastformers` (`python -m fastformers.run.cli`, as tests/test_sweeps.py does) with `experiment=quick
teacher=tiny_bert` on fixture data (fastformers.data.fixtures.write_superglue) in its own folder under DIR/cases,
breaks one thing, and prints one row: its exit code, its error line (the last stderr line starting `fastformers:
error:`, else the last stderr line), how many stderr lines belong to a Python traceback, how many MLflow runs are
left RUNNING in the case's store, the stage cache entries lost (cases marked `primed` first get the cache of a good
run, then the bad step runs in the same output folder), and whether that is what is expected. The table is also
written to DIR/battery.md. `--only` takes case names and group names (data, config, weights, tracking, processes,
fuzz); `--list` prints them. Exit status: 0 when every case is as expected, 1 otherwise.

Expected: every bad input is refused with exit 2 and one `fastformers: error:` line, no traceback and no run left
RUNNING; the fuzz raises nothing but FastformersError; after kill -9 or SIGTERM (and the next start) no run is left
RUNNING and no scratch folder is left in the cache (a stopped build is kept as one `.<key>.failed-*` folder, which the
next build of that entry adopts); a save that fails right after training (a full disk) keeps the trained checkpoints,
and the same command again resumes from them without training and saves the best epoch; a cache entry that cannot be
read is refused with exit 2 and kept; a live build lock held from another pid namespace is waited for; each concurrent
pair on a fresh store ends with both runs FINISHED; a tracking server that is down, or whose host does not resolve, is
reported in under 3 s (wall time of the whole command); a stopped sweep ends with one `fastformers: stopped by
SIGTERM:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fastformers and tests (the fuzz reuses tests/test_readers_fuzz.py's mutation)

ERROR_PREFIX = "fastformers: error:"
SERVER_LIMIT_S = 3.0  # a tracking server that is down or a host that does not resolve: reported this fast
FUZZ_TASKS = {"fuzz_cb": "CB", "fuzz_rte": "RTE", "fuzz_multirc": "MultiRC", "fuzz_record": "ReCoRD"}
BAD_LINE = 3  # the 1-based line of CB/train.jsonl the bad-data cases break


class NotWeights:
    """A custom class in a pytorch_model.bin: torch.load(weights_only=True) refuses to unpickle it."""


# ---------------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    case: str
    exit: str = "-"
    error: str = ""
    tb_lines: str = "-"
    running: str = "-"
    lost: str = "-"
    ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "OK" if self.ok else "FAIL"


COLUMNS = (("case", 24), ("exit", 8), ("error line", 90), ("tb", 4), ("RUNNING", 8), ("lost", 5), ("verdict", 7))


def cells(row: Row) -> list[str]:
    return [row.case, row.exit, row.error, row.tb_lines, row.running, row.lost, row.verdict]


def fixed(values: list[str]) -> str:
    out = []
    for (_, width), raw in zip(COLUMNS, values):
        value = raw.replace("\n", " ")
        out.append(value if len(value) <= width else value[: width - 1] + "…")
        out[-1] = out[-1].ljust(width)
    return " | ".join(out)


def print_header() -> None:
    print(fixed([name for name, _ in COLUMNS]) + " | notes")
    print("-+-".join("-" * width for _, width in COLUMNS) + "-+------")


def print_row(row: Row) -> None:
    print(fixed(cells(row)) + " | " + "; ".join(row.notes), flush=True)


def markdown(rows: list[Row], summary: str, command: str) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    head = [name for name, _ in COLUMNS] + ["notes"]
    lines = [
        "# Reliability battery",
        "",
        f"`{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in rows:
        values = [*cells(row), "; ".join(row.notes)]
        values[2] = f"`{values[2]}`" if values[2] else ""
        lines.append("| " + " | ".join(esc(v) for v in values) + " |")
    return "\n".join([*lines, "", summary, ""])


# ------------------------------------------------------------------------------------------- reading the results


@dataclass
class Result:
    code: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    wall: float

    @property
    def exit(self) -> str:
        return "timeout" if self.code is None else str(self.code)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    return errors[-1] if errors else (lines[-1] if lines else "")


def traceback_lines(stderr: str) -> int:
    """Lines of stderr inside Python tracebacks: from `Traceback (most recent call last):` to the exception line."""
    count, inside = 0, False
    for line in stderr.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        if inside:
            count += 1
            if line and not line[0].isspace() and not line.startswith("Traceback"):
                inside = False  # the `SomeError: message` line ends the block
    return count


def run_states(out: Path) -> list | None:
    """Every run (all experiments, deleted ones included) in the case's local MLflow store; None without a store."""
    db = out / "mlflow.db"
    if not db.is_file() or db.stat().st_size == 0:
        return None
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = []
    for start in range(0, len(ids), 100):
        token = None
        while True:
            page = client.search_runs(ids[start : start + 100], run_view_type=ViewType.ALL, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def running_count(out: Path) -> tuple[str, int]:
    try:
        runs = run_states(out)
    except Exception as err:
        return f"? ({type(err).__name__})", 1
    if runs is None:
        return "-", 0
    n = sum(r.info.status == "RUNNING" for r in runs)
    return str(n), n


def cache_entries(out: Path) -> set[str]:
    """Complete stage cache entries, as `stage/key`."""
    root = out / "cache"
    if not root.is_dir():
        return set()
    return {f"{s.name}/{e.name}" for s in root.iterdir() if s.is_dir() for e in s.iterdir() if e.name[0] != "."}


def scratch_folders(out: Path) -> list[Path]:
    return sorted((out / "cache").glob("*/.*.tmp"))


def failed_folders(out: Path) -> list[Path]:
    """Builds that failed or were stopped, kept (one per key) for the next build of their entry to resume from."""
    return sorted((out / "cache").glob("*/.*.failed-*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------- the battery


@dataclass
class Case:
    name: str
    group: str
    fn: Callable[[Battery, Row, Path], None]
    primed: bool = False


class Battery:
    def __init__(self, root: Path, fuzz_lines: int, pairs: int, timeout: float, run_timeout: float):
        self.root = root
        self.fuzz_lines = fuzz_lines
        self.pairs = pairs
        self.timeout = timeout
        self.run_timeout = run_timeout
        self._fixtures: Path | None = None
        self._base: tuple[Path, Result] | None = None
        self.calls = 0
        self.jobs: list[subprocess.Popen] = []  # every process started, so that Ctrl-C can end those still running

    # -- shared inputs

    @property
    def fixtures(self) -> Path:
        if self._fixtures is None:
            from fastformers.data.fixtures import write_superglue

            self._fixtures = write_superglue(self.root / "superglue")
        return self._fixtures

    def base_cache(self) -> tuple[Path, Result]:
        """A good `quick` run's output folder, run once, whose cache the primed cases start from."""
        if self._base is None:
            cwd = self.root / "base"
            cwd.mkdir()
            out = cwd / "outputs"
            self._base = (out, self.cli(*self.quick(out), cwd=cwd, timeout=self.run_timeout))
        return self._base

    def case_dir(self, name: str) -> Path:
        folder = self.root / "cases" / name
        folder.mkdir(parents=True)
        return folder

    def data_copy(self, cwd: Path) -> Path:
        return Path(shutil.copytree(self.fixtures, cwd / "data"))

    def quick(self, out: Path, data: Path | None = None) -> list[str]:
        return [
            "experiment=quick",
            "teacher=tiny_bert",
            f"data.root={data or self.fixtures}",
            f"paths.output_dir={out}",
        ]

    # -- running the CLI (as tests/test_sweeps.py's `cli` helper does)

    @staticmethod
    def env() -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            env.pop(name, None)
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fastformers.run.cli", *args]

    def cli(self, *args: str, cwd: Path, timeout: float | None = None, script: Path | None = None) -> Result:
        """`fastformers ARGS`, or `python SCRIPT ARGS` for a case that wraps the CLI to break something inside it."""
        started = time.monotonic()
        job = subprocess.Popen(
            self.command(*args) if script is None else [sys.executable, str(script), *args],
            cwd=cwd,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.jobs.append(job)
        try:
            stdout, stderr = job.communicate(timeout=timeout or self.timeout)
            code: int | None = job.returncode
        except subprocess.TimeoutExpired:
            kill_group(job)
            stdout, stderr = job.communicate()
            code = None
        self.calls += 1  # each command's output stays in its case folder
        (cwd / f"cli-{self.calls}.out").write_text(stdout)
        (cwd / f"cli-{self.calls}.err").write_text(stderr)
        return Result(code, stdout, stderr, time.monotonic() - started)

    def background(self, *args: str, cwd: Path, tag: str) -> subprocess.Popen:
        """A job whose output goes to files (an unread pipe fills up and blocks it); read back with `finished`."""
        with (cwd / f"{tag}.out").open("w") as out, (cwd / f"{tag}.err").open("w") as err:
            job = subprocess.Popen(
                self.command(*args), cwd=cwd, env=self.env(), stdout=out, stderr=err, start_new_session=True
            )
        self.jobs.append(job)
        return job

    def stop_all(self) -> None:
        """Kills the process group of every job still running (they run in sessions of their own)."""
        for job in self.jobs:
            if job.poll() is None:
                kill_group(job)

    def finished(self, job: subprocess.Popen, cwd: Path, tag: str, timeout: float, started: float) -> Result:
        try:
            code: int | None = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(job)
            job.wait()
            code = None
        read = lambda suffix: (cwd / f"{tag}{suffix}").read_text(errors="replace")  # noqa: E731
        return Result(code, read(".out"), read(".err"), time.monotonic() - started)


def kill_group(job: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(job.pid, sig)


def wait_until(check: Callable[[], bool], job: subprocess.Popen, seconds: float) -> bool:
    """True once `check()` holds; False if the job exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        if job.poll() is not None:
            return False
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------------------------------- expectations


def record(row: Row, result: Result, out: Path | None) -> int:
    """Fills the row's exit, error line, traceback and RUNNING columns; returns the RUNNING count."""
    row.exit = result.exit
    row.error = error_line(result.stderr)
    row.tb_lines = str(traceback_lines(result.stderr))
    if out is None:
        return 0
    row.running, running = running_count(out)
    return running


def expect_refusal(row: Row, result: Result, out: Path | None) -> list[str]:
    """Exit 2, exactly one `fastformers: error:` line and nothing after it, no traceback, no run left RUNNING."""
    running = record(row, result, out)
    problems = []
    if result.code != 2:
        problems.append(f"exit {result.exit}, expected 2")
    errors = [line for line in result.lines if line.startswith(ERROR_PREFIX)]
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines, expected 1")
    elif result.lines[-1] != errors[0]:
        problems.append(f"{len(result.lines) - result.lines.index(errors[0]) - 1} stderr lines after the error line")
    if row.tb_lines != "0":
        problems.append("traceback on stderr")
    if running:
        problems.append(f"{row.running} runs left RUNNING")
    others = len(result.lines) - len(errors)
    if others and not problems:
        row.notes.append(f"{others} other stderr lines before it")
    return problems


def expect_success(row: Row, result: Result, out: Path) -> list[str]:
    running = record(row, result, out)
    problems = []
    if result.code != 0:
        problems.append(f"exit {result.exit}, expected 0")
    if running:
        problems.append(f"{row.running} runs left RUNNING")
    return problems


def conclude(row: Row, problems: list[str]) -> None:
    row.ok = not problems
    row.notes[:0] = problems


def prime(battery: Battery, row: Row, out: Path) -> set[str]:
    """Copies the good run's cache into the case's output folder; the entries present before the bad step."""
    base, result = battery.base_cache()
    if result.code != 0 or not (base / "cache").is_dir():
        row.notes.append(f"good run failed (exit {result.exit}: {error_line(result.stderr)}), cache not primed")
        return set()
    shutil.copytree(base / "cache", out / "cache")
    return cache_entries(out)


def lost_after(row: Row, before: set[str], out: Path) -> list[str]:
    gone = sorted(before - cache_entries(out))
    row.lost = str(len(gone))
    return [f"lost cache entries {', '.join(gone)}"] if gone else []


# -------------------------------------------------------------------------------------------------- the bad data


def cb_lines(data: Path) -> tuple[Path, list[dict]]:
    path = data / "CB" / "train.jsonl"
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def with_record(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Changes record BAD_LINE of CB/train.jsonl (written back with json.dumps: a surrogate as its escape)."""

    def apply(data: Path) -> None:
        path, records = cb_lines(data)
        change(records[BAD_LINE - 1])
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    return apply


def set_field(key: str, value: object) -> Callable[[Path], None]:
    return with_record(lambda r: r.__setitem__(key, value))


def raw_line(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / "CB" / "train.jsonl"
        lines = path.read_bytes().split(b"\n")
        lines[BAD_LINE - 1] = make(lines[BAD_LINE - 1])
        path.write_bytes(b"\n".join(lines))

    return apply


def replace_with_dir(split: str) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / "CB" / f"{split}.jsonl"
        path.unlink()
        path.mkdir()

    return apply


def remove(split: str) -> Callable[[Path], None]:
    return lambda data: (data / "CB" / f"{split}.jsonl").unlink()


def data_case(breakage: Callable[[Path], None], succeeds: bool = False) -> Callable[[Battery, Row, Path], None]:
    def run(battery: Battery, row: Row, cwd: Path) -> None:
        data = battery.data_copy(cwd)
        breakage(data)
        out = cwd / "outputs"
        result = battery.cli(*battery.quick(out, data), cwd=cwd, timeout=battery.run_timeout if succeeds else None)
        conclude(row, expect_success(row, result, out) if succeeds else expect_refusal(row, result, out))

    return run


# ------------------------------------------------------------------------------------------------ the bad config


def config_case(*overrides: str, did_you_mean: bool = False) -> Callable[[Battery, Row, Path], None]:
    def run(battery: Battery, row: Row, cwd: Path) -> None:
        out = cwd / "outputs"
        before = prime(battery, row, out)
        result = battery.cli(*battery.quick(out), *overrides, cwd=cwd)
        problems = expect_refusal(row, result, out) + lost_after(row, before, out)
        if did_you_mean:
            row.notes.append("says 'did you mean'" if "did you mean" in result.stderr.lower() else "no 'did you mean'")
        conclude(row, problems)

    return run


# ----------------------------------------------------------------------------------------------- the bad weights


def tiny_model_folder(battery: Battery, folder: Path) -> Path:
    """A random tiny BERT and its tokenizer saved with save_pretrained: what `teacher.pretrained=<folder>` loads."""
    from omegaconf import OmegaConf

    from fastformers.data.loading import load_examples, texts_of
    from fastformers.data.tasks import TASKS
    from fastformers.models.loading import build_random

    spec = OmegaConf.create(
        {
            "name": "tiny",
            "pretrained": None,
            "family": "bert",
            "attn_implementation": "eager",
            "arch": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128},
            "tokenizer_vocab_size": 500,
            "max_position_embeddings": 128,
        }
    )
    texts = texts_of(load_examples(TASKS["cb"], battery.fixtures, "train"))
    model, tokenizer = build_random(spec, TASKS["cb"], texts)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def truncate_safetensors(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def refused_pickle(folder: Path) -> None:
    import torch

    (folder / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": NotWeights()}, folder / "pytorch_model.bin")


def weights_case(breakage: Callable[[Path], None]) -> Callable[[Battery, Row, Path], None]:
    def run(battery: Battery, row: Row, cwd: Path) -> None:
        folder = tiny_model_folder(battery, cwd / "model")
        breakage(folder)
        out = cwd / "outputs"
        before = prime(battery, row, out)
        result = battery.cli(*battery.quick(out), f"teacher.pretrained={folder}", cwd=cwd)
        conclude(row, expect_refusal(row, result, out) + lost_after(row, before, out))

    return run


# ---------------------------------------------------------------------------------------------------- tracking


def server_case(uri: str) -> Callable[[Battery, Row, Path], None]:
    """A run pointed at a tracking server that cannot answer: refused in one line within SERVER_LIMIT_S."""

    def run(battery: Battery, row: Row, cwd: Path) -> None:
        out = cwd / "outputs"
        result = battery.cli(*battery.quick(out), f"mlflow.tracking_uri={uri}", cwd=cwd, timeout=120)
        problems = expect_refusal(row, result, out)
        row.notes.append(f"reported after {result.wall:.1f} s (wall, start-up included)")
        if result.code is None or result.wall >= SERVER_LIMIT_S:
            problems.append(f"not reported in under {SERVER_LIMIT_S:.0f} s")
        conclude(row, problems)

    return run


def report_on(content: bytes, file_name: str) -> Callable[[Battery, Row, Path], None]:
    """`fastformers report` pointed at a file that is no MLflow store: refused, and the file left unchanged."""

    def run(battery: Battery, row: Row, cwd: Path) -> None:
        store = cwd / file_name
        store.write_bytes(content)
        digest, size = sha256(store), store.stat().st_size
        result = battery.cli(
            "report", "--experiment", "quick", "--tracking-uri", f"sqlite:///{store}", "--out", str(cwd / "report"),
            cwd=cwd,
        )  # fmt: skip
        problems = expect_refusal(row, result, None)
        if not store.is_file() or sha256(store) != digest:
            problems.append(f"{file_name} changed ({size} -> {store.stat().st_size if store.is_file() else 'gone'} B)")
        else:
            row.notes.append(f"{file_name} unchanged")
        conclude(row, problems)

    return run


# --------------------------------------------------------------------------------------------------- processes


def kill9_then_restart(battery: Battery, row: Row, cwd: Path) -> None:
    out = cwd / "outputs"
    before = prime(battery, row, out)
    started = time.monotonic()
    job = battery.background(*battery.quick(out), "finetune.epochs=50", cwd=cwd, tag="killed")
    checkpoint = lambda: bool(list((out / "cache" / "finetune").glob(".*.tmp/checkpoints/*")))  # noqa: E731
    reached = wait_until(checkpoint, job, battery.run_timeout)
    kill_group(job, signal.SIGKILL)
    killed = battery.finished(job, cwd, "killed", 30, started)
    problems = []
    if not reached:
        problems.append(f"no checkpoint before the kill (job exit {killed.exit}: {error_line(killed.stderr)})")
    left, _ = running_count(out)
    row.notes.append(f"{left} RUNNING after kill -9, {len(scratch_folders(out))} scratch folders")
    checkpoints = sorted(str(p.name) for p in (out / "cache" / "finetune").glob(".*.tmp/checkpoints/*"))
    again = battery.cli(*battery.quick(out), cwd=cwd, timeout=battery.run_timeout)
    problems += expect_success(row, again, out)
    runs = run_states(out) or []
    row.notes.append("runs " + ",".join(r.info.status for r in sorted(runs, key=lambda r: r.info.start_time)))
    if scratch := scratch_folders(out):
        problems.append(f"scratch left: {', '.join(str(p.relative_to(out)) for p in scratch)}")
    failed = failed_folders(out)  # the killed build (epochs=50: another key than the restart's), kept to resume
    if len(failed) != 1 or not list(failed[0].glob("checkpoints/*")):
        problems.append(f"expected the killed build kept as 1 failed folder with its checkpoints, found {len(failed)}")
    row.notes.append(f"killed build's checkpoints {checkpoints}, kept in {len(failed)} failed folder")
    conclude(row, problems + lost_after(row, before, out))


DISK_FULL = """# the CLI with every model save failing as on a full disk: a failure right after training
import sys
import transformers
from fastformers.run.cli import entry

def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device (the battery's simulated full disk)")

transformers.PreTrainedModel.save_pretrained = full_disk
sys.argv[0] = "fastformers"
entry()
"""


def failure_after_training(battery: Battery, row: Row, cwd: Path) -> None:
    """The model's save fails after training (a full disk): the trained checkpoints are kept in a failed folder;
    the same command again adopts it, resumes without training again, and saves the best epoch's weights."""
    import torch
    from safetensors.torch import load_file

    out = cwd / "outputs"
    script = cwd / "disk_full.py"
    script.write_text(DISK_FULL)
    first = battery.cli(*battery.quick(out), cwd=cwd, timeout=battery.run_timeout, script=script)
    problems = [] if first.code not in (0, None) else [f"the broken save exited {first.exit}, expected a failure"]
    kept = failed_folders(out)
    best = [p for p in (kept[0].glob("checkpoints/*.ckpt") if kept else []) if p.name != "last.ckpt"]
    if len(kept) != 1 or not (kept[0] / "checkpoints" / "last.ckpt").is_file() or len(best) != 1:
        problems.append(f"expected 1 failed folder with last.ckpt and the best epoch, found {[str(p) for p in kept]}")
        conclude(row, problems)
        return
    expected = {k.removeprefix("model."): v for k, v in torch.load(best[0], weights_only=True)["state_dict"].items()}
    row.notes.append(f"first run exit {first.exit}: {error_line(first.stderr)[:80]}")
    again = battery.cli(*battery.quick(out), cwd=cwd, timeout=battery.run_timeout)
    problems += expect_success(row, again, out)
    logs = again.stdout + again.stderr + "".join(p.read_text(errors="replace") for p in out.rglob("*.log"))
    if "resuming from" not in logs:
        problems.append("the re-run did not resume from the kept checkpoint")
    if "finetune epoch" in again.stdout:  # the per-epoch line of a stage that trains
        problems.append("the re-run trained again")
    if failed_folders(out):
        problems.append("the failed folder is still there after the re-run succeeded")
    entry = finetune_entry(out)
    saved = load_file(entry / "model" / "model.safetensors") if entry else {}
    differ = [k for k, v in expected.items() if k in saved and not torch.equal(saved[k], v)]
    if not saved or differ or not set(saved) <= set(expected):
        problems.append(f"the saved model differs from the kept best epoch ({len(differ)} tensors differ)")
    row.notes.append(f"re-run resumed, {len(saved)} tensors equal to the kept best epoch")
    conclude(row, problems)


def sigterm_sweep(battery: Battery, row: Row, cwd: Path) -> None:
    from fastformers.tracking.runs import ROLE_TAG

    out = cwd / "outputs"
    args = ("-m", *battery.quick(out), "task=cb,rte", "finetune.epochs=20")
    started = time.monotonic()
    job = battery.background(*args, cwd=cwd, tag="sweep")

    def in_job_two() -> bool:  # job 1's entry is renamed into place when done: a scratch checkpoint is job 2's
        return bool(list(out.glob("multiruns/*/*/1"))) and bool(
            list((out / "cache" / "finetune").glob(".*.tmp/checkpoints/*"))
        )

    reached = wait_until(in_job_two, job, battery.run_timeout)
    problems = [] if reached else ["job 2 never reached its first checkpoint"]
    kill_group(job, signal.SIGTERM)
    try:
        job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        problems.append("ignored SIGTERM for 120 s: killed")
    result = battery.finished(job, cwd, "sweep", 30, started)
    running = record(row, result, out)
    if result.code == 0 and reached:
        problems.append("exit 0 after SIGTERM")
    if running:
        problems.append(f"{row.running} runs left RUNNING")
    runs = run_states(out) or []
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    jobs = [r for r in runs if ROLE_TAG not in r.data.tags]
    if not parents:
        problems.append("no sweep parent run")
    elif reached and any(r.info.status != "KILLED" for r in parents):
        problems.append("sweep parent not KILLED")
    if reached and [r.info.status for r in jobs].count("KILLED") != 1:
        problems.append("the stopped job's run not KILLED")
    if reached and not row.error.startswith("fastformers: stopped by SIGTERM:"):
        problems.append("no `fastformers: stopped by SIGTERM:` line last")
    row.notes.append(
        f"parent {','.join(r.info.status for r in parents) or '-'}; "
        f"jobs {','.join(r.info.status for r in sorted(jobs, key=lambda r: r.info.start_time)) or '-'}"
    )
    if scratch := scratch_folders(out):
        problems.append(f"scratch left: {', '.join(str(p.relative_to(out)) for p in scratch)}")
    kept = failed_folders(out)  # the stopped job's build, kept for a re-run to resume from
    row.notes.append(f"failed folders kept: {', '.join(str(p.relative_to(out)) for p in kept) or 'none'}")
    if reached and not kept:
        problems.append("the stopped job's scratch folder was not kept as a failed folder")
    conclude(row, problems)


# ------------------------------------------------------------------------- the stage cache's locks and read errors


def finetune_entry(out: Path) -> Path | None:
    """The primed cache's fine-tuned model entry (the first stage of `experiment=quick`)."""
    found = sorted(p for p in (out / "cache" / "finetune").glob("*") if p.name[0] != ".")
    return found[0] if found else None


def cli_as_nobody(battery: Battery, cwd: Path, *args: str) -> Result:
    """The CLI as user nobody (root reads any file whatever its mode): a file of mode 000 then fails to open."""
    command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *battery.command(*args)]
    started = time.monotonic()
    env = {**battery.env(), "HOME": str(cwd)}
    limit = battery.timeout
    done = subprocess.run(
        command, check=False, cwd=cwd, env=env, capture_output=True, text=True, errors="replace", timeout=limit
    )
    (cwd / "nobody.out").write_text(done.stdout)
    (cwd / "nobody.err").write_text(done.stderr)
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def open_to_nobody(battery: Battery, cwd: Path) -> None:
    """Lets user nobody through the battery's folders (mkdtemp makes them 0700) and write the case's folder."""
    for folder in [cwd, *cwd.parents]:
        folder.chmod(folder.stat().st_mode | 0o755)
        if folder == battery.root:
            break
    shutil.chown(cwd, "nobody", "nogroup")
    for path in cwd.rglob("*"):
        shutil.chown(path, "nobody", "nogroup")


def cache_read_error(battery: Battery, row: Row, cwd: Path) -> None:
    """A cache entry whose manifest cannot be read (an OSError: here EACCES) is reported, not deleted."""
    out = cwd / "outputs"
    before = prime(battery, row, out)
    entry = finetune_entry(out)
    if entry is None:
        conclude(row, ["no finetune entry primed"])
        return
    open_to_nobody(battery, cwd)
    manifest = entry / "manifest.json"
    shutil.chown(manifest, "root", "root")
    manifest.chmod(0o000)
    refused = cli_as_nobody(battery, cwd, *battery.quick(out))
    problems = expect_refusal(row, refused, out)
    if "could not read it" not in row.error or str(entry) not in row.error:
        problems.append("the error line does not name the entry and the read error")
    manifest.chmod(0o644)
    problems += lost_after(row, before, out)
    again = battery.cli(*battery.quick(out), cwd=cwd, timeout=battery.run_timeout)
    if again.code != 0 or "stage finetune: from the cache" not in again.stdout:
        problems.append(f"the next run did not read finetune from the cache (exit {again.exit})")
    row.notes.append(
        f"next run: exit {again.exit}, finetune from the cache: {'stage finetune: from the cache' in again.stdout}"
    )
    conclude(row, problems)


HOLDER = """
import sys, time
from pathlib import Path
from fastformers.run.cache import StageCache, owner_identity
root, key, release = sys.argv[1:4]
with StageCache(root).claimed("finetune", key) as mine:
    me = owner_identity()
    print(f"holding {mine} as {me['pid']}@{me['host']} in pid namespace {me['pid_ns']}", flush=True)
    deadline = time.monotonic() + 900
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    claim = (Path(root) / "finetune" / f".{key}.lock").read_text().strip()
    owner = (Path(root) / "finetune" / (Path(claim).name + ".owner")).read_text()
    print("still mine at release:", str(me["pid_ns"]) in owner, flush=True)
"""


def lock_from_other_namespace(battery: Battery, row: Row, cwd: Path) -> None:
    """A live build lock held from another pid namespace (a container with our host name, its pid meaningless here)
    is waited for, not taken over; the waiting run builds once it is released."""
    out = cwd / "outputs"
    prime(battery, row, out)
    entry = finetune_entry(out)
    if entry is None:
        conclude(row, ["no finetune entry primed"])
        return
    shutil.rmtree(entry)  # the run needs it again, under the same key
    release = cwd / "release"
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLDER, str(out / "cache"), entry.name,
         str(release)], cwd=cwd, env=battery.env(), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    battery.jobs.append(holder)
    assert holder.stdout is not None
    held = holder.stdout.readline().strip()
    problems = [] if held.startswith("holding True") else [f"the holder did not take the lock: {held!r}"]
    row.notes.append(held)
    started = time.monotonic()
    job = battery.background(*battery.quick(out), cwd=cwd, tag="waiter")
    waiting = lambda: "stage finetune: waiting for" in (cwd / "waiter.out").read_text()  # noqa: E731
    if not wait_until(waiting, job, battery.timeout):
        problems.append("the run never said it waits")
    time.sleep(10)  # a while longer under a live lease: it must go on waiting
    if job.poll() is not None or "stage finetune: ran" in (cwd / "waiter.out").read_text():
        problems.append("the run did not wait for the live lock")
    release.touch()
    rest, _ = holder.communicate(timeout=60)
    if "still mine at release: True" not in rest:
        problems.append(f"the lock was taken over while live ({rest.strip()!r})")
    result = battery.finished(job, cwd, "waiter", battery.run_timeout, started)
    problems += expect_success(row, result, out)
    if "stage finetune: ran" not in result.stdout:
        problems.append("the run did not build finetune after the release")
    row.notes.append(f"waited {'yes' if waiting() else 'no'}, finished in {result.wall:.0f} s")
    conclude(row, problems)


def concurrent_pairs(battery: Battery, row: Row, cwd: Path) -> None:
    good, codes, tb, running_total, first_error = 0, Counter(), 0, 0, ""
    for i in range(battery.pairs):
        pair = cwd / f"pair-{i}"
        pair.mkdir()
        out = pair / "outputs"  # a fresh store for each pair
        started = time.monotonic()
        jobs = [battery.background(*battery.quick(out), cwd=pair, tag=tag) for tag in ("a", "b")]
        results = [battery.finished(job, pair, tag, battery.run_timeout, started) for job, tag in zip(jobs, "ab")]
        runs = run_states(out) or []
        statuses = sorted(r.info.status for r in runs)
        running_total += statuses.count("RUNNING")
        codes[",".join(r.exit for r in results)] += 1
        tb += sum(traceback_lines(r.stderr) for r in results)
        if all(r.code == 0 for r in results) and statuses == ["FINISHED", "FINISHED"]:
            good += 1
            continue
        if not first_error:
            bad = next((r for r in results if r.code != 0), results[0])
            first_error = f"pair {i}: " + (error_line(bad.stderr) or f"runs {','.join(statuses) or 'none'}")
    row.exit = " ".join(f"{k}×{n}" for k, n in codes.items()) or "-"
    row.error, row.tb_lines, row.running = first_error, str(tb), str(running_total)
    row.notes.append(f"{good} of {battery.pairs} pairs: both exit 0 and both runs FINISHED")
    conclude(row, [] if good == battery.pairs else [f"{battery.pairs - good} pairs not both FINISHED"])


def ddp_while_locked(battery: Battery, row: Row, cwd: Path) -> None:
    """A DDP quick job (2 ranks, Lightning's launcher) whose distill entry another process holds the build lock of
    and builds (tests/helpers.py's `hold_distill_then_build`): rank 0 waits and reads it, and rank 1 must
    follow rank 0 rather than train distill alone. Expected: exit 0 within the run timeout, its run FINISHED."""
    out = cwd / "outputs"
    args = [*battery.quick(out), "hardware=ddp", "stages=[finetune,distill,evaluate]", "student=minilm_l3",
            "student.layers=[1]", "finetune.batch_size=8", "distill.batch_size=8"]  # fmt: skip
    log, held = cwd / "ddp.out", cwd / "held"
    log.touch()
    hold = "import sys; from tests.helpers import hold_distill_then_build; hold_distill_then_build("
    hold += "sys.argv[1:-2], *sys.argv[-2:])"
    with (cwd / "holder.out").open("w") as stream:
        holder = subprocess.Popen(
            [sys.executable, "-c", hold, *args, str(log), str(held)],
            cwd=REPO,
            env=battery.env(),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    battery.jobs.append(holder)
    problems = []
    if not wait_until(held.exists, holder, battery.run_timeout):
        problems.append(f"the holder never took the distill lock (exit {holder.poll()}, see holder.out)")
    started = time.monotonic()
    job = battery.background(*args, cwd=cwd, tag="ddp")
    result = battery.finished(job, cwd, "ddp", battery.run_timeout, started)
    problems += expect_success(row, result, out)
    if result.code is None:
        problems.append(f"hung: killed after {battery.run_timeout:.0f} s")
    try:
        holder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_group(holder)
    runs = [r for r in run_states(out) or [] if r.data.tags.get("cache.distill")]
    if [r.info.status for r in runs] != ["FINISHED"]:
        problems.append(f"DDP job's runs: {','.join(r.info.status for r in runs) or 'none'}, expected one FINISHED")
    else:
        row.notes.append(f"distill {runs[0].data.tags['cache.distill']} (built by the holder), {result.wall:.0f} s")
    conclude(row, problems)


def served_openvino_under_load(battery: Battery, row: Row, cwd: Path) -> None:
    """A quick int8 run serving its OpenVINO IR with 16-token buckets, then scripts/load_test.py's clients against
    it on 127.0.0.1: every answer must equal the offline prediction of the same request."""
    sys.path.insert(0, str(REPO / "scripts"))
    import load_test

    out = cwd / "outputs"
    serving = ["stages=[finetune,export]", "precision=int8", "precision.min_agreement=0.5"]
    serving += ["precision.calibration_examples=16", "serve.engine=openvino", "serve.bucket=16"]
    result = battery.cli(*battery.quick(out), *serving, cwd=cwd, timeout=battery.run_timeout)
    problems = expect_success(row, result, out)
    runs = [r for r in run_states(out) or [] if r.data.tags.get("served.engine") == "openvino"]
    if problems or not runs:
        conclude(row, problems or ["no run logged an OpenVINO served model"])
        return
    records = load_test.official_records("cb", battery.fixtures, "val")
    (load,) = load_test.run(f"sqlite:///{out / 'mlflow.db'}", runs[0].info.run_id, records, clients=8, requests=48)
    row.error = load.first_problem
    row.notes.append(load.summary())
    wrong = load.total - load.equal
    conclude(row, [f"{wrong} of {load.total} answers differ or failed ({load.errors} errors)"] if wrong else [])


# -------------------------------------------------------------------------------------------------------- fuzz


def fuzz_case(maker: str) -> Callable[[Battery, Row, Path], None]:
    """Mutated lines of one valid record (fastformers/data/fixtures.py's `mutate`) through `load_examples`."""

    def run(battery: Battery, row: Row, cwd: Path) -> None:
        from fastformers.data.fixtures import MAKERS, ill_typed, mutate
        from fastformers.data.loading import load_examples
        from fastformers.data.tasks import get_task
        from fastformers.errors import FastformersError

        task = get_task(maker.lower())
        valid = MAKERS[maker](random.Random(0), 5, True)
        rng = random.Random(f"battery-{maker}")
        (cwd / maker).mkdir()
        data = cwd / maker / "train.jsonl"
        counts: Counter[str] = Counter()
        first: dict[str, str] = {}
        for _ in range(battery.fuzz_lines):
            line = mutate(rng, valid)
            data.write_bytes(line + b"\n")
            try:
                examples = load_examples(task, cwd, "train")
            except FastformersError as err:
                counts["refused"] += 1
                message = str(err)
                if not message.startswith(f"{data}:") or "\n" in message:
                    counts["bad message"] += 1
                    first.setdefault("bad message", f"{message!r} on {line!r}")
                continue
            except Exception as err:
                counts["other"] += 1
                first.setdefault("other", f"{type(err).__name__}: {err} on {line!r}")
                continue
            try:
                problem = ill_typed(task, examples)
                if problem:
                    counts["ill-typed"] += 1
                    first.setdefault("ill-typed", f"{problem} on {line!r}")
            except Exception as err:
                counts["other"] += 1
                first.setdefault("other", f"{type(err).__name__} in the loaded examples: {err} on {line!r}")
            counts["loaded"] += 1
        row.error = (
            f"{battery.fuzz_lines} lines: loaded {counts['loaded']}, FastformersError {counts['refused']}, "
            f"other {counts['other']}"
        )
        row.notes += [f"ill-typed {counts['ill-typed']}, bad messages {counts['bad message']}"]
        row.notes += [f"first {kind}: {text[:300]}" for kind, text in first.items()]
        problems = [f"{counts[k]} {k}" for k in ("other", "ill-typed", "bad message") if counts[k]]
        conclude(row, problems)

    return run


# ------------------------------------------------------------------------------------------------------- cases


CASES = [
    Case("bad_utf8", "data", data_case(raw_line(lambda line: line.replace(b"The ", b"The \xff", 1)))),
    Case("lone_surrogate", "data", data_case(set_field("premise", "\ud800 was here"))),
    Case("null_premise", "data", data_case(set_field("premise", None))),
    Case("list_idx", "data", data_case(set_field("idx", [1, 2]))),
    Case("idx_infinity", "data", data_case(set_field("idx", float("inf")))),
    Case("idx_2_70", "data", data_case(set_field("idx", 2**70))),
    Case("unknown_label", "data", data_case(set_field("label", "maybe"))),
    Case("json_syntax", "data", data_case(raw_line(lambda line: line.replace(b", ", b" ", 1)))),
    Case("train_is_dir", "data", data_case(replace_with_dir("train"))),
    Case("test_is_dir", "data", data_case(replace_with_dir("test"), succeeds=True)),
    Case("missing_val", "data", data_case(remove("val"))),
    Case("heads_abc", "config", config_case("pruning.heads=abc"), primed=True),
    Case("max_seq_length_0", "config", config_case("task.max_seq_length=0"), primed=True),
    Case("split_seed_abc", "config", config_case("data.split_seed=abc"), primed=True),
    Case("stages_twice", "config", config_case("stages=[finetune,finetune]"), primed=True),
    Case("misspelt_key", "config", config_case("finetune.epohcs=2", did_you_mean=True), primed=True),
    Case("unknown_task", "config", config_case("task=glue"), primed=True),
    Case("unknown_engine", "config", config_case("evaluate.engine=tensorrt"), primed=True),
    Case("truncated_safetensors", "weights", weights_case(truncate_safetensors), primed=True),
    Case("refused_pickle", "weights", weights_case(refused_pickle), primed=True),
    Case("server_down", "tracking", server_case("http://127.0.0.1:9")),
    Case("server_unknown_host", "tracking", server_case("http://no-such-host.invalid:5000")),
    Case("report_text_file", "tracking", report_on(b"this is a text file, not an MLflow store\n", "notes.txt")),
    Case("report_empty_file", "tracking", report_on(b"", "empty.db")),
    Case("kill9_then_restart", "processes", kill9_then_restart, primed=True),
    Case("sigterm_sweep", "processes", sigterm_sweep),
    Case("concurrent_pairs", "processes", concurrent_pairs),
    Case("failure_after_training", "processes", failure_after_training),
    Case("cache_read_error", "processes", cache_read_error, primed=True),
    Case("lock_other_pidns", "processes", lock_from_other_namespace, primed=True),
    Case("ddp_while_locked", "processes", ddp_while_locked),
    Case("served_openvino_load", "processes", served_openvino_under_load),  # concurrent requests on the served pick
    *(Case(name, "fuzz", fuzz_case(maker)) for name, maker in FUZZ_TASKS.items()),
]


def select(only: str | None) -> list[Case]:
    if not only:
        return CASES
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {c.name for c in CASES} | {c.group for c in CASES}
    if unknown := [w for w in wanted if w not in known]:
        raise SystemExit(f"reliability_battery: unknown case or group {', '.join(unknown)}; see --list")
    return [c for c in CASES if c.name in wanted or c.group in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="a fresh (absent or empty) folder; default: a temp one")
    parser.add_argument("--only", default=None, help="comma-separated case or group names (see --list)")
    parser.add_argument("--fuzz-lines", type=int, default=10_000, help="mutated lines per reader (default 10000)")
    parser.add_argument("--pairs", type=int, default=10, help="concurrent pairs of quick runs (default 10)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a refused run may take (default 300)")
    parser.add_argument(
        "--run-timeout", type=float, default=900, help="seconds a run that trains may take (default 900)"
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.group:10} {case.name}{'  (primed)' if case.primed else ''}")
        return 0
    cases = select(args.only)
    if args.out is None:
        root = Path(tempfile.mkdtemp(prefix="fastformers-battery-"))
    else:
        root = args.out.resolve()
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"reliability_battery: {root} is not empty; give a fresh output folder")
        root.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/reliability_battery.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"battery: {len(cases)} cases in OUT={root}", flush=True)
    battery = Battery(root, args.fuzz_lines, args.pairs, args.timeout, args.run_timeout)
    rows: list[Row] = []
    print_header()
    try:
        for case in cases:
            row = Row(case.name)
            started = time.monotonic()
            try:
                case.fn(battery, row, battery.case_dir(case.name))
            except Exception as err:  # the battery's own fault: report it in the row, go on with the others
                row.ok = False
                row.notes.insert(0, f"battery error {type(err).__name__}: {err}")
                (root / "cases" / case.name / "battery_error.txt").write_text(traceback.format_exc())
            row.notes.append(f"{time.monotonic() - started:.0f} s")
            row.error = row.error.replace(str(root), "$OUT")  # paths in messages, shorter
            row.notes = [note.replace(str(root), "$OUT") for note in row.notes]
            rows.append(row)
            print_row(row)
            summary = f"{sum(r.ok for r in rows)} of {len(rows)} cases as expected"
            (root / "battery.md").write_text(markdown(rows, summary, command))
    except KeyboardInterrupt:
        battery.stop_all()
        print("interrupted: the table has the cases run so far", file=sys.stderr)
    summary = f"{sum(r.ok for r in rows)} of {len(cases)} cases as expected"
    (root / "battery.md").write_text(markdown(rows, summary, command))
    print(summary)
    print(f"table: {root / 'battery.md'}; each case's files: {root / 'cases'}")
    return 0 if len(rows) == len(cases) and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
