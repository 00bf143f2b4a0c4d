"""Stage `finetune`: trains the teacher on the task (AdamW, linear warm-up/decay, clipping,
best checkpoint on the task's official score) and saves it in the plain `save_pretrained` layout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from fastformers.checks import require_number
from fastformers.data import TaskDataModule, load_examples, texts_of
from fastformers.models import count_parameters, load_model
from fastformers.tasks import task_of
from fastformers.training import TRAINING_KEYS, FineTuneModule, check_accelerator, check_training, fit_best

VERSION = 1  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "model"
CACHED = True
DISTRIBUTED = True  # trains: under DDP (hardware=ddp) every rank joins its fit
CONFIG_KEYS = ("task", "teacher", "finetune", *TRAINING_KEYS)
MONITOR = "finetune/val_score"


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ()


def validate(cfg: DictConfig) -> None:
    check_training(cfg, "finetune")
    if not cfg.teacher.pretrained:  # random init: sizes from the spec
        require_number(cfg, "teacher.tokenizer_vocab_size", 1, integer=True)
        require_number(cfg, "teacher.max_position_embeddings", 1, integer=True)
    check_accelerator(cfg.hardware)


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task = task_of(cfg)
    read = dict(root=cfg.data.root, split_seed=cfg.data.split_seed, download=cfg.data.download)
    train = load_examples(task, spec=cfg.task.train_split, **read)
    val = load_examples(task, spec=cfg.finetune.val_split, **read)
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.teacher, task, texts_of(train))
    opts = cfg.finetune
    module = FineTuneModule(model, task, val, opts)
    data = TaskDataModule(task, tokenizer, train, val, cfg.task.max_seq_length, opts, cfg.seed)
    best_score, epochs, seconds = fit_best(module, data, opts, cfg, out, MONITOR)
    if task.labels:  # outputs named as the task names its labels, for whoever loads the folder later
        model.config.id2label = {i: str(label) for i, label in enumerate(task.labels)}
        model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {
        "best_val_score": best_score,
        "epochs_run": epochs,
        "train_seconds": seconds,
        "train_examples": len(train),
        "parameters": count_parameters(model),
    }
