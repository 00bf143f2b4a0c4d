"""ONNX Runtime: the fused graph of onnxruntime's transformer optimizer, int8 by its quantizer in the variants
conf/engines/onnxruntime.yaml declares (`int8`: ours, outlier MatMuls kept float; `int8_stock`: quantize_dynamic's
per-channel preset on the default fusions, the reference every speed-up is held to; `int8_rr`, `int8_u8u8`: what
CPUs without VNNI need), `int8_static` (calibrated MatMul scales), fp16 on the CUDA provider. onnxruntime and
PyTorch are imported where used: an instance serving a graph never loads PyTorch, so its memory is the graph's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastformers.engines import Engine, ExportContext, Infer, feeds_for
from fastformers.engines.variants import Variant, parse_variants
from fastformers.errors import FastformersError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
RECIPE = ("weight_type", "per_channel", "reduce_range", "outlier_matmuls", "outliers", "smooth_alpha", "fusions")
OUTLIER_TREATMENTS = ("float", "smooth")
FUSIONS = ("project", "stock")  # export.fusion_options, or the optimizer's defaults (the stock pipeline)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"  # precisions: conf/engines/onnxruntime.yaml
    requirements = ("onnxruntime",)
    libraries = ("onnx", "onnxruntime")

    def __init__(self, int8: Mapping | None = None, **options: Any):
        super().__init__(**options)
        self.variants = parse_variants(int8, "engines.onnxruntime.int8", RECIPE)
        for variant in self.variants.values():
            check_recipe(variant)
        self._stats: dict[Path, dict] = {}  # MatMul input statistics per source graph, during one prepare

    def unavailable(self, precision: str, options: Mapping[str, Any] | None = None) -> str | None:
        if precision == "fp16" and CUDA not in _ort().get_available_providers():
            return (
                f"fp16 runs on onnxruntime's {CUDA} (install onnxruntime-gpu on a CUDA machine); this "
                f"onnxruntime offers {_ort().get_available_providers()}"
            )
        return None

    def runs_on_gpu(self, precision: str, options: Mapping[str, Any] | None = None) -> bool:
        return precision == "fp16"  # the CUDA provider

    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        from fastformers.engines.onnx import quantize
        from fastformers.engines.onnx.optimize import optimize

        fp32, _ = optimize(
            ctx.onnx, ctx.num_heads, ctx.hidden_size, dict(ctx.export.fusion_options or {}), model_type=ctx.model_type
        )
        artifacts = {"fp32": fp32}
        precision = ctx.precision
        if precision.name == "int8":
            for variant in self.variants.values():  # every one declared: the cache entry fits any CPU
                artifacts |= self.quantize_variant(ctx, variant, fp32)
            if self.builds("int8_static", precision.name):  # opt-in: engines.onnxruntime.precisions
                source, float_matmuls = self.outlier_treatment(ctx, self.project_variant(), fp32)
                artifacts["int8_static"] = quantize.quantize_int8_static(source, ctx.calibration(), float_matmuls)
        elif precision.name == "fp16":
            artifacts["fp16"] = quantize.convert_fp16(fp32)
        return artifacts

    def project_variant(self) -> Variant:
        """The recipe the static graph starts from: `int8` when declared, else the stock one."""
        return self.variants.get("int8") or next(v for v in self.variants.values() if v.stock)

    def quantize_variant(self, ctx: ExportContext, variant: Variant, fp32: Path) -> dict[str, Path]:
        """One variant's graph (plus the smoothed float graph it was quantized from, when it smooths)."""
        from fastformers.engines.onnx import quantize
        from fastformers.engines.onnx.optimize import optimize

        recipe, built = variant.settings, {}
        tag = variant.name.removeprefix("int8").lstrip("_")  # int8 -> model_optimized_quantized.onnx (as before)
        source, suffix = fp32, "quantized" + (f"_{tag}" if tag else "")
        if recipe.get("fusions", "project") == "stock":  # the stock pipeline's own graph: default fusions
            source, _ = optimize(
                ctx.onnx,
                ctx.num_heads,
                ctx.hidden_size,
                {},
                suffix=f"optimized_{tag or 'stock'}",
                model_type=ctx.model_type,
            )
            suffix = "quantized"  # model_optimized_stock_quantized.onnx
        treated, float_matmuls = self.outlier_treatment(ctx, variant, source)
        if treated != source and variant.name == "int8":
            built["smoothed"] = treated  # the float graph it was quantized from: held to fp32 parity
        options = quantize.Int8Options.of(recipe)
        built[variant.name] = quantize.quantize_int8(treated, options, float_matmuls, suffix=suffix)
        if source != fp32:  # an intermediate: only its quantized graph is kept
            source.unlink()
            source.with_suffix(".json").unlink()
        return built

    def outlier_treatment(self, ctx: ExportContext, variant: Variant, source: Path) -> tuple[Path, list[str]]:
        """The graph to quantize and the MatMuls to keep float: the `outlier_matmuls` with the most extreme
        inputs on the calibration sample are kept float or smoothed."""
        from fastformers.engines.onnx import quantize

        count = int(variant.settings.get("outlier_matmuls", 0))
        if not count:
            return source, []
        if source not in self._stats:  # one calibration pass per source graph, shared by the variants
            self._stats[source] = quantize.matmul_input_stats(source, ctx.calibration())
        stats = self._stats[source]
        outliers = quantize.outlier_matmuls(stats, count)
        if variant.settings.get("outliers", "float") == "smooth":
            alpha = float(variant.settings.get("smooth_alpha", 0.5))
            return quantize.smooth_matmuls(source, stats, outliers, alpha), []
        return source, outliers

    def load(
        self, path: Path, precision: str, threads: int | None, options: Mapping[str, Any], bucket: int | None = None
    ) -> Infer:
        providers = [CUDA] if precision == "fp16" else [CPU]
        return OnnxClassifier(path, threads, providers, dict(options)).run

    def profile(
        self,
        path: Path,
        precision: str,
        threads: int,
        options: Mapping[str, Any],
        batches,
        out: Path,
        bucket: int | None = None,
    ) -> dict:
        return profile(path, precision, threads, options, batches, out)

    def check_options(self, options: Mapping[str, Any], field: str) -> None:
        try:
            session_options(None, dict(options))
        except FastformersError as err:
            raise FastformersError(f"{field}: {err}") from None


