"""Multi-instance inference: `instances` processes × `threads` threads each, every process pinned to its
own physical cores (os.sched_setaffinity), the work sharded across them, timed together between barriers,
and the outputs gathered back into the original order. Besides the model-only pass on pre-tokenized batches,
an instance given its share of the raw texts (and the tokenizer's folder) times an end-to-end pass: it
tokenizes the same batches itself, then runs them, as a caller pays it. A setting's processes stay up between
passes, so the benchmark can interleave settings. Processes are spawned, never forked: a forked
PyTorch/onnxruntime thread pool is not safe to use."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastformers.bench.energy import EnergyMeter
from fastformers.engines import MODEL_INPUTS
from fastformers.engines.target import Target
from fastformers.errors import FastformersError

SYS_CPU = Path("/sys/devices/system/cpu")
BARRIER_TIMEOUT_S = 3600  # a sibling that died leaves the others waiting at most this long
MEMORY_SAMPLE_S = 0.25  # the parent reads its instances' PSS this often while they work (and after every command):
#   reading smaps_rollup walks a process's page tables, so more often would take time from the timed passes


@dataclass(frozen=True)
class Layout:
    """Which cores each instance runs on; the sets are disjoint and each holds `threads` cores."""

    instances: int
    threads: int
    cores: tuple[tuple[int, ...], ...]

    @property
    def label(self) -> str:
        return f"{self.instances}x{self.threads}"


def physical_cores(cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """One logical CPU per physical core among `cpus`: hyper-threads share a core's arithmetic units, so
    two threads on siblings are not two cores' worth of work."""
    chosen, seen = [], set()
    for cpu in sorted(cpus):
        siblings = _cpu_list(sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list") or {cpu}
        key = frozenset(siblings & set(cpus)) or frozenset({cpu})
        if key not in seen:
            seen.add(key)
            chosen.append(cpu)
    return chosen


def _cpu_list(path: Path) -> set[int]:
    """Parses the kernel's CPU list format, e.g. '0-3,8'."""
    try:
        text = path.read_text().strip()
    except OSError:
        return set()
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cores() -> list[int]:
    """The physical cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    return physical_cores(sorted(os.sched_getaffinity(0)))


def plan_layout(
    instances: int, threads: int | None, cores: int | None = None, usable: list[int] | None = None
) -> Layout:
    """Consecutive, disjoint core sets, one per instance; never more threads in total than physical cores.
    `threads` None = cores / instances; `cores` None = every usable core."""
    usable = usable_cores() if usable is None else usable
    if cores is not None and not 0 < cores <= len(usable):
        raise FastformersError(
            f"hardware.cores={cores} but this process may run on {len(usable)} physical cores {usable}"
        )
    total = cores or len(usable)
    if instances < 1 or (threads is not None and threads < 1):
        raise FastformersError(
            f"hardware.instances={instances} and hardware.threads_per_instance={threads} must be at least 1"
        )
    if threads is None:
        if instances > total:
            raise FastformersError(
                f"hardware.instances={instances} > {total} physical cores: each instance needs a core of its own"
            )
        threads = total // instances
    if instances * threads > total:
        raise FastformersError(
            f"hardware.instances={instances} x hardware.threads_per_instance={threads} = "
            f"{instances * threads} threads > {total} physical cores: instances x threads "
            f"must not exceed the cores"
        )
    return Layout(instances, threads, tuple(tuple(usable[i * threads : (i + 1) * threads]) for i in range(instances)))


def layouts_filling(total: int) -> list[tuple[int, int]]:
    """Every (instances, threads) that uses all `total` cores: 1 x total ... total x 1."""
    return [(n, total // n) for n in range(1, total + 1) if total % n == 0]


@dataclass
class Batch:
    """A padded batch of some examples; `indices` are their positions in the whole sample."""

    indices: list[int]
    inputs: dict[str, np.ndarray]
    group_sizes: list[int]  # rows per example (1, or a candidate task's choices)


@dataclass(frozen=True)
class Backend:
    """What an instance loads: the target (engine, precision, options, shape bucket), its engine's
    `engines.<name>` config (plain and picklable) and the artifact file or model folder."""

    target: Target
    engine_conf: tuple[tuple[str, object], ...]
    path: str

    def open(self, threads: int):
        from fastformers.engines import get_engine

        target = self.target
        engine = get_engine(target.engine, {target.engine: dict(self.engine_conf)})
        return engine.open(Path(self.path), target.precision, threads, dict(target.options), target.bucket)


@dataclass(frozen=True)
class Texts:
    """One instance's share of the raw texts, for its end-to-end pass: each timed batch's (text, text pair) rows,
    the tokenizer folder's `tokenizer.json` it loads them with (the `tokenizers` library alone: importing
    transformers would pull torch into every ONNX/OpenVINO instance, ~230 MB of PSS each), and the padding the
    stage's tokenizer applies (to max_length, else each batch's longest row; a bucket is added by the engine's
    `open`, as in the model-only pass)."""

    tokenizer: str  # the model folder holding tokenizer.json
    batches: list[list[tuple[str, str | None]]]
    max_length: int
    fixed: bool
    pad_id: int
    pad_token: str
    padding_side: str = "right"
    inputs: tuple[str, ...] = MODEL_INPUTS  # the feeds the stage's tokenizer returns

    def load(self):
        """The folder's fast tokenizer, set to truncate and pad as the stage's `tokenizer(..., truncation=True)`."""
        from tokenizers import Tokenizer

        path = Path(self.tokenizer) / "tokenizer.json"
        if not path.is_file():
            raise FastformersError(f"{path}: no fast tokenizer file for the end-to-end pass")
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(
            direction=self.padding_side,
            pad_id=self.pad_id,
            pad_token=self.pad_token,
            length=self.max_length if self.fixed else None,
        )
        return tokenizer

    def encode(self, tokenizer, rows: list[tuple[str, str | None]]) -> dict[str, np.ndarray]:
        """One batch's rows tokenized and padded into the engine's int64 feeds."""
        encodings = tokenizer.encode_batch([a if b is None else (a, b) for a, b in rows])
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {k: np.array([getattr(e, fields[k]) for e in encodings], dtype=np.int64) for k in self.inputs}


@dataclass
class Work:
    """One instance's share: the timed batches (run `repeats` times), the batch-size-1 calls whose latencies
    are recorded, and how many of its first batches warm it up (with `every_shape`, plus one batch of every
    distinct input shape: bucketed inputs, for an engine that compiles per shape before the clock runs)."""

    batches: list[Batch]
    latency_batches: list[Batch]
    warmup: int
    repeats: int
    every_shape: bool = False
    texts: Texts | None = None  # the batches' raw texts: with them, the instance can time an end-to-end pass

    def warmup_batches(self) -> list[Batch]:
        if not self.every_shape:
            return self.batches[: self.warmup]
        shapes: dict[tuple, Batch] = {}
        for batch in self.batches + self.latency_batches:
            shapes.setdefault(tuple(np.shape(batch.inputs["input_ids"])), batch)
        return self.batches[: self.warmup] + list(shapes.values())


@dataclass
class InstanceResult:
    instance: int
    cpus: list[int]  # the affinity the instance actually ran with
    threads: int
    passes: list[tuple[float, float]]  # (start, end) of each timed pass, CLOCK_MONOTONIC (system-wide)
    energy_joules: list[float | None]  # per pass, read by instance 0 only
    latencies: list[float]  # seconds per batch-size-1 call
    outputs: list[tuple[list[int], np.ndarray, list[int]]]  # (indices, logits, group_sizes) per batch
    peak_rss_mb: float
    e2e_passes: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each end-to-end pass
    e2e_outputs: list[tuple[list[int], np.ndarray, list[int]]] = field(default_factory=list)  # its last pass's


@dataclass
class Served:
    """Everything the instances measured, their outputs back in sample order."""

    layout: Layout
    results: list[InstanceResult]
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # example index -> its logits rows
    peak_pss_mb: float = 0.0  # the largest sum of the instances' PSS sampled while they were up
    e2e_rows: dict[int, np.ndarray] = field(default_factory=dict)  # the same, from the last end-to-end pass

    @property
    def pass_seconds(self) -> list[float]:
        """Wall time of each timed pass: first instance's start to last instance's end."""
        return _overall([r.passes for r in self.results])

    @property
    def e2e_seconds(self) -> list[float]:
        """Wall time of each end-to-end pass (tokenizing included), measured like `pass_seconds`; empty when the
        instances had no texts."""
        return _overall([r.e2e_passes for r in self.results])

    @property
    def energy_joules(self) -> list[float | None]:
        return self.results[0].energy_joules

    @property
    def latencies(self) -> list[float]:
        return [t for r in self.results for t in r.latencies]

    @property
    def peak_rss_mb(self) -> float:
        """Every instance's own peak RSS, summed: pages the instances share (libraries, mmapped weights) count
        once per instance, so this overstates a layout's memory; `peak_pss_mb` does not."""
        return sum(r.peak_rss_mb for r in self.results)


