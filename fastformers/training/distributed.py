"""Where training runs: one process, or Lightning's DDP over `hardware.devices` x `hardware.num_nodes`
(conf/hardware/ddp.yaml). Every rank runs the pipeline; rank 0 alone writes cache entries and the MLflow run,
the others join each training stage's fit and read rank 0's entries (pipeline.run_worker).

Rank 0 decides, the other ranks follow. Only rank 0 takes a stage's build lock, so only it knows whether a stage
is built (it holds the lock: every rank joins the fit) or read (the entry exists, or another job of a parallel sweep
built it while rank 0 waited). A rank that decided on its own cache lookup would join a fit that rank 0 never
enters and hang in DDP's first collective. Rank 0 publishes each decision as a file,
`<cache>/.ddp/<launch>/run-<n>/<stage>.json`, before it acts on it, and the other ranks wait for that file.

Why files and not torch.distributed's store: under Lightning's own launcher ranks 1.. exist only from rank 0's
first `trainer.fit` (they re-run the command) and no process group or store exists before it, while rank 0 must
decide the stages before that fit; and a store's `get` times out, while rank 0 may wait hours for another job's
teacher. The cache folder is already shared by every rank (the workers read rank 0's entries from it), so the
files reach every node, need no port, and outlive no one: rank 0 touches `alive` every ALIVE_EVERY seconds while
it runs, writes `failed.json` when it fails, and a worker gives up when neither a decision nor a heartbeat came
for ALIVE_LIMIT seconds. `<launch>` names one start of the ranks, the same in every rank: torchrun's run id (or,
for a one-node torchrun without `--rdzv-id`, its agent's pid), SLURM's job, step and restart count, or a token
rank 0 puts in its environment before its first fit, which the ranks Lightning starts inherit. `run-<n>` counts
the runs of one process (a sequential `-m` sweep runs several in each rank, in the same order).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from fastformers.checks import require_number
from fastformers.errors import FastformersError

STRATEGIES = ("auto", "ddp")


def world_size(hardware: DictConfig) -> int:
    return int(hardware.get("devices") or 1) * int(hardware.get("num_nodes") or 1)


def global_rank(hardware: DictConfig) -> int:
    """This process's rank, from what its launcher set: torchrun (RANK), SLURM (SLURM_PROCID), or Lightning's
    own launcher, which starts ranks 1.. of each node with LOCAL_RANK and NODE_RANK."""
    if world_size(hardware) == 1:
        return 0
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("NODE_RANK", "0")) * int(hardware.devices) + int(os.environ.get("LOCAL_RANK", "0"))


def is_worker(hardware: DictConfig) -> bool:
    """A DDP rank other than 0: it trains alongside rank 0 but writes nothing of its own."""
    return global_rank(hardware) != 0


def trainer_placement(hardware: DictConfig) -> dict:
    """Lightning Trainer arguments: the accelerator, how many devices and nodes, and the strategy."""
    strategy: object = hardware.get("strategy") or "auto"
    if strategy == "ddp" and hardware.get("process_group_backend"):
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=hardware.process_group_backend)
    return {
        "accelerator": hardware.accelerator,
        "devices": int(hardware.get("devices") or 1),
        "num_nodes": int(hardware.get("num_nodes") or 1),
        "strategy": strategy,
    }


def check_placement(cfg: DictConfig, blocks: tuple[str, ...]) -> None:
    """Devices, nodes and strategy, and that each training block's global batch splits evenly over the ranks."""
    require_number(cfg, "hardware.devices", 1, integer=True, null="1")
    require_number(cfg, "hardware.num_nodes", 1, integer=True, null="1")
    strategy = cfg.hardware.get("strategy") or "auto"
    if strategy not in STRATEGIES:
        raise FastformersError(f"hardware.strategy={strategy!r} must be one of {list(STRATEGIES)}")
    world = world_size(cfg.hardware)
    if world > 1 and strategy != "ddp":
        raise FastformersError(
            f"hardware.devices x hardware.num_nodes = {world} needs hardware.strategy=ddp (or hardware=ddp)"
        )
    for block in blocks:
        if cfg[block].batch_size % world:
            raise FastformersError(
                f"{block}.batch_size={cfg[block].batch_size} is the global batch: it must split evenly over the "
                f"{world} training processes (hardware.devices x hardware.num_nodes)"
            )


# ----------------------------------------------------------------------------- rank 0's decisions, per stage

BUILD, READ = "build", "read"  # rank 0 holds the build lock (every rank fits) / the entry is read
LAUNCH_ENV = "FASTFORMERS_DDP_LAUNCH"  # rank 0's token, inherited by the ranks Lightning's launcher starts
DECISIONS = ".ddp"  # <cache>/.ddp/<launch>/run-<n>/
ALIVE_EVERY = 30.0  # seconds between rank 0's touches of `alive`
ALIVE_LIMIT = 600.0  # a worker waiting this long with no decision and no heartbeat stops: rank 0 is gone
POLL = 1.0  # seconds between a worker's looks for the next decision
KEEP_DAYS = 7.0  # launch folders whose heartbeat is older are removed when rank 0 starts
_runs = itertools.count()  # the runs of this process, numbered alike in every rank


