"""Inference engines behind one seam. An engine turns the exported graph into the artifacts it runs
(`prepare`, at export time) and loads an artifact as `infer(feeds) -> logits` on N threads (`load`, in a
benchmark instance, in `evaluate`, in serving, in the export's parity check).

Engines are named by the config group `conf/engines/` (each file: `_target_` = the engine class, its
`precisions` and its options); adding one is a module here and a file there. What the rest of the package asks
of an engine is a property of it (runs the model folder or an artifact, the files of an artifact, the libraries
it needs), never a test of its name.
"""

from __future__ import annotations

import json
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from fastformers.engines.target import Target
from fastformers.engines.variants import VARIANTS_BUILT_BY, Variant
from fastformers.errors import FastformersError

Infer = Callable[[dict[str, np.ndarray]], np.ndarray]  # int64 feeds in, float32 logits [rows, classes] out
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INDEX = "export.json"  # written by the export stage: which file holds which engine's artifact
GRAPHS = "model"  # the export stage's subfolder of artifacts and tokenizer (kept out of MLflow artifacts)
PICK = "pick.json"  # written by the benchmark stage: the engine, precision, bucket and layout it picked
# the engine every export builds: its fused fp32 graph is the float reference of parity and of the benchmark's gate,
# and a run without a pick serves its precision on it
REFERENCE = "onnxruntime"


@dataclass(frozen=True)
class Precision:
    """One precision an engine runs, as its config declares it (`engines.<name>.precisions.<precision>`)."""

    name: str
    artifact: str  # the artifact it runs (openvino's bf16: the fp32 IR compiled with a bf16 hint)
    built_by: str | None = None  # the run's precision (precision.name) whose export builds it; None: every export
    built: bool = True  # false: declared, but exported only when switched on (an opt-in artifact)
    quantized: bool = False  # integer arithmetic: the roofline holds it to the int8 peak
    float: bool = False  # held to allclose with PyTorch in parity; the others to argmax agreement


PRECISION_KEYS = tuple(f.name for f in fields(Precision) if f.name != "name")


def parse_precisions(spec: Mapping | None, field: str) -> dict[str, Precision]:
    """An engine's `precisions` block as data, each key checked (a typo would silently change what is built)."""
    table = {}
    for name, given in (spec or {}).items():
        body = dict(given or {})
        unknown = sorted(set(body) - set(PRECISION_KEYS))
        if unknown:
            raise FastformersError(
                f"{field}.{name}: unknown key {unknown[0]!r}; a precision takes {list(PRECISION_KEYS)}"
            )
        for key in ("built", "quantized", "float"):
            if not isinstance(body.get(key, False), bool):
                raise FastformersError(f"{field}.{name}.{key}={body[key]!r} must be true or false")
        table[str(name)] = Precision(str(name), str(body.pop("artifact", name)), **body)
    return table


@dataclass
class ExportContext:
    """What an engine's `prepare` starts from: the exported float graph and what quantizers need."""

    onnx: Path  # the raw TorchScript export, opset 13-17, dynamic batch and sequence axes
    folder: Path  # where artifacts go (the export stage's model/ folder)
    num_heads: int  # attention heads per layer, and their total width (pruning narrows them)
    hidden_size: int
    precision: Any  # the run's precision config node
    export: Any  # the run's export config node
    calibration: Callable[[], list[dict[str, np.ndarray]]]  # feeds from the calibration split, built on first call
    model_type: str = "bert"  # onnxruntime transformer optimizer's model_type for the family (modeling_fastformers)
    # feeds of `count` calibration-split examples past the calibration sample, unlabelled (accuracy control)
    held_out: Callable[[int], list[dict[str, np.ndarray]]] | None = None