def _overall(passes: list[list[tuple[float, float]]]) -> list[float]:
    """Per pass, the first instance's start to the last instance's end (`passes`: each instance's spans)."""
    return [max(p[i][1] for p in passes) - min(p[i][0] for p in passes) for i in range(len(passes[0]))]


def _gather_rows(outputs: list[tuple[list[int], np.ndarray, list[int]]], rows: dict[int, np.ndarray]) -> None:
    """Each example's logits rows out of its batch's (indices, logits, group sizes)."""
    for indices, logits, sizes in outputs:
        for index, start, size in zip(indices, np.cumsum([0, *sizes[:-1]]), sizes):
            rows[index] = logits[start : start + size]


def spawn_context():
    """The spawn context. In a joblib (loky) worker the process-wide start method is 'loky', which a spawned
    child is told to set up and cannot (it would die before running): the stdlib's spawn is made the default."""
    if mp.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        mp.set_start_method("spawn", force=True)
    return mp.get_context("spawn")


class Instances:
    """One setting's pinned processes: spawned, loaded and warmed up once, then told to run a timed pass or
    the latency calls when the caller says, so several settings' passes can be interleaved round-robin
    while the others wait idle (blocked on their command queues, using no CPU)."""

    def __init__(self, backend: Backend, layout: Layout, work: list[Work], meter: EnergyMeter):
        if len(work) != layout.instances:
            raise ValueError(f"{len(work)} shares of work for {layout.instances} instances")
        ctx = spawn_context()
        self.layout, self.results, self.peak_pss_mb = layout, ctx.Queue(), 0.0
        barrier = ctx.Barrier(layout.instances)
        self.commands = [ctx.Queue() for _ in range(layout.instances)]
        self.processes = [
            ctx.Process(
                target=_instance_main,
                name=f"fastformers-instance-{i}",
                daemon=True,
                args=(
                    i,
                    backend,
                    layout.cores[i],
                    layout.threads,
                    work[i],
                    meter,
                    barrier,
                    self.commands[i],
                    self.results,
                ),
            )
            for i in range(layout.instances)
        ]
        for process in self.processes:
            process.start()
        self.end_to_end = work[0].texts is not None
        self._gather()  # every instance loaded and warmed up

    def timed_pass(self) -> None:
        self._tell("pass")

    def e2e_pass(self) -> None:
        """One end-to-end pass (each instance tokenizes its share, then runs it), where the work has texts."""
        if self.end_to_end:
            self._tell("e2e")

    def latency_pass(self) -> None:
        self._tell("latency")

    def close(self) -> Served:
        """Stops the processes and gathers what they measured, outputs back in sample order."""
        try:
            gathered = self._tell("stop")
        finally:
            self.terminate(wait=30)
        served = Served(self.layout, sorted(gathered, key=lambda r: r.instance), peak_pss_mb=self.peak_pss_mb)
        for result in served.results:
            _gather_rows(result.outputs, served.rows)
            _gather_rows(result.e2e_outputs, served.e2e_rows)
        return served

    def terminate(self, wait: float = 0.0) -> None:
        """Ends the processes, giving each `wait` seconds to exit by itself first."""
        for process in self.processes:
            process.join(timeout=wait)
            if process.is_alive():
                process.terminate()

    def _tell(self, command: str) -> list:
        for queue_ in self.commands:
            queue_.put(command)
        return self._gather()

    def sample_memory(self) -> None:
        """The instances' PSS now, summed (a page shared by n processes counts 1/n in each): the kernel keeps no
        peak PSS, so the peak is the largest of these samples."""
        total = sum(pss_mb(process.pid) or 0.0 for process in self.processes if process.pid is not None)
        self.peak_pss_mb = max(self.peak_pss_mb, total)

    def _gather(self) -> list:
        """One reply per instance, the instances' memory sampled while waiting and once all have replied; a crash
        or an exception in one fails the whole run loudly."""
        gathered: list = []
        while len(gathered) < len(self.processes):
            try:
                item = self.results.get(timeout=MEMORY_SAMPLE_S)
            except queue.Empty:
                self.sample_memory()
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    self.terminate()
                    raise RuntimeError(
                        f"benchmark instance {dead[0].name} died with exit code {dead[0].exitcode}"
                    ) from None
                continue
            if isinstance(item, (FastformersError, str)):
                self.terminate()
                if isinstance(item, FastformersError):
                    raise item
                raise RuntimeError(f"a benchmark instance failed:\n{item}")
            gathered.append(item)
        self.sample_memory()
        return gathered


