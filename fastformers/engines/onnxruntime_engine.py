"""ONNX Runtime: the fused graph of onnxruntime's transformer optimizer, int8 by its quantizer (ours: outlier
MatMuls kept float; `int8_stock`: quantize_dynamic as shipped, the reference every speed-up is held to;
`int8_static`: calibrated MatMul scales), fp16 on the CUDA provider. onnxruntime and PyTorch are imported
where used: an instance serving a graph never loads PyTorch, so its memory is the graph's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastformers.engines import Engine, ExportContext, Infer, feeds_for
from fastformers.errors import FastformersError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    precisions = ("fp32", "int8", "int8_stock", "int8_static", "fp16")

    def unavailable(self, precision: str, options: Mapping[str, Any] | None = None) -> str | None:
        if precision == "fp16" and CUDA not in _ort().get_available_providers():
            return (
                f"fp16 runs on onnxruntime's {CUDA} (install onnxruntime-gpu on a CUDA machine); this "
                f"onnxruntime offers {_ort().get_available_providers()}"
            )
        return None

    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        from fastformers.onnx import quantize
        from fastformers.onnx.optimize import optimize

        fp32, _ = optimize(
            ctx.onnx, ctx.num_heads, ctx.hidden_size, dict(ctx.export.fusion_options or {}), model_type=ctx.model_type
        )
        artifacts = {"fp32": fp32}
        precision = ctx.precision
        if precision.name == "int8":
            source, float_matmuls = fp32, []
            if precision.outlier_matmuls:
                stats = quantize.matmul_input_stats(fp32, ctx.calibration())
                outliers = quantize.outlier_matmuls(stats, precision.outlier_matmuls)
                if precision.outliers == "smooth":
                    source = artifacts["smoothed"] = quantize.smooth_matmuls(
                        fp32, stats, outliers, precision.smooth_alpha
                    )
                else:
                    float_matmuls = outliers
            artifacts["int8"] = quantize.quantize_int8(
                source, precision.weight_type, precision.per_channel, precision.reduce_range, float_matmuls
            )
            # the stock pipeline's graph too (default fusions, quantize_dynamic as shipped), for the reference row
            stock, _ = optimize(
                ctx.onnx, ctx.num_heads, ctx.hidden_size, {}, suffix="optimized_stock", model_type=ctx.model_type
            )
            artifacts["int8_stock"] = quantize.quantize_int8(stock, "QInt8", True, False)
            stock.unlink()  # an intermediate: only its quantized graph is kept
            stock.with_suffix(".json").unlink()
            if precision.static:
                artifacts["int8_static"] = quantize.quantize_int8_static(source, ctx.calibration(), float_matmuls)
        elif precision.name == "fp16":
            artifacts["fp16"] = quantize.convert_fp16(fp32)
        return artifacts

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
    from fastformers.onnx.optimize import DISABLED_OPTIMIZERS

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
