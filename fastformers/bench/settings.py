"""Benchmark settings: each names an engine, a precision, padding (and a shape bucket), a model and a layout.
`benchmark.search` expands to every engine x precision x bucket x layout this machine offers: the candidates
the pick is made from; a candidate this machine cannot run (bf16 without bf16 arithmetic) stays in the plan
as a skipped row with its reason. `int8` in the search stands for the engine's int8 variants this CPU needs
(engines/variants.py), its stock recipe among them: a configured row that does the same work (the stock reference)
becomes that candidate instead of being timed twice."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from omegaconf import DictConfig

from fastformers.bench.instances import Layout, layouts_filling, plan_layout, usable_cores
from fastformers.engines import Engine, check_target, engine_names, get_engine
from fastformers.engines.target import Target
from fastformers.engines.variants import int8_features, selected
from fastformers.errors import FastformersError

PADDINGS = ("fixed", "dynamic")
MODELS = ("latest", "teacher")  # which model a setting runs: the one the stages before made, or the teacher
LAYOUT = re.compile(r"^(\d+)x(\d+)$")
SPEC_KEYS = {
    "name",
    "engine",
    "precision",
    "padding",
    "bucket",
    "instances",
    "threads_per_instance",
    "model",
    "options",
    "gated",
}


@dataclass(frozen=True)
class Setting:
    """One row of the table."""

    name: str
    target: Target  # engine, precision, bucket (pad each batch to a multiple of it: static shapes), options
    padding: str
    layout: Layout
    model: str = "latest"
    gated: bool = False  # may change predictions: held to benchmark.gate
    candidate: bool = False  # one of the pick's candidates
    stock: bool = False  # the engine's stock int8 recipe: the pick must be measurably faster than it (analysis.pick)
    skipped: str | None = None  # why this machine cannot run it

    @property
    def engine(self) -> str:
        return self.target.engine

    @property
    def precision(self) -> str:
        return self.target.precision

    @property
    def bucket(self) -> int | None:
        return self.target.bucket

    @property
    def options(self) -> tuple[tuple[str, object], ...]:
        return self.target.options


def plan_settings(cfg: DictConfig) -> list[Setting]:
    """The rows: each configured setting (an identical repeat is kept once), the reference and the last one again
    at every extra layout of `benchmark.layouts`, or the reference at the search's layouts, then its candidates."""
    if not cfg.benchmark.settings:
        raise FastformersError("benchmark.settings is empty: name at least one, e.g. ${benchmark.baseline}")
    rows: list[Setting] = []
    for i, spec in enumerate(cfg.benchmark.settings):
        add_row(rows, parse_setting(cfg, spec, f"benchmark.settings[{i}]"), f"benchmark.settings[{i}]")
    search = cfg.benchmark.search
    if not search:
        layouts, last = extra_layouts(cfg, cfg.benchmark.layouts, "benchmark.layouts"), rows[-1]
        reference = next((row for row in rows if row.name == cfg.benchmark.reference), None)
        if reference is not None:  # the stock reference at every layout the last setting gets: `vs ref` is
            add_layouts(rows, reference, layouts, cfg)  # then best against best
        add_layouts(rows, last, layouts, cfg)  # last: the pick without a search is among the last rows' layouts
        return rows
    if cfg.benchmark.layouts:
        raise FastformersError(
            "benchmark.layouts applies without a search; with benchmark.search, set "
            "benchmark.search.layouts (e.g. auto)"
        )
    unknown = sorted(set(search) - {"engines", "buckets", "layouts", "variants"})
    if unknown:
        raise FastformersError(
            f"benchmark.search: unknown key {unknown[0]!r}; it takes engines, buckets, layouts, variants"
        )
    layouts = extra_layouts(cfg, search.get("layouts"), "benchmark.search.layouts") or [
        (cfg.hardware.instances, cfg.hardware.threads_per_instance)
    ]
    if cfg.benchmark.reference:
        reference = next((row for row in rows if row.name == cfg.benchmark.reference), None)
        if reference is None:
            raise FastformersError(
                f"benchmark.reference={cfg.benchmark.reference!r} is not a setting name "
                f"(have {[row.name for row in rows]})"
            )
        add_layouts(rows, reference, layouts, cfg)
    for candidate in search_candidates(cfg, layouts):
        add_candidate(rows, candidate)
    return rows


def add_candidate(rows: list[Setting], candidate: Setting) -> None:
    """A search candidate, or, where a configured row already does its work at its layout (the stock reference),
    that row made a gated candidate: one timing, one verdict."""
    for i, row in enumerate(rows):
        as_candidate = dataclasses.replace(row, gated=True, candidate=True)
        if row.layout == candidate.layout and same_work(as_candidate, candidate):
            rows[i] = as_candidate
            return
    add_row(rows, candidate, "benchmark.search")


def add_row(rows: list[Setting], setting: Setting, field: str) -> None:
    same_name = [row for row in rows if row.name == setting.name]
    if same_name and same_name[0] != setting:
        raise FastformersError(f"{field}: name {setting.name!r} is already used by another setting")
    if not same_name:
        rows.append(setting)


def add_layouts(rows: list[Setting], setting: Setting, layouts: list[tuple[int, int]], cfg: DictConfig) -> None:
    """`setting` again at each layout it was not measured at yet, named `<name>_<layout>`."""
    for instances, threads in layouts:
        layout = plan_layout(instances, threads, cfg.hardware.cores)
        if all(row.layout != layout for row in rows if same_work(row, setting)):
            rows.append(dataclasses.replace(setting, name=f"{setting.name}_{layout.label}", layout=layout))


def same_work(a: Setting, b: Setting) -> bool:
    """Two rows that differ at most in their layout."""
    return dataclasses.replace(a, name="", layout=b.layout) == dataclasses.replace(b, name="")