class Engine(ABC):
    """One inference runtime. Precisions name what the engine runs; an artifact is a file it loads."""

    name: str = ""
    static_shapes: bool = False  # compiles per input shape: worth searching over shape buckets
    runs_model_folder: bool = False  # loads the saved model folder a training stage wrote, not an exported artifact
    requirements: tuple[str, ...] = ()  # pip distributions a served model of this engine needs, beyond the package's
    libraries: tuple[str, ...] = ()  # distributions whose code shapes its artifacts and outputs (cache provenance)

    def __init__(self, precisions: Mapping | None = None, **options: Any):
        self.options = options
        self.variants: dict[str, Variant] = {}  # its int8 variants by precision name (engines/variants.py)
        self.table = parse_precisions(precisions, f"engines.{self.name}.precisions")

    @property
    def precisions(self) -> tuple[str, ...]:
        """What it runs: the precisions its config declares, then its int8 variants."""
        return (*self.table, *(name for name in self.variants if name not in self.table))

    @property
    def float_precisions(self) -> tuple[str, ...]:
        return tuple(name for name in self.precisions if self.spec(name).float)

    def spec(self, precision: str) -> Precision:
        """A precision's data; an int8 variant is a quantized artifact of an int8 export. Undeclared (an engine
        built from a served model's older config): its own artifact, built by every export."""
        if precision in self.table:
            return self.table[precision]
        if precision in self.variants:
            return Precision(precision, precision, built_by=VARIANTS_BUILT_BY, quantized=True)
        return Precision(precision, precision)

    def builds(self, precision: str, run_precision: str) -> bool:
        """Whether an export in `run_precision` builds the artifact `precision` runs on."""
        spec = self.spec(precision)
        return spec.built and spec.built_by in (None, run_precision)

    def runs_on_gpu(self, precision: str, options: Mapping[str, Any] | None = None) -> bool:
        """Whether `precision` (with a setting's `options`) runs on a CUDA GPU: no CPU peak applies to it."""
        return False

    def artifact_files(self, path: Path) -> dict[str, Path]:
        """Every file an artifact is, by role (a served model copies them side by side): one file by default."""
        return {"model": Path(path)}

    def unavailable(self, precision: str, options: Mapping[str, Any] | None = None) -> str | None:
        """Why `precision` (with a setting's `options`) cannot run on this machine (a missing package, no bf16 in
        the CPU, no GPU), or None."""
        return None

    def artifact_name(self, precision: str) -> str:
        """The artifact a precision runs on (OpenVINO's bf16 compiles the fp32 model with a bf16 hint)."""
        return self.spec(precision).artifact

    @abstractmethod
    def prepare(self, ctx: ExportContext) -> dict[str, Path]:
        """Builds this engine's artifacts for the run's precision: {artifact name: file}."""

    @abstractmethod
    def load(
        self, path: Path, precision: str, threads: int | None, options: Mapping[str, Any], bucket: int | None = None
    ) -> Infer:
        """The artifact as an infer function on `threads` threads (None = the engine's default). With `bucket`,
        every call's length is a multiple of it (see `open`), so an engine may compile one static shape each."""

    def open(
        self,
        path: Path,
        precision: str,
        threads: int | None = None,
        options: Mapping[str, Any] | None = None,
        bucket: int | None = None,
    ) -> Infer:
        """`load`, with inputs padded to the next multiple of `bucket` tokens first when one is set: padding
        is masked, so predictions do not change, and an engine with static shapes sees few distinct ones."""
        infer = self.load(Path(path), precision, threads, options or {}, bucket)
        if not bucket:
            return infer

        def padded(inputs: dict[str, np.ndarray]) -> np.ndarray:
            return infer(pad_to_bucket(inputs, bucket))

        return padded

    def profile(
        self,
        path: Path,
        precision: str,
        threads: int,
        options: Mapping[str, Any],
        batches: list[dict[str, np.ndarray]],
        out: Path,
        bucket: int | None = None,
    ) -> dict | None:
        """Where the time goes, from the engine's own profiler: {"wall_ms", "kernel_ms": {operator type: ms}};
        None where the engine has none."""
        return None

    def check_options(self, options: Mapping[str, Any], field: str) -> None:
        """Refuses per-setting options the engine does not know, before any work."""
        if options:
            raise FastformersError(f"{field}: engine {self.name} takes no options (got {sorted(options)})")


def engine_names(engines_cfg: Mapping) -> list[str]:
    return sorted(engines_cfg or {})


def get_engine(name: str, engines_cfg: Mapping) -> Engine:
    """The engine `name` as configured under `engines.<name>` (its `_target_` class and options)."""
    if name not in (engines_cfg or {}):
        raise FastformersError(
            f"engine {name!r} is not configured; choose from {engine_names(engines_cfg)} "
            "(an engine is a module in fastformers/engines/ plus conf/engines/<name>.yaml)"
        )
    spec = dict(engines_cfg[name])
    target = spec.pop("_target_", None)
    if not target:
        raise FastformersError(f"engines.{name}: missing _target_ (the engine class)")
    return engine_class(name, str(target))(**spec)


