"""Stage `export`: the latest model as an ONNX graph with dynamic batch and sequence axes, then each engine of
`export.engines` builds the artifacts it runs for `precision` (onnxruntime: fused graph, a graph per int8 variant
or fp16; openvino: IR in fp32 and NNCF int8 per variant). With int8, every variant the engines declare is built,
whatever this CPU needs: the cache key (which holds `engines`, so the variant definitions) then fits any machine.
Every artifact is compared with PyTorch on real eval inputs through its engine, and a float one that drifts fails
the stage. `export.json` indexes what was built."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fastformers.checks import require_number
from fastformers.context import SCORES, StageContext
from fastformers.data.loading import parse_split
from fastformers.engines import GRAPHS, INDEX, REFERENCE, Engine, ExportContext, artifact_key, get_engine
from fastformers.engines.onnx import settings_path
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.parity import Compared, check
from fastformers.engines.target import Target
from fastformers.errors import FastformersError
from fastformers.models.loading import load_finetuned, model_inputs
from fastformers.models.pruning import attention_shape, family_layout

log = logging.getLogger(__name__)

VERSION = 5  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "onnx"
CACHED = True
DISTRIBUTED = False
CONFIG_KEYS = ("task", "export", "precision", "engines", "data.split_seed")

PRECISIONS = ("fp32", "int8", "fp16")
HEADLINE = SCORES
MOVED_TO_VARIANTS = ("weight_type", "per_channel", "reduce_range", "outlier_matmuls", "outliers", "smooth_alpha")


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ("model",)


def machine_facts(cfg: DictConfig) -> dict:
    """What this CPU changes in the entry, for its cache key: the int8 variants each engine builds here. An
    accuracy-controlled variant is built only on a CPU it applies to (it judges this CPU's kernels), so an entry
    built on a VNNI machine lacks it and must not be read on an AVX2 one."""
    if cfg.precision.name != "int8":
        return {}
    engines = {name: get_engine(name, cfg.engines) for name in cfg.export.engines}
    return {
        name: sorted(p for p in engine.variants if engine.unavailable(p) is None) for name, engine in engines.items()
    }


def validate(cfg: DictConfig) -> None:
    precision, opts = cfg.precision, cfg.export
    if precision.name not in PRECISIONS:
        raise FastformersError(f"precision.name={precision.name!r} must be one of {list(PRECISIONS)}")
    require_number(cfg, "precision.min_agreement", 0, 1, lo_open=True)
    if precision.name == "int8":
        if "static" in precision:
            raise FastformersError(
                f"precision.static moved to the engine that builds it: set engines.{REFERENCE}.precisions."
                "int8_static.built=true (conf/engines/onnxruntime.yaml)"
            )
        moved = sorted(set(precision) & set(MOVED_TO_VARIANTS))
        if moved:
            raise FastformersError(
                f"precision.{moved[0]} moved to the engines' int8 variants: set it per variant in "
                f"engines.{REFERENCE}.int8.<variant>.{moved[0]} (conf/engines/{REFERENCE}.yaml)"
            )
        require_number(cfg, "precision.calibration_examples", 1, integer=True, null="all")
        check_disjoint(precision.calibration_split, cfg.task.eval_split, "precision.calibration_split")
    if precision.name == "fp16":
        reason = get_engine(REFERENCE, cfg.engines).unavailable("fp16")
        if reason:
            raise FastformersError(f"precision=fp16: {reason}")
    if REFERENCE not in opts.engines:
        raise FastformersError(
            f"export.engines={list(opts.engines)} must include {REFERENCE} (its fused fp32 "
            "graph is the float reference of every accuracy gate)"
        )
    for name in opts.engines:
        get_engine(name, cfg.engines)
    require_number(
        cfg, "export.opset", 13, 17, integer=True, meaning="onnxruntime's fusions are written for opsets 13-17"
    )
    require_number(cfg, "export.parity_examples", 1, integer=True, null="all")
    require_number(cfg, "export.parity_batch_size", 1, integer=True)
    require_number(cfg, "export.fp32_max_abs_diff", 0, lo_open=True)
    parse_split(opts.parity_split)


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg = ctx.cfg
    model, tokenizer = load_finetuned(inputs["model"] / "model")
    folder = out / GRAPHS
    started = time.perf_counter()
    exported = export_onnx(model, tokenizer, folder / "model.onnx", cfg.export.opset)
    heads, width = attention_shape(model)  # pruning narrows it: the optimizer cannot infer it
    made_from = ExportContext(
        exported,
        folder,
        heads,
        width,
        cfg.precision,
        cfg.export,
        functools.cache(lambda: calibration_feeds(ctx, tokenizer)),
        family_layout(model).onnx_model_type,
        functools.cache(lambda count: held_out_feeds(ctx, tokenizer, count)),
    )
    artifacts: dict[str, Path] = {}
    built_by: dict[str, Engine] = {}  # artifact key -> the engine that built it (it knows the artifact's files)
    skipped: dict[str, str] = {}
    for name in cfg.export.engines:
        engine = ctx.engine(name)
        reason = engine.unavailable("fp32") or (
            engine.unavailable(cfg.precision.name) if cfg.precision.name in engine.precisions else None
        )
        if reason:
            log.warning("export: engine %s skipped: %s", name, reason)
            skipped[name] = reason
            continue
        for kind, path in engine.prepare(made_from).items():
            artifacts[artifact_key(name, kind)], built_by[artifact_key(name, kind)] = path, engine
    seconds = time.perf_counter() - started
    tokenizer.save_pretrained(folder)
    parity = check_parity(ctx, model, tokenizer, exported, artifacts)
    fusions = json.loads(settings_path(artifacts[artifact_key(REFERENCE, "fp32")]).read_text())["fused_operators"]
    (out / INDEX).write_text(
        json.dumps(
            {
                "precision": cfg.precision.name,
                "artifacts": {key: str(path.relative_to(out)) for key, path in artifacts.items()},
                "skipped_engines": skipped,
                "fused_operators": fusions,
                "parity": parity,
                "settings": {
                    key: json.loads(settings_path(path).read_text())
                    for key, path in artifacts.items()
                    if settings_path(path).is_file()
                },
            },
            indent=2,
        )
    )
    metrics = {"export_seconds": seconds, "layers": model.config.num_hidden_layers}
    metrics |= {f"fused/{op}": count for op, count in fusions.items()}
    metrics |= {
        f"artifact_mb/{key}": artifact_bytes(built_by[key].artifact_files(path)) / 2**20
        for key, path in artifacts.items()
    }
    metrics |= {f"parity/{label}/{k}": v for label, values in parity.items() for k, v in values.items()}
    return metrics


def artifact_bytes(files: dict[str, Path]) -> int:
    """The size of every file an artifact is (an OpenVINO IR: its .xml and its .bin weights)."""
    return sum(path.stat().st_size for path in files.values() if path.is_file())


def check_disjoint(calibration: str, evaluation: str, field: str) -> None:
    """Calibration must never read the split the metric is reported on."""
    (name, lo, hi), (eval_name, eval_lo, eval_hi) = parse_split(calibration), parse_split(evaluation)
    if name == eval_name and lo < eval_hi and eval_lo < hi:
        raise FastformersError(
            f"{field}={calibration!r} overlaps the evaluation split task.eval_split="
            f"{evaluation!r}: calibrate on examples the metric never sees (e.g. train)"
        )


def calibration_feeds(ctx: StageContext, tokenizer) -> list[dict[str, np.ndarray]]:
    """The calibration sample as feeds: `precision.calibration_examples` of `precision.calibration_split`."""
    return as_feeds(ctx, tokenizer, calibration_examples(ctx, 0, ctx.cfg.precision.calibration_examples))


def held_out_feeds(ctx: StageContext, tokenizer, count: int) -> list[dict[str, np.ndarray]]:
    """`count` examples of the calibration split past the calibration sample, as unlabelled feeds: what accuracy
    control validates on (agreement with the fp32 model), never the eval split the gate judges."""
    cfg = ctx.cfg
    start = cfg.precision.calibration_examples
    if start is None:
        raise FastformersError(
            "precision.calibration_examples=null calibrates on all of precision.calibration_split: an int8 variant "
            "with accuracy_control needs some of it held out (set a count)"
        )
    examples = calibration_examples(ctx, start, start + count)
    if not examples:
        raise FastformersError(
            f"precision.calibration_split={cfg.precision.calibration_split!r} has no examples past the {start} "
            "calibration examples for accuracy control to validate on"
        )
    return as_feeds(ctx, tokenizer, examples)


def calibration_examples(ctx: StageContext, start: int, stop: int | None) -> list:
    """Examples start..stop of `precision.calibration_split` (checked disjoint from the eval split)."""
    return ctx.data.examples(ctx.cfg.precision.calibration_split)[start:stop]


def as_feeds(ctx: StageContext, tokenizer, examples: list) -> list[dict[str, np.ndarray]]:
    """Examples as the graph's feeds, 8 per batch."""
    loader = ctx.data.loader(examples, tokenizer, 8)
    return [{k: v.numpy() for k, v in model_inputs(batch).items()} for batch in loader]


def parity_targets(ctx: StageContext, exported: Path, artifacts: dict[str, Path]) -> list[Compared]:
    """The raw export (through the reference engine), then every engine x precision the artifacts let run here."""
    reference, smoothed = ctx.engine(REFERENCE), artifact_key(REFERENCE, "smoothed")
    targets = [Compared("exported", reference, Target(REFERENCE), exported, True)]
    if smoothed in artifacts:
        targets.append(Compared(smoothed, reference, Target(REFERENCE), artifacts[smoothed], True))
    for name in ctx.cfg.export.engines:
        engine = ctx.engine(name)
        for precision in engine.precisions:
            key = artifact_key(name, engine.artifact_name(precision))
            if key in artifacts and engine.unavailable(precision) is None:
                targets.append(
                    Compared(
                        artifact_key(name, precision),
                        engine,
                        Target(name, precision),
                        artifacts[key],
                        engine.spec(precision).float,
                    )
                )
    return targets


def check_parity(ctx: StageContext, model, tokenizer, exported: Path, artifacts: dict[str, Path]) -> dict:
    cfg = ctx.cfg
    examples = ctx.data.examples(cfg.export.parity_split)
    loader = ctx.data.loader(examples[: cfg.export.parity_examples], tokenizer, cfg.export.parity_batch_size)
    return check(
        model,
        loader,
        parity_targets(ctx, exported, artifacts),
        cfg.export.fp32_max_abs_diff,
        artifact_key(REFERENCE, cfg.precision.name),
        cfg.precision.min_agreement,
    )


def summary(metrics: dict[str, float]) -> list[str]:
    return []  # what it built is in export.json and MLflow; the summary names scores and speed