def serve(backend: Backend, layout: Layout, work: list[Work], meter: EnergyMeter) -> Served:
    """One setting alone: load, every timed pass, the latency calls, results."""
    instances = Instances(backend, layout, work, meter)
    try:
        for _ in range(work[0].repeats):
            instances.timed_pass()
        instances.e2e_pass()
        instances.latency_pass()
    except BaseException:
        instances.terminate()
        raise
    return instances.close()


def _instance_main(
    instance: int,
    backend: Backend,
    cpus: tuple[int, ...],
    threads: int,
    work: Work,
    meter: EnergyMeter,
    barrier,
    commands,
    results,
) -> None:
    """One pinned instance: load and warm up, then run what the parent says; each timed pass starts and ends
    in step with the other instances of its layout (barriers), so their timings overlap as in service. An
    end-to-end pass tokenizes the instance's own share of the texts inside the clock, then runs it."""
    try:
        os.sched_setaffinity(0, cpus)
        infer = backend.open(threads)
        for batch in work.warmup_batches():
            infer(batch.inputs)
        tokenizer = work.texts.load() if work.texts else None
        if work.texts:  # the tokenizer's first calls are slower too
            for rows in work.texts.batches[: max(work.warmup, 1)]:
                work.texts.encode(tokenizer, rows)
        results.put(("ready", instance))
        passes, energy, outputs, latencies, e2e_passes, e2e_outputs = [], [], [], [], [], []
        while (command := commands.get()) != "stop":
            if command == "pass":
                barrier.wait(BARRIER_TIMEOUT_S)
                reading = meter.start() if instance == 0 else None
                start = time.monotonic()
                outputs = [(b.indices, infer(b.inputs), b.group_sizes) for b in work.batches]
                end = time.monotonic()
                barrier.wait(BARRIER_TIMEOUT_S)  # the pass ends when the slowest instance is done
                energy.append(meter.stop(reading, time.monotonic() - start) if instance == 0 else None)
                passes.append((start, end))
            elif command == "e2e" and work.texts:
                barrier.wait(BARRIER_TIMEOUT_S)
                start = time.monotonic()
                e2e_outputs = [
                    (b.indices, infer(work.texts.encode(tokenizer, rows)), b.group_sizes)
                    for b, rows in zip(work.batches, work.texts.batches)
                ]
                end = time.monotonic()
                barrier.wait(BARRIER_TIMEOUT_S)
                e2e_passes.append((start, end))
            elif command == "latency":
                barrier.wait(BARRIER_TIMEOUT_S)
                for batch in work.latency_batches:
                    started = time.perf_counter()
                    infer(batch.inputs)
                    latencies.append(time.perf_counter() - started)
            results.put((command, instance))
        results.put(
            InstanceResult(
                instance,
                sorted(os.sched_getaffinity(0)),
                threads,
                passes,
                energy,
                latencies,
                outputs,
                peak_rss_mb(),
                e2e_passes,
                e2e_outputs,
            )
        )
    except FastformersError as err:  # bad input: the parent re-raises it as the run's one-line error
        barrier.abort()
        results.put(FastformersError(f"benchmark instance {instance}: {err}"))
    except BaseException:
        barrier.abort()
        results.put(f"instance {instance}: {traceback.format_exc()}")


def pss_mb(pid: int) -> float | None:
    """A process's proportional set size (`Pss:` of /proc/<pid>/smaps_rollup); None once it has exited or where
    the kernel does not offer it."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a
    spawned child would report its parent's size at the fork whenever that is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")