def configured_libraries(engines_cfg: Mapping) -> tuple[str, ...]:
    """The libraries of every configured engine, from their classes (nothing is instantiated)."""
    found: dict[str, None] = {}
    for name in engine_names(engines_cfg):
        found |= dict.fromkeys(engine_class(name, str(engines_cfg[name].get("_target_"))).libraries)
    return tuple(found)


def engine_class(name: str, target: str) -> type[Engine]:
    """The class `target` names, checked to be an Engine before anything is instantiated: a config from a store
    you do not trust (a served model's) must not get `os.system` or `subprocess.Popen` called."""
    try:
        found = pkgutil.resolve_name(target)  # imports the module and looks the name up; calls nothing it finds
    except (ImportError, AttributeError, ValueError) as err:
        raise FastformersError(f"engines.{name}._target_={target!r} cannot be imported ({err})") from None
    if not (isinstance(found, type) and issubclass(found, Engine)):
        raise FastformersError(f"engines.{name}._target_={target!r} is not a fastformers Engine")
    return found


def check_target(engine: Engine, precision: str, field: str) -> None:
    if precision not in engine.precisions:
        raise FastformersError(
            f"{field}: engine {engine.name} runs precisions {list(engine.precisions)}, not {precision!r}"
        )


def artifact_key(engine: str, artifact: str) -> str:
    return f"{engine}/{artifact}"


class EngineModel:
    """An infer function called like a transformers model (`model(**tensors).logits`), so `predict`, the
    evaluate stage and the parity check treat every engine alike."""

    def __init__(self, infer: Infer):
        self.infer = infer

    def eval(self) -> EngineModel:
        return self  # a compiled artifact has no training mode

    def __call__(self, **inputs) -> SimpleNamespace:
        import torch

        feeds = {k: v.numpy() for k, v in inputs.items() if k in MODEL_INPUTS}
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(self.infer(feeds), dtype=np.float32)))


def pad_to_bucket(inputs: Mapping[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    """Right-pads every [batch, length] input with zeros (attention_mask 0: masked) to a multiple of `bucket`."""
    length = np.shape(inputs["input_ids"])[1]
    extra = -length % bucket
    if not extra:
        return dict(inputs)
    return {k: np.pad(np.asarray(v), ((0, 0), (0, extra))) for k, v in inputs.items()}


def feeds_for(input_names: list[str], inputs: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The inputs a graph takes, as int64; a missing `token_type_ids` is fed as zeros (what PyTorch assumes)."""
    feeds = {}
    for name in input_names:
        if name in inputs:
            feeds[name] = np.asarray(inputs[name], dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros(np.shape(inputs["input_ids"]), dtype=np.int64)
        else:
            raise FastformersError(f"{source}: the graph needs input {name!r}, which the batch lacks")
    return feeds


def export_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FastformersError(f"{folder} holds no {INDEX}: not an export stage output")
    return json.loads(path.read_text())


def artifact_path(folder: Path, engine: Engine, precision: str) -> Path:
    """The file `engine` runs `precision` from, in an export stage output."""
    index = export_index(folder)
    key = artifact_key(engine.name, engine.artifact_name(precision))
    if key not in index["artifacts"]:
        skipped = index.get("skipped_engines", {}).get(engine.name)
        raise FastformersError(
            f"{folder}: no {key} artifact was exported "
            + (
                f"({engine.name} was skipped: {skipped})"
                if skipped
                else f"(have {sorted(index['artifacts'])}); run the export stage with "
                f"precision={precision} and {engine.name} in export.engines"
            )
        )
    return Path(folder) / index["artifacts"][key]


def tokenizer_folder(folder: Path) -> Path:
    return Path(folder) / GRAPHS


def read_pick(folder: Path) -> dict:
    """The benchmark's pick: {name, layout, model} and its target's {engine, precision, bucket, options}."""
    path = Path(folder) / PICK
    pick = json.loads(path.read_text()) if path.is_file() else None
    if not pick:
        raise FastformersError(
            f"{path}: the benchmark made no pick (no candidate was timed); set evaluate.engine "
            "to an engine name instead of pick"
        )
    return pick


def picked_target(folder: Path) -> Target:
    """What the benchmark picked, as a Target (pick.json files written before Target read the same)."""
    return Target.from_dict(read_pick(folder), str(Path(folder) / PICK))
