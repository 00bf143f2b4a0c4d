"""The benchmark's settings as plain values, read once from the config (`BenchOptions.of(cfg)`): the bench
functions take these instead of walking the whole DictConfig. Field names are the config keys' names."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from fastformers.bench.roofline import Shape


@dataclass(frozen=True)
class GateOptions:
    """benchmark.gate: the accuracy gate's reference row, limits and sampling."""

    reference: str
    max_disagreement: float
    alpha: float
    permutations: int
    bootstrap: int
    seed: int
    pool_examples: int | None
    on_fail: str


@dataclass(frozen=True)
class PaperOptions:
    """benchmark.paper_baseline: the paper-shape baseline row (random weights, fixed padding, batch 1)."""

    enabled: bool
    examples: int
    max_length: int
    shape: Shape
    engine: str  # benchmark.baseline's engine: the paper's baseline runs out of the box, as the baseline row does


@dataclass(frozen=True)
class BenchOptions:
    """benchmark.*, with the few task and hardware settings the benchmark reads."""

    split: str
    max_examples: int | None
    batch_size: int
    repeats: int
    latency_examples: int
    warmup_batches: int
    sort_by_length: bool
    reference: str | None
    max_memory_mb: float | None
    roofline_seconds: float
    profile_examples: int
    gate: GateOptions
    paper: PaperOptions
    max_length: int  # task.max_seq_length: fixed padding pads to it
    cores: int | None  # hardware.cores (None: every usable core)
    tdp_watts: float | None  # hardware.tdp_watts: the energy estimate's power
    usd_per_hour: float | None  # hardware.usd_per_hour: the cost column

    @classmethod
    def of(cls, cfg: DictConfig) -> BenchOptions:
        opts, gate, paper = cfg.benchmark, cfg.benchmark.gate, cfg.benchmark.paper_baseline
        s = paper.shape
        return cls(
            split=str(opts.split),
            max_examples=opts.max_examples,
            batch_size=int(opts.batch_size),
            repeats=int(opts.repeats),
            latency_examples=int(opts.latency_examples),
            warmup_batches=int(opts.warmup_batches),
            sort_by_length=bool(opts.sort_by_length),
            reference=opts.reference,
            max_memory_mb=opts.max_memory_mb,
            roofline_seconds=opts.roofline_seconds,
            profile_examples=int(opts.profile_examples),
            gate=GateOptions(
                gate.reference,
                gate.max_disagreement,
                gate.alpha,
                gate.permutations,
                gate.bootstrap,
                gate.seed,
                gate.pool_examples,
                gate.on_fail,
            ),
            paper=PaperOptions(
                bool(paper.enabled),
                int(paper.examples),
                int(paper.max_length),
                Shape(s.layers, s.hidden, s.heads, s.hidden // s.heads if s.heads else 0, s.ffn),  # checked if enabled
                str(opts.baseline.engine),
            ),
            max_length=int(cfg.task.max_seq_length),
            cores=cfg.hardware.cores,
            tdp_watts=cfg.hardware.tdp_watts,
            usd_per_hour=cfg.hardware.usd_per_hour,
        )
