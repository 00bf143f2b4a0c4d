"""Multi-instance inference: `instances` processes × `threads` threads each, every process pinned to its
own physical cores (os.sched_setaffinity), the work sharded across them, timed together between barriers,
and the outputs gathered back into the original order. Processes are spawned, never forked: a forked
PyTorch/onnxruntime thread pool is not safe to use."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastformers.energy import EnergyMeter
from fastformers.errors import FastformersError

SYS_CPU = Path("/sys/devices/system/cpu")
BARRIER_TIMEOUT_S = 3600  # a sibling that died leaves the others waiting at most this long


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
    cpus = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cores() -> list[int]:
    """The physical cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    return physical_cores(sorted(os.sched_getaffinity(0)))


def plan_layout(instances: int, threads: int | None, cores: int | None = None,
                usable: list[int] | None = None) -> Layout:
    """Consecutive, disjoint core sets, one per instance; never more threads in total than physical cores.
    `threads` None = cores / instances; `cores` None = every usable core."""
    usable = usable_cores() if usable is None else usable
    if cores is not None and not 0 < cores <= len(usable):
        raise FastformersError(f"hardware.cores={cores} but this process may run on {len(usable)} physical "
                               f"cores {usable}")
    total = cores or len(usable)
    if instances < 1 or (threads is not None and threads < 1):
        raise FastformersError(f"hardware.instances={instances} and hardware.threads_per_instance={threads} "
                               f"must be at least 1")
    if threads is None:
        if instances > total:
            raise FastformersError(f"hardware.instances={instances} > {total} physical cores: each instance "
                                   f"needs a core of its own")
        threads = total // instances
    if instances * threads > total:
        raise FastformersError(f"hardware.instances={instances} x hardware.threads_per_instance={threads} = "
                               f"{instances * threads} threads > {total} physical cores: instances x threads "
                               f"must not exceed the cores")
    return Layout(instances, threads, tuple(tuple(usable[i * threads:(i + 1) * threads]) for i in range(instances)))


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
    """What an instance loads: a saved PyTorch model folder or an ONNX graph file."""

    kind: str  # torch | onnx
    path: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    session: tuple[tuple[str, object], ...] = ()  # onnxruntime session options, see runtime.session_options


@dataclass
class Work:
    """One instance's share: warm-up calls, the timed batches (run `repeats` times) and the batch-size-1
    calls whose latencies are recorded."""

    batches: list[Batch]
    latency_batches: list[Batch]
    warmup: int
    repeats: int


@dataclass
class InstanceResult:
    instance: int
    cpus: list[int]                  # the affinity the instance actually ran with
    threads: int
    passes: list[tuple[float, float]]  # (start, end) of each timed pass, CLOCK_MONOTONIC (system-wide)
    energy_joules: list[float | None]  # per pass, read by instance 0 only
    latencies: list[float]           # seconds per batch-size-1 call
    outputs: list[tuple[list[int], np.ndarray, list[int]]]  # (indices, logits, group_sizes) per batch
    peak_rss_mb: float


@dataclass
class Served:
    """Everything the instances measured, their outputs back in sample order."""

    layout: Layout
    results: list[InstanceResult]
    rows: dict[int, np.ndarray] = field(default_factory=dict)  # example index -> its logits rows

    @property
    def pass_seconds(self) -> list[float]:
        """Wall time of each timed pass: first instance's start to last instance's end."""
        return [max(r.passes[i][1] for r in self.results) - min(r.passes[i][0] for r in self.results)
                for i in range(len(self.results[0].passes))]

    @property
    def energy_joules(self) -> list[float | None]:
        return self.results[0].energy_joules

    @property
    def latencies(self) -> list[float]:
        return [t for r in self.results for t in r.latencies]

    @property
    def peak_rss_mb(self) -> float:
        """Memory of the whole layout: every instance holds its own model."""
        return sum(r.peak_rss_mb for r in self.results)


