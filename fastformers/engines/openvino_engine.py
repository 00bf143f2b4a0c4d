"""OpenVINO on the CPU: the raw ONNX export converted to OpenVINO's IR (fp32), run in fp32 or with a bf16
inference hint where the CPU has bf16 arithmetic (AVX-512 BF16, AMX), or int8 by NNCF's post-training
quantization calibrated on the train split (a variant with `accuracy_control` reverts the layers that cost the
most agreement with the fp32 IR on held-out, unlabelled calibration-split examples, until within `max_drop`).
With a `bucket`, inputs are padded to a multiple of it and each
(batch, length) shape gets its own static compiled model: static shapes let the CPU plugin pick faster
kernels than dynamic ones. Compiled models are made on first use and the least recently used is dropped
past `max_compiled`: each compiled model repacks the weights for its kernels (measured ~50 MB per bucket
for MiniLM-L6; OpenVINO has no CPU setting that shares them), so memory grows with the buckets kept. The
source weights are read once and every bucket is a clone of that model (clones share the constants).

Safe under concurrent calls (MLflow's scoring server calls `predict` from several threads): an `InferRequest`
owns its input and output tensors, so each call takes an idle request of its compiled model (or makes one)
and gives it back after copying the logits out; the map of compiled models is guarded by a lock, and a shape
is compiled once (calls of that shape wait for it, calls of other shapes do not)."""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fastformers.engines import Engine, ExportContext, Infer, feeds_for
from fastformers.engines import variants as cpu_variants
from fastformers.engines.variants import Variant, parse_variants
from fastformers.errors import FastformersError

log = logging.getLogger(__name__)


class _Hints(dict):
    """Every int8 variant (int8_of, ...) runs its float parts in f32, as int8 does."""

    def __missing__(self, precision: str) -> str:
        if precision.startswith("int8"):
            return "f32"
        raise KeyError(precision)


# explicit f32: on a CPU with bf16, OpenVINO runs bf16 unless told otherwise; int8 runs its float parts in f32
HINTS = _Hints({"fp32": "f32", "bf16": "bf16", "int8": "f32"})
OPTIONS = ("max_compiled", "hint", "cache_dir")
RECIPE = ("overflow_fix", "accuracy_control")  # an int8 variant's own NNCF settings, beside the shared `nncf` block
OVERFLOW_FIXES = ("disable", "first_layer_only", "enable")  # nncf.OverflowFix values
ACCURACY_CONTROL = ("max_drop", "examples", "max_iterations")  # a variant's `accuracy_control` keys


def _ov():
    try:
        import openvino
    except ImportError as err:
        raise FastformersError("engine openvino: the openvino package is not installed (pip install openvino)") from err
    decline_telemetry()
    return openvino


def decline_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage telemetry unless the user opted out, from a process forked per
    event that resolves a host name: without a network that child hung in getaddrinfo and the finished job never
    exited (seen in a sweep here). This process declines it, as OpenVINO's `opt_in_out --opt_out` would, without
    writing the user's consent file."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no telemetry package: nothing is sent
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED


