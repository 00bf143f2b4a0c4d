"""Stage `evaluate`: runs the latest model on each configured split; labelled splits get the official
metrics, unlabelled ones (test) get the leaderboard's submission file `<Task>.jsonl`. With
`evaluate.backend=onnx` it runs the latest exported graph (in its precision) instead of the PyTorch model,
so every speed figure of an ONNX variant has its accuracy beside it."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from fastformers.data import load_examples, make_loader, parse_split
from fastformers.errors import FastformersError
from fastformers.models import load_finetuned, predict
from fastformers.runtime import load_exported
from fastformers.tasks import get_task

VERSION = 1  # bump when a code change alters what this stage writes
PROVIDES = None
USES = ("model",)  # with evaluate.backend=onnx: ("onnx",), see uses()
CONFIG_KEYS = ("task", "evaluate", "data.split_seed")
BACKENDS = ("torch", "onnx")


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ("onnx",) if cfg.evaluate.backend == "onnx" else USES


def validate(cfg: DictConfig) -> None:
    if cfg.evaluate.backend not in BACKENDS:
        raise FastformersError(f"evaluate.backend={cfg.evaluate.backend!r} must be one of {list(BACKENDS)}")
    if not cfg.evaluate.splits:
        raise FastformersError("evaluate.splits is empty: name at least one split, e.g. [val]")
    for spec in cfg.evaluate.splits:
        parse_split(spec)


def split_label(spec: str) -> str:
    """A metric-name-safe label: 'val' stays 'val', 'val[60%:]' becomes 'val_60-100pct'."""
    name, lo, hi = parse_split(spec)
    return name if (lo, hi) == (0.0, 1.0) else f"{name}_{round(lo * 100)}-{round(hi * 100)}pct"


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task = get_task(cfg.task.name)
    if "onnx" in inputs:
        model, tokenizer = load_exported(inputs["onnx"])
    else:
        model, tokenizer = load_finetuned(inputs["model"] / "model")
    results: dict[str, float] = {}
    for spec in cfg.evaluate.splits:
        examples = load_examples(task, cfg.data.root, spec, cfg.data.split_seed, cfg.data.download)
        loader = make_loader(examples, tokenizer, task, cfg.task.max_seq_length, cfg.evaluate.batch_size)
        preds = predict(model, loader)
        label = split_label(spec)
        _write_jsonl(out / f"predictions_{label}.jsonl",
                     [{"uid": e.uid, "prediction": p, "label": e.label} for e, p in zip(examples, preds)])
        if any(e.label is not None for e in examples):
            results |= {f"{label}/{k}": v for k, v in task.score(examples, preds).items()}
        else:
            _write_jsonl(out / "submission" / f"{task.name}.jsonl", task.submit(examples, preds))
    return results


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