def check_recipe(variant: Variant) -> None:
    """A variant's recipe fields, refused with the field named before any export work."""
    where, recipe = f"engines.onnxruntime.int8.{variant.name}", variant.settings
    from fastformers.engines.onnx.quantize import WEIGHT_TYPES

    if recipe.get("weight_type", "QInt8") not in WEIGHT_TYPES:
        raise FastformersError(
            f"{where}.weight_type={recipe['weight_type']!r} must be one of {list(WEIGHT_TYPES)} (QUInt8: u8u8 kernels)"
        )
    count = recipe.get("outlier_matmuls", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise FastformersError(f"{where}.outlier_matmuls={count!r} must be an integer >= 0 (0 = none kept float)")
    if recipe.get("outliers", "float") not in OUTLIER_TREATMENTS:
        raise FastformersError(f"{where}.outliers={recipe['outliers']!r} must be one of {list(OUTLIER_TREATMENTS)}")
    alpha = recipe.get("smooth_alpha", 0.5)
    if not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise FastformersError(f"{where}.smooth_alpha={alpha!r} must be in (0, 1)")
    if recipe.get("fusions", "project") not in FUSIONS:
        raise FastformersError(f"{where}.fusions={recipe['fusions']!r} must be one of {list(FUSIONS)}")
    for key in ("per_channel", "reduce_range"):
        if not isinstance(recipe.get(key, False), bool):
            raise FastformersError(f"{where}.{key}={recipe[key]!r} must be true or false")


def _ort():
    import onnxruntime

    return onnxruntime


def session_options(threads: int | None, extra: dict | None = None):
    """One session per process: `threads` intra-op threads (None = onnxruntime's default), no inter-op pool.
    `extra` tunes it the way onnxruntime names things: a dotted key is a session config entry
    (`session.intra_op.allow_spinning: "0"`), any other a SessionOptions attribute (`enable_cpu_mem_arena: false`)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: fused graphs trigger harmless shape-inference warnings
    for key, value in (extra or {}).items():
        if "." in key:
            options.add_session_config_entry(key, str(value))
        elif hasattr(options, key) and not key.startswith("_"):
            setattr(options, key, value)
        else:
            raise FastformersError(
                f"{key!r} is not an onnxruntime SessionOptions attribute nor a dotted session "
                "config entry (e.g. session.intra_op.allow_spinning)"
            )
    return options


def disabled_optimizers(path: Path, providers: list[str]) -> list[str]:
    """The session fusions a graph says it must not get (the optimizer records them in its metadata), read
    from an unoptimized session: e.g. a graph exported without SkipLayerNormalization keeps Add + LayerNorm."""
    from fastformers.engines.onnx.optimize import DISABLED_OPTIMIZERS

    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    meta = ort.InferenceSession(str(path), options, providers=providers).get_modelmeta().custom_metadata_map
    return [name for name in meta.get(DISABLED_OPTIMIZERS, "").split(",") if name]


class OnnxClassifier:
    """An exported sequence classifier behind an InferenceSession."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        session: dict | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FastformersError(f"missing ONNX graph {self.path}")
        providers = providers or [CPU]
        ort = _ort()
        self.session = ort.InferenceSession(
            str(self.path),
            session_options(threads, session),
            providers=providers,
            disabled_optimizers=disabled_optimizers(self.path, providers),
        )
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Integer arrays in, float32 logits out."""
        logits = self.session.run(["logits"], feeds_for(self.input_names, inputs, str(self.path)))[0]
        return logits.astype(np.float32, copy=False)


def profile(path: Path, precision: str, threads: int, options: Mapping[str, Any], batches, out: Path) -> dict:
    """Where a graph's time goes, from onnxruntime's own profiler: milliseconds per operator type."""
    import json
    import time

    providers = [CUDA] if precision == "fp16" else [CPU]
    model = OnnxClassifier(
        path, threads, providers, dict(options) | {"enable_profiling": True, "profile_file_prefix": str(out / "ort")}
    )
    warm = OnnxClassifier(path, threads, providers, dict(options))
    for batch in batches[:3]:  # the first calls allocate: warm the process up outside the profiled session
        warm.run(batch)
    started = time.perf_counter()
    for batch in batches:
        model.run(batch)
    wall_ms = (time.perf_counter() - started) * 1000
    trace = Path(model.session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()  # megabytes of events: the summary is what is kept
    return {"wall_ms": wall_ms, "kernel_ms": operator_times(events)}


def operator_times(events: list[dict]) -> dict[str, float]:
    """Kernel milliseconds per operator type, largest first, from a Chrome-trace event list."""
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