def launch_token(hardware: DictConfig) -> str:
    """The name of this start of the ranks, the same in all of them (see the module's notes)."""
    if LAUNCH_ENV in os.environ:
        return os.environ[LAUNCH_ENV]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # torchrun without --rdzv-id: the ranks of its one node share their agent's pid
            if int(hardware.get("num_nodes") or 1) > 1:
                raise FastformersError(
                    "hardware.num_nodes > 1 under torchrun needs --rdzv-id=<a job id shared by the nodes>"
                )
            run_id = f"{socket.gethostname()}-{os.getppid()}"
        return f"torchrun-{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        step = os.environ.get("SLURM_STEP_ID", "0")
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{step}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if is_worker(hardware):
        raise FastformersError(
            f"hardware.strategy=ddp: this rank cannot tell which launch it belongs to (no {LAUNCH_ENV}, torchrun "
            "or SLURM variables): start the ranks with torchrun, SLURM, or Lightning (fastformers hardware=ddp ...)"
        )
    os.environ[LAUNCH_ENV] = f"lightning-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.environ[LAUNCH_ENV]


class Decisions:
    """Rank 0's build-or-read choice for each stage of one run, in files the other ranks wait for."""

    def __init__(self, folder: Path):
        self.folder = folder

    def publish(self, stage: str, key: str, action: str) -> None:
        """Written whole (a rename), before rank 0 acts on it: a worker never reads half a decision."""
        self._write(f"{stage}.json", {"stage": stage, "key": key, "action": action})

    def fail(self, message: str) -> None:
        self._write("failed.json", {"error": message})

    def beat(self) -> None:
        (self.folder / "alive").touch()

    def _write(self, name: str, content: dict) -> None:
        part = self.folder / f".{name}.{os.getpid()}.part"
        part.write_text(json.dumps(content))
        os.replace(part, self.folder / name)

    def wait(self, stage: str, key: str | None, patience: float = ALIVE_LIMIT) -> tuple[str, str]:
        """Rank 0's (action, key) for `stage`, waiting while rank 0 is alive; `key`, when given, must be rank 0's
        too (a different one: the ranks run different configs or code)."""
        quiet_since, last_beat = time.monotonic(), None
        while (decided := self._read(f"{stage}.json")) is None:
            if (failed := self._read("failed.json")) is not None:
                raise FastformersError(f"stage {stage}: rank 0 failed: {failed['error']}")
            if (beat := self._last_beat()) != last_beat:  # a new touch, whatever the clocks of the nodes say
                quiet_since, last_beat = time.monotonic(), beat
            elif time.monotonic() - quiet_since > patience:
                raise FastformersError(
                    f"stage {stage}: rank 0 published no decision in {self.folder} and no heartbeat for "
                    f"{patience:.0f} s (did rank 0 fail?)"
                )
            time.sleep(POLL)
        if key is not None and decided["key"] != key:
            raise FastformersError(
                f"stage {stage}: rank 0's cache key {decided['key']} differs from this rank's {key}: "
                "every rank must run the same config, data and code"
            )
        return decided["action"], decided["key"]

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.folder / name).read_text())
        except FileNotFoundError:
            return None

    def _last_beat(self) -> int | None:
        try:
            return (self.folder / "alive").stat().st_mtime_ns
        except FileNotFoundError:
            return None


def decisions_folder(cache_root: Path, hardware: DictConfig) -> Path:
    """This run's folder of decisions; the next call (the next run of a sequential sweep) names the next one."""
    return cache_root / DECISIONS / launch_token(hardware) / f"run-{next(_runs)}"


@contextmanager
def leading(cache_root: Path, hardware: DictConfig) -> Iterator[Decisions | None]:
    """Rank 0 of a DDP run: its Decisions, kept alive by a heartbeat, marked failed if the run fails. One
    process (no DDP): None, and nothing runs beside the pipeline."""
    if world_size(hardware) == 1:
        yield None
        return
    remove_old_launches(cache_root / DECISIONS)
    decisions = Decisions(decisions_folder(cache_root, hardware))
    decisions.folder.mkdir(parents=True, exist_ok=True)
    decisions.beat()
    stop = threading.Event()
    heart = threading.Thread(target=_beat_until, args=(decisions, stop), daemon=True)
    heart.start()
    try:
        yield decisions
    except BaseException as error:
        decisions.fail(f"{type(error).__name__}: {error}".splitlines()[0])
        raise
    finally:
        stop.set()
        heart.join()


def following(cache_root: Path, hardware: DictConfig) -> Decisions:
    """A DDP rank other than 0: the Decisions of rank 0's run that it follows."""
    return Decisions(decisions_folder(cache_root, hardware))


def _beat_until(decisions: Decisions, stop: threading.Event) -> None:
    while not stop.wait(ALIVE_EVERY):
        decisions.beat()


def remove_old_launches(folder: Path) -> None:
    """Launch folders whose rank 0 stopped beating KEEP_DAYS ago: nobody waits on them any more."""
    if not folder.is_dir():
        return
    for launch in folder.iterdir():
        beats = [run / "alive" for run in launch.glob("run-*") if (run / "alive").is_file()]
        newest = max((beat.stat().st_mtime for beat in beats), default=launch.stat().st_mtime)
        if time.time() - newest > KEEP_DAYS * 86400:
            shutil.rmtree(launch, ignore_errors=True)
