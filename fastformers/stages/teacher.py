"""Stage `teacher`: your own fine-tuned classifier (`teacher.pretrained`, a folder saved with save_pretrained) as
the run's teacher, as it is: nothing is trained. Its outputs are checked against the task's labels (the names in
its config.id2label, in the task's order; generic LABEL_0, LABEL_1, ... names are accepted when the count matches),
its score on the val split is measured, and it is saved into the cache the way the finetune stage saves a model,
so distill, prune, export, benchmark and evaluate read it unchanged.

A run whose stages start with one that needs a model and make none before it (e.g. stages=[distill,evaluate])
gets this stage put in front when teacher.pretrained is set (pipeline.validate); its cache entry is keyed by the
folder's content hash (teacher.sha256), so a changed model is taken afresh."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from fastformers.context import SCORES, StageContext
from fastformers.data.loading import hash_file, split_label
from fastformers.data.tasks import Task
from fastformers.errors import FastformersError
from fastformers.models.loading import check_family, count_parameters, load_finetuned, resolve_pretrained
from fastformers.training.fit import predictions

log = logging.getLogger(__name__)

VERSION = 1  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "model"
CACHED = True
DISTRIBUTED = False  # trains nothing
CONFIG_KEYS = ("task", "teacher", "finetune.val_split", "finetune.eval_batch_size", "data.split_seed")
HEADLINE = SCORES
HEAD = "ForSequenceClassification"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ()


def folder_of(cfg: DictConfig) -> Path:
    """The local folder `teacher.pretrained` names (package:<module>/<subdir> resolved)."""
    pretrained = cfg.teacher.pretrained
    if not pretrained:
        raise FastformersError(
            "stage 'teacher' starts from your own fine-tuned model: set teacher.pretrained=/path/to/folder "
            "(saved with save_pretrained)"
        )
    path = Path(resolve_pretrained(str(pretrained)))
    if not path.is_dir():
        raise FastformersError(
            f"teacher.pretrained={pretrained!r} is not a local folder: without a finetune stage the teacher is "
            "your own fine-tuned model, saved with save_pretrained (to fine-tune a model, add finetune to stages)"
        )
    if not (path / "config.json").is_file():
        raise FastformersError(f"teacher.pretrained={pretrained!r}: {path} has no config.json (not a saved model)")
    return path


def validate(cfg: DictConfig) -> None:
    """Also records the folder's content hash as `teacher.sha256`: it keys this stage's cache entry (a changed
    model is taken afresh) and shows in MLflow's params."""
    path = folder_of(cfg)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise FastformersError(f"{path / 'config.json'}: cannot be read ({err})") from None
    architectures = config.get("architectures") or []
    if not any(str(name).endswith(HEAD) for name in architectures):
        held = ", ".join(map(str, architectures)) or "a model of unknown architecture"
        raise FastformersError(
            f"teacher.pretrained={cfg.teacher.pretrained!r} holds {held}, not a fine-tuned sequence classifier "
            f"(*{HEAD}): fine-tune it first, e.g. stages=[finetune,{','.join(s for s in cfg.stages if s != 'teacher')}]"
        )
    check_family(cfg.teacher, str(config.get("model_type")))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FastformersError(
            f"teacher.pretrained={cfg.teacher.pretrained!r}: {path} has no tokenizer; save it beside the model "
            "(tokenizer.save_pretrained(folder))"
        )
    with open_dict(cfg.teacher):
        cfg.teacher.sha256 = folder_hash(path)


def folder_hash(path: Path) -> str:
    """Content hash of every file under a model folder (names and bytes), for the teacher stage's cache key."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        hash_file(digest, file)
    return digest.hexdigest()[:16]


def check_labels(config, task: Task, where: str) -> None:
    """The model's outputs are the task's: as many, and named as the task names its labels, in the same order
    (generic LABEL_<i> names are taken as the task's labels in order, and a log line says so)."""
    count = int(config.num_labels)
    id2label = {int(i): str(name) for i, name in (config.id2label or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(count)]
    wanted = [str(label) for label in task.labels] if task.labels else None
    if count != task.num_labels:
        expected = f"{task.num_labels} labels {wanted}" if wanted else "one score per candidate"
        raise FastformersError(f"{where}: the model has {count} outputs {names} but task {task.name} has {expected}")
    if wanted is None:
        return
    if names == [f"LABEL_{i}" for i in range(count)]:
        log.info(
            "%s: generic output names LABEL_0..LABEL_%d: output i is taken as task label i (%s)",
            where,
            count - 1,
            ", ".join(f"{n}={w}" for n, w in zip(names, wanted)),
        )
        return
    if [n.lower() for n in names] == [w.lower() for w in wanted]:
        return
    if sorted(n.lower() for n in names) == sorted(w.lower() for w in wanted):
        raise FastformersError(
            f"{where}: the model's outputs name the task's labels in another order ({names}, the task's: {wanted}); "
            f"list them in the model's order: task.labels=[{','.join(names)}]"
        )
    raise FastformersError(f"{where}: the model's outputs are named {names} but task {task.name}'s labels are {wanted}")


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task, path = ctx.cfg, ctx.task, folder_of(ctx.cfg)
    model, tokenizer = load_finetuned(path)
    check_labels(model.config, task, f"teacher.pretrained={cfg.teacher.pretrained}")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    spec = cfg.finetune.val_split
    val = ctx.data.examples(spec)
    results: dict[str, float] = {"parameters": count_parameters(model), "outputs": task.num_labels}
    if any(e.label is not None for e in val):
        preds = predictions(model, tokenizer, task, val, cfg.task.max_seq_length, cfg.finetune.eval_batch_size)
        results |= {f"{split_label(spec)}/{k}": v for k, v in task.score(val, preds).items()}
    return results


def summary(metrics: dict[str, float]) -> list[str]:
    return []  # its scores show on its own line; the run's summary names the final model's (evaluate)