def search_candidates(cfg: DictConfig, layouts: list[tuple[int, int]]) -> list[Setting]:
    """engine x precision x bucket x layout from `benchmark.search`, each gated; skipped where unavailable."""
    search, rows = cfg.benchmark.search, []
    for engine_name, precisions in (search.get("engines") or {}).items():
        engine = get_engine(engine_name, cfg.engines)
        for precision in expand_int8(engine, precisions, search.get("variants") or "needed"):
            check_target(engine, precision, f"benchmark.search.engines.{engine_name}")
            reason = engine.unavailable(precision)
            for bucket in (search.get("buckets") or [None]) if engine.static_shapes else [None]:
                check_bucket(bucket, cfg.task.max_seq_length, "benchmark.search.buckets")
                for instances, threads in layouts:
                    layout = plan_layout(instances, threads, cfg.hardware.cores)
                    name = f"{engine_name}_{precision}" + (f"_b{bucket}" if bucket else "") + f"_{layout.label}"
                    rows.append(
                        Setting(
                            name,
                            Target(engine_name, precision, bucket),
                            "dynamic",
                            layout,
                            gated=True,
                            candidate=True,
                            stock=is_stock(engine, precision),
                            skipped=reason,
                        )
                    )
    if not rows:
        raise FastformersError("benchmark.search.engines is empty: name at least one engine and its precisions")
    return rows


def expand_int8(engine: Engine, precisions, selection: str) -> list[str]:
    """`int8` as the engine's int8 variants this CPU needs (`selection`: needed | all); other names as given."""
    expanded: list[str] = []
    for precision in precisions:
        names = selected(engine.variants, selection, int8_features()) if precision == "int8" else []
        for name in names or [precision]:
            if name not in expanded:
                expanded.append(name)
    return expanded


def is_stock(engine: Engine, precision: str) -> bool:
    variant = engine.variants.get(precision)
    return bool(variant and variant.stock)


def check_bucket(bucket, max_length: int, field: str) -> None:
    if bucket is None:
        return
    if not isinstance(bucket, int) or bucket < 1 or max_length % bucket:
        raise FastformersError(
            f"{field}: bucket {bucket!r} must be a positive integer that divides "
            f"task.max_seq_length={max_length} (or null = dynamic shapes)"
        )


def parse_setting(cfg: DictConfig, spec: DictConfig, field: str) -> Setting:
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise FastformersError(f"{field}: unknown key {unknown[0]!r}; a setting takes {sorted(SPEC_KEYS)}")
    for key in ("name", "engine", "padding"):
        if key not in spec:
            raise FastformersError(f"{field}: missing {key!r}")
    engine = get_engine(spec.engine, cfg.engines)
    precision = spec.get("precision") or "fp32"
    check_target(engine, precision, f"{field}.precision")
    if spec.padding not in PADDINGS:
        raise FastformersError(f"{field}.padding={spec.padding!r} must be one of {list(PADDINGS)}")
    bucket = spec.get("bucket")
    check_bucket(bucket, cfg.task.max_seq_length, f"{field}.bucket")
    if bucket and spec.padding == "fixed":
        raise FastformersError(f"{field}: bucket={bucket} needs padding=dynamic (fixed pads to max_seq_length)")
    model = spec.get("model", "latest")
    if model not in MODELS:
        raise FastformersError(f"{field}.model={model!r} must be one of {list(MODELS)}")
    if model == "teacher" and not engine.runs_model_folder:
        folder_engines = [name for name in engine_names(cfg.engines) if get_engine(name, cfg.engines).runs_model_folder]
        raise FastformersError(
            f"{field}: model=teacher runs on engine {' or '.join(folder_engines)} only (the export stage exports "
            "the latest model)"
        )
    target = Target.of(engine.name, precision, bucket, spec.get("options"))
    engine.check_options(dict(target.options), f"{field}.options")
    skipped = engine.unavailable(precision, dict(target.options))  # a row this machine cannot run needs no artifact
    if not engine.runs_model_folder and not skipped:
        check_exported(engine, precision, cfg.precision.name, field)
    hardware = cfg.hardware
    instances = spec.instances if "instances" in spec else hardware.instances
    threads = spec.threads_per_instance if "threads_per_instance" in spec else hardware.threads_per_instance
    gated = bool(spec.get("gated", False))
    return Setting(
        spec.name,
        target,
        spec.padding,
        plan_layout(instances, threads, hardware.cores),
        model,
        gated,
        stock=is_stock(engine, precision),
        skipped=skipped,
    )


def check_exported(engine: Engine, precision: str, run_precision: str, field: str) -> None:
    """Refuses a row whose artifact the export of this run does not build, saying what would build it."""
    if engine.builds(precision, run_precision):
        return
    spec = engine.spec(precision)
    if not spec.built:
        raise FastformersError(
            f"{field}.precision={precision}: the export stage builds it only when switched on: set "
            f"engines.{engine.name}.precisions.{precision}.built=true"
        )
    raise FastformersError(
        f"{field}.precision={precision}: the export stage builds fp32 and precision={run_precision}'s artifacts; "
        f"run with precision={spec.built_by}"
    )


def extra_layouts(cfg: DictConfig, layouts, field: str) -> list[tuple[int, int]]:
    """`auto` = every instances x threads that fills the cores; else a list like [1x2, 2x1]."""
    if layouts == "auto":
        return layouts_filling(cfg.hardware.cores or len(usable_cores()))
    parsed = []
    for text in layouts or []:
        match = LAYOUT.match(str(text))
        if not match:
            raise FastformersError(f"{field}: {text!r} is not <instances>x<threads>, e.g. 2x1 (or auto)")
        parsed.append((int(match[1]), int(match[2])))
    return parsed