def cpu_capabilities(ov) -> list[str]:
    """What OpenVINO's CPU plugin says this processor offers, e.g. ['BF16', 'FP32', 'INT8', ...]."""
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoEngine(Engine):
    name = "openvino"  # precisions: conf/engines/openvino.yaml
    static_shapes = True
    requirements = ("openvino",)
    libraries = ("openvino", "nncf")

    def __init__(
        self,
        max_compiled: int | None = None,
        hint: str = "LATENCY",
        nncf: Mapping | None = None,
        int8: Mapping | None = None,
        **options,
    ):
        super().__init__(max_compiled=max_compiled, hint=hint, nncf=dict(nncf or {}), **options)
        self.variants = parse_variants(int8, "engines.openvino.int8", RECIPE)
        for variant in self.variants.values():
            fix = variant.settings.get("overflow_fix")
            if fix is not None and fix not in OVERFLOW_FIXES:
                raise FastformersError(
                    f"engines.openvino.int8.{variant.name}.overflow_fix={fix!r} must be one of {list(OVERFLOW_FIXES)}"
                )
            check_accuracy_control(variant)

    def unavailable(self, precision: str, options: Mapping[str, Any] | None = None) -> str | None:
        try:
            ov = _ov()
        except FastformersError as err:
            return str(err)
        if precision == "bf16":
            capabilities = cpu_capabilities(ov)
            if "BF16" not in capabilities:
                return f"this CPU offers no bf16 arithmetic (OpenVINO's CPU capabilities: {list(capabilities)})"
        if precision in self.variants:
            try:
                import nncf  # noqa: F401
            except ImportError:
                return "int8 needs NNCF (pip install nncf)"
            if not self.built_here(self.variants[precision]):
                return (
                    f"{precision} is built only on a CPU it applies to ({dict(self.variants[precision].when)}): its "
                    "accuracy control judges this CPU's int8 kernels"
                )
        return None

    @staticmethod
    def built_here(variant: Variant) -> bool:
        """Every variant is built by the export whatever the CPU, except an accuracy-controlled one: it costs
        minutes and restores agreement as this CPU's kernels compute it, so it is built where its `when` holds."""
        return not variant.settings.get("accuracy_control") or variant.applies(cpu_variants.int8_features())

    def artifact_files(self, path: Path) -> dict[str, Path]:
        """The IR's .xml and its .bin weights, which OpenVINO looks for beside it."""
        return {"model": Path(path), "weights": Path(path).with_suffix(".bin")}

    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        ov = _ov()
        folder = ctx.folder / "openvino"
        folder.mkdir(parents=True, exist_ok=True)
        model = ov.convert_model(str(ctx.onnx))  # unlike read_model, it folds shape subgraphs and fuses Gelu
        artifacts = {"fp32": folder / "model.xml"}
        ov.save_model(model, str(artifacts["fp32"]), compress_to_fp16=False)
        if ctx.precision.name == "int8":
            for name, variant in self.variants.items():  # every one declared (one cache entry fits any CPU)
                if not self.built_here(variant):  # but accuracy control: see built_here
                    continue
                artifacts[name] = folder / f"model_{name}.xml"
                quantized = self.quantize(model, ctx.calibration(), variant, ctx.held_out)
                ov.save_model(quantized, str(artifacts[name]), compress_to_fp16=False)
        return artifacts

    def quantize(
        self,
        model,
        feeds: list[dict[str, np.ndarray]],
        variant: Variant | None = None,
        held_out: Callable[[int], list[dict[str, np.ndarray]]] | None = None,
    ):
        """NNCF post-training int8 (its transformer preset: SmoothQuant, bias correction, no quantized
        softmax inputs) calibrated on `feeds`, which come from the calibration split (never the eval one);
        the variant's `overflow_fix` halves the weights' range where u8s8 sums could saturate (no VNNI); its
        `accuracy_control` validates on `held_out(examples)` (see `accuracy_controlled`)."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        names = [port.get_any_name() for port in model.inputs]
        options = self.options["nncf"]
        ignored = options.get("ignored_types") or []
        settings = variant.settings if variant else {}
        fix = settings.get("overflow_fix")  # unset: NNCF's own default
        common = {
            "model_type": nncf.ModelType.TRANSFORMER,
            "subset_size": len(feeds),
            "preset": getattr(nncf.QuantizationPreset, str(options.get("preset", "mixed")).upper()),
            "fast_bias_correction": bool(options.get("fast_bias_correction", True)),
            "ignored_scope": nncf.IgnoredScope(types=list(ignored), validate=False) if ignored else None,
        }
        advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(fix) if fix else None)
        calibration = nncf.Dataset([feeds_for(names, feed, "calibration") for feed in feeds])
        control = settings.get("accuracy_control")
        if not control:
            with nncf_quiet():
                return nncf.quantize(model, calibration, advanced_parameters=advanced, **common)
        if held_out is None or variant is None:
            raise FastformersError("engines.openvino.int8: accuracy control needs held-out calibration examples")
        validation = [feeds_for(names, feed, "validation") for feed in held_out(int(control["examples"]))]
        with nncf_quiet():
            return accuracy_controlled(model, calibration, validation, control, advanced, common)

    def load(
        self, path: Path, precision: str, threads: int | None, options: Mapping[str, Any], bucket: int | None = None
    ) -> Infer:
        self.check_options(options, "options")
        settings = self.options | dict(options)
        return CompiledBuckets(path, precision, threads, settings, static=bool(bucket)).infer

    def check_options(self, options: Mapping[str, Any], field: str) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise FastformersError(f"{field}: engine openvino takes options {list(OPTIONS)}, not {unknown}")

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
        """OpenVINO's performance counters (PERF_COUNT): real time per executed layer type. The wall time sums
        the inference calls only, not the reads of the counters between them."""
        import time

        settings = self.options | dict(options)
        compiled = CompiledBuckets(path, precision, threads, settings, static=bool(bucket), perf_counters=True)
        for batch in batches:  # compiles every shape first: the profile is of running, not of compiling
            compiled.infer(batch)
        totals: dict[str, float] = {}
        wall_ms = 0.0
        for batch in batches:
            started = time.perf_counter()
            _, request = compiled.run(batch)
            wall_ms += (time.perf_counter() - started) * 1000
            for info in request.get_profiling_info():
                kind = f"{info.node_type}" + (f"[{info.exec_type}]" if info.exec_type else "")
                totals[kind] = totals.get(kind, 0.0) + info.real_time.total_seconds() * 1000
        return {"wall_ms": wall_ms, "kernel_ms": dict(sorted(totals.items(), key=lambda item: -item[1]))}


def check_accuracy_control(variant: Variant) -> None:
    """A variant's `accuracy_control`: {max_drop: share of agreement with fp32 it may lose, in [0, 1);
    examples: held-out calibration-split examples it validates on; max_iterations: layers reverted at most}."""
    control = variant.settings.get("accuracy_control")
    if control is None:
        return
    where = f"engines.openvino.int8.{variant.name}.accuracy_control"
    if not isinstance(control, Mapping) or set(control) != set(ACCURACY_CONTROL):
        raise FastformersError(f"{where}={control!r} must set exactly {list(ACCURACY_CONTROL)}")
    drop = control["max_drop"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        raise FastformersError(f"{where}.max_drop={drop!r} must be a share of agreement in [0, 1)")
    for key in ("examples", "max_iterations"):
        value = control[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FastformersError(f"{where}.{key}={value!r} must be a positive whole number")


def accuracy_controlled(model, calibration, validation: list[dict[str, np.ndarray]], control, advanced, common):
    """NNCF's accuracy-controlled int8: quantized as `nncf.quantize` would, then the layers that cost the most
    agreement are reverted to float until the share of rows whose argmax equals the fp32 IR's drops by at most
    `max_drop`. `validation` is unlabelled (the fp32 IR's own argmax is the target), so it never needs the eval
    split; it comes from the calibration split, past the calibration sample."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    fp32 = _ov().Core().compile_model(model, "CPU")
    items = [(feed, np.argmax(fp32(feed)[0], axis=-1)) for feed in validation]

    def agreement(compiled, data) -> tuple[float, list[float]]:
        same = [np.equal(np.argmax(compiled(feed)[0], axis=-1), expected) for feed, expected in data]
        return float(np.concatenate(same).mean()), [float(s.mean()) for s in same]

    return nncf.quantize_with_accuracy_control(
        model,
        calibration,
        nncf.Dataset(items, lambda item: item[0]),
        agreement,
        max_drop=float(control["max_drop"]),
        drop_type=nncf.DropType.ABSOLUTE,
        advanced_quantization_parameters=advanced,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=int(control["max_iterations"])
        ),
        **common,
    )