def serve(backend: Backend, layout: Layout, work: list[Work], meter: EnergyMeter) -> Served:
    """Runs each instance's work in its own spawned, pinned process and gathers the outputs."""
    if len(work) != layout.instances:
        raise ValueError(f"{len(work)} shares of work for {layout.instances} instances")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(layout.instances), ctx.Queue()
    processes = [
        ctx.Process(target=_instance_main, name=f"fastformers-instance-{i}", daemon=True,
                    args=(i, backend, layout.cores[i], layout.threads, work[i], meter, barrier, results))
        for i in range(layout.instances)
    ]
    for process in processes:
        process.start()
    try:
        gathered = _collect(processes, results)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    served = Served(layout, sorted(gathered, key=lambda r: r.instance))
    for result in served.results:
        for indices, logits, sizes in result.outputs:
            for index, start, size in zip(indices, np.cumsum([0, *sizes[:-1]]), sizes):
                served.rows[index] = logits[start:start + size]
    return served


def _collect(processes, results) -> list[InstanceResult]:
    """Waits for every instance's result; a crash or an exception in one fails the whole run loudly."""
    gathered = []
    while len(gathered) < len(processes):
        try:
            item = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"benchmark instance {dead[0].name} died with exit code {dead[0].exitcode}")
            continue
        if isinstance(item, FastformersError):
            raise item
        if isinstance(item, str):
            raise RuntimeError(f"a benchmark instance failed:\n{item}")
        gathered.append(item)
    return gathered


def _instance_main(instance: int, backend: Backend, cpus: tuple[int, ...], threads: int, work: Work,
                   meter: EnergyMeter, barrier, results) -> None:
    """One pinned instance: load, warm up, then every timed pass and the latency pass in step with the
    other instances (barriers), so their timings overlap as they would in service."""
    try:
        os.sched_setaffinity(0, cpus)
        infer = open_backend(backend, threads)
        for batch in work.batches[: work.warmup]:
            infer(batch.inputs)
        passes, energy, outputs = [], [], []
        for _ in range(work.repeats):
            barrier.wait(BARRIER_TIMEOUT_S)
            reading = meter.start() if instance == 0 else None
            start = time.monotonic()
            outputs = [(b.indices, infer(b.inputs), b.group_sizes) for b in work.batches]
            end = time.monotonic()
            barrier.wait(BARRIER_TIMEOUT_S)  # the pass ends when the slowest instance is done
            energy.append(meter.stop(reading, time.monotonic() - start) if instance == 0 else None)
            passes.append((start, end))
        barrier.wait(BARRIER_TIMEOUT_S)
        latencies = []
        for batch in work.latency_batches:
            started = time.perf_counter()
            infer(batch.inputs)
            latencies.append(time.perf_counter() - started)
        results.put(InstanceResult(instance, sorted(os.sched_getaffinity(0)), threads, passes, energy, latencies,
                                   outputs, peak_rss_mb()))
    except FastformersError as err:  # bad input: the parent re-raises it as the run's one-line error
        barrier.abort()
        results.put(FastformersError(f"benchmark instance {instance}: {err}"))
    except BaseException:  # noqa: BLE001 -- a bug: the parent raises it with this traceback
        barrier.abort()
        results.put(f"instance {instance}: {traceback.format_exc()}")


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a
    spawned child would report its parent's size at the fork whenever that is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def open_backend(backend: Backend, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Arrays in, logits out, on `threads` threads. Imported here, not at the top: an ONNX instance never
    loads PyTorch, so its peak memory is what serving the graph takes."""
    if backend.kind == "onnx":
        from fastformers.runtime import OnnxClassifier

        return OnnxClassifier(backend.path, threads, list(backend.providers), dict(backend.session)).run
    import torch

    from fastformers.models import load_finetuned

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    model, _ = load_finetuned(backend.path, attn_implementation=None)  # transformers' default: out of the box
    model.eval()

    def infer(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.float().numpy()

    return infer
