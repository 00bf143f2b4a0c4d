"""Stage `evaluate`: runs the latest model on each configured split; labelled splits get the official
metrics, unlabelled ones (test) get the leaderboard's submission file `<Task>.jsonl`. With `evaluate.engine`
other than torch it runs that engine's exported artifact (in `evaluate.precision`, by default the run's), so
every engine's speed figure can have its accuracy beside it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig
from transformers import AutoTokenizer

from fastformers.checks import require_number
from fastformers.context import SCORES, StageContext
from fastformers.data.loading import load_examples, make_loader, parse_split, split_label
from fastformers.data.tasks import DIAGNOSTICS
from fastformers.engines import (
    EngineModel,
    artifact_path,
    check_target,
    get_engine,
    picked_target,
    tokenizer_folder,
)
from fastformers.engines.target import Target
from fastformers.errors import FastformersError
from fastformers.models.loading import load_finetuned, predict

VERSION = 2  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = None
CACHED = True
DISTRIBUTED = False
PICK = "pick"
CONFIG_KEYS = ("task", "evaluate", "precision.name", "engines", "data.split_seed")
HEADLINE = SCORES


def uses(cfg: DictConfig) -> tuple[str, ...]:
    if cfg.evaluate.engine == PICK:
        return ("model",) + (("onnx",) if "export" in cfg.stages else ()) + (PICK,)
    return ("model",) if get_engine(cfg.evaluate.engine, cfg.engines).runs_model_folder else ("onnx",)


def precision_of(cfg: DictConfig) -> str:
    """The precision evaluated: `evaluate.precision`, else the run's (fp32 for an engine that runs the trained
    model folder)."""
    if get_engine(cfg.evaluate.engine, cfg.engines).runs_model_folder:
        return cfg.evaluate.precision or "fp32"
    return cfg.evaluate.precision or cfg.precision.name


def validate(cfg: DictConfig) -> None:
    require_number(cfg, "evaluate.batch_size", 1, integer=True)
    require_number(cfg, "evaluate.bucket", 1, integer=True, null="no bucket")
    if cfg.evaluate.engine == PICK:
        if cfg.evaluate.precision or cfg.evaluate.bucket:
            raise FastformersError(
                "evaluate.engine=pick takes the pick's precision and bucket: leave "
                "evaluate.precision and evaluate.bucket null"
            )
        validate_splits(cfg)
        return
    engine = get_engine(cfg.evaluate.engine, cfg.engines)
    check_target(engine, precision_of(cfg), "evaluate.precision")
    reason = engine.unavailable(precision_of(cfg))
    if reason:
        raise FastformersError(f"evaluate.engine={engine.name} evaluate.precision={precision_of(cfg)}: {reason}")
    validate_splits(cfg)


def validate_splits(cfg: DictConfig) -> None:
    if not cfg.evaluate.splits:
        raise FastformersError("evaluate.splits is empty: name at least one split, e.g. [val]")
    for spec in cfg.evaluate.splits:
        parse_split(spec)


def load(ctx: StageContext, inputs: dict[str, Path], out: Path):
    """(model, tokenizer) of what is evaluated: the PyTorch model, an engine's artifact, or the benchmark's
    pick (recorded in `evaluated.json`)."""
    cfg = ctx.cfg
    if cfg.evaluate.engine == PICK:
        target = picked_target(inputs[PICK])
    else:
        target = Target.of(cfg.evaluate.engine, precision_of(cfg), cfg.evaluate.bucket)
    (out / "evaluated.json").write_text(json.dumps(target.to_dict()))
    engine = ctx.engine(target.engine)
    if engine.runs_model_folder:  # the trained model as saved (its tokenizer beside it)
        return load_finetuned(inputs["model"] / "model")
    path = artifact_path(inputs["onnx"], engine, target.precision)
    model = EngineModel(engine.open(path, target.precision, None, dict(target.options), target.bucket))
    return model, AutoTokenizer.from_pretrained(str(tokenizer_folder(inputs["onnx"])))


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task = ctx.cfg, ctx.task
    model, tokenizer = load(ctx, inputs, out)
    results: dict[str, float] = {}
    for spec in cfg.evaluate.splits:
        examples = ctx.data.examples(spec)
        loader = ctx.data.loader(examples, tokenizer, cfg.evaluate.batch_size)
        preds = predict(model, loader)
        label = split_label(spec)
        _write_jsonl(
            out / f"predictions_{label}.jsonl",
            [{"uid": e.uid, "prediction": p, "label": e.label} for e, p in zip(examples, preds)],
        )
        if any(e.label is not None for e in examples):
            results |= {f"{label}/{k}": v for k, v in task.score(examples, preds).items()}
        else:
            _write_jsonl(out / "submission" / f"{task.name}.jsonl", task.submit(examples, preds))
            results |= diagnostics(ctx, model, tokenizer, out)
    return results


def diagnostics(ctx: StageContext, model, tokenizer, out: Path) -> dict[str, float]:
    """With a test submission, the leaderboard's diagnostics this task's model answers (RTE's: AX-b, AX-g), each
    when its official file is there: its submission file and metrics (their labels are public); the missing ones
    are listed in `diagnostics_missing.json` for the report's archive."""
    cfg, task = ctx.cfg, ctx.task
    results: dict[str, float] = {}
    missing = []
    for diagnostic in DIAGNOSTICS.get(task.name, ()):
        path = Path(cfg.data.root) / diagnostic.name / f"{diagnostic.name}.jsonl"
        if not path.is_file():
            missing.append(f"{diagnostic.name}.jsonl (no {path})")
            continue
        examples = load_examples(replace(diagnostic, files={"test": path}), cfg.data.root, "test")
        loader = make_loader(examples, tokenizer, diagnostic, cfg.task.max_seq_length, cfg.evaluate.batch_size)
        preds = predict(model, loader)
        _write_jsonl(out / "submission" / f"{diagnostic.name}.jsonl", diagnostic.submit(examples, preds))
        results |= {f"{diagnostic.name}/{k}": v for k, v in diagnostic.score(examples, preds).items()}
    if missing:
        (out / "diagnostics_missing.json").write_text(json.dumps(missing))
    return results


def summary(metrics: dict[str, float]) -> list[str]:
    """The run's scores: every metric of every evaluated split."""
    return ["scores: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())] if metrics else []


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