class CompiledModel:
    """One compiled model and its idle infer requests: a request is used by one call at a time, and a pool
    grows to the number of calls that ran at once (each request holds only its own input/output tensors)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.idle: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, Any]:
        """The logits (a copy: the request's output tensor is reused by its next call) and the request run."""
        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            request.infer(feeds)
            return np.array(request.get_output_tensor(0).data, dtype=np.float32), request
        finally:
            self.idle.put(request)


class CompiledBuckets:
    """One compiled model (dynamic shapes), or one per static input shape seen, least recently used dropped
    past `max_compiled` (null: every shape seen is kept)."""

    def __init__(
        self,
        path: Path,
        precision: str,
        threads: int | None,
        settings: Mapping[str, Any],
        static: bool,
        perf_counters: bool = False,
    ):
        ov = _ov()
        if not Path(path).is_file():
            raise FastformersError(f"missing OpenVINO model {path}")
        self.core = ov.Core()
        if settings.get("cache_dir"):
            self.core.set_property({"CACHE_DIR": str(settings["cache_dir"])})
        self.model = self.core.read_model(str(path))
        self.input_names = [port.get_any_name() for port in self.model.inputs]
        self.config = {
            "PERFORMANCE_HINT": str(settings.get("hint", "LATENCY")),
            "NUM_STREAMS": "1",
            "INFERENCE_PRECISION_HINT": HINTS[precision],
        }
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        if perf_counters:
            self.config["PERF_COUNT"] = "YES"
        self.static, self.limit = static, compiled_limit(settings.get("max_compiled"))
        self.compiled: OrderedDict[tuple, CompiledModel] = OrderedDict()
        self.lock = threading.Lock()  # guards `compiled` and `compiling`
        self.compiling: dict[tuple, threading.Lock] = {}  # a lock per shape being compiled: one compile each
        self.path = Path(path)

    def for_shape(self, shape: tuple[int, int]) -> CompiledModel:
        """The compiled model of `shape`, compiled on first use: once however many calls ask for it at once,
        while calls of shapes already compiled go on."""
        key = shape if self.static else ()
        with self.lock:
            if key in self.compiled:
                self.compiled.move_to_end(key)
                return self.compiled[key]
            pending = self.compiling.setdefault(key, threading.Lock())
        with pending:
            with self.lock:
                if key in self.compiled:  # compiled by the call this one waited for
                    return self.compiled[key]
            found = CompiledModel(self.core.compile_model(self.shaped(shape), "CPU", self.config))
            with self.lock:
                self.compiled[key] = found
                self.compiling.pop(key, None)
                if self.limit and len(self.compiled) > self.limit:
                    self.compiled.popitem(last=False)  # a call still running on it keeps it alive until it returns
            return found

    def shaped(self, shape: tuple[int, int]):
        """The model to compile: the source one (dynamic shapes), or a clone reshaped to `shape` (clones share
        the constants)."""
        if not self.static:
            return self.model
        model = self.model.clone()
        model.reshape({name: list(shape) for name in self.input_names})
        return model

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, Any]:
        """The logits and the infer request that computed them (for its profiling info)."""
        feeds = feeds_for(self.input_names, inputs, str(self.path))
        return self.for_shape(tuple(np.shape(feeds[self.input_names[0]]))).run(feeds)

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.run(inputs)[0]


def compiled_limit(value: Any) -> int | None:
    """`max_compiled` as a count (None: unbounded), refusing what is not a positive whole number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FastformersError(f"engines.openvino.max_compiled: {value!r} is not a positive whole number or null")
    return value


@contextmanager
def nncf_quiet() -> Iterator[None]:
    """NNCF's INFO lines (one per operator it leaves in float) and its progress bars (calibration, SmoothQuant,
    bias correction, drawn on rich's console) are hidden unless debugging (`fastformers -v`); its warnings show."""
    if logging.getLogger("fastformers").isEnabledFor(logging.DEBUG):
        yield
        return
    import nncf
    from rich import get_console

    nncf.set_log_level(logging.WARNING)  # NNCF's own switch: its logger is set to INFO when nncf is imported
    console = get_console()
    quiet, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = quiet
