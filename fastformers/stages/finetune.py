"""Stage `finetune`: trains the teacher on the task (AdamW, linear warm-up/decay, clipping,
best checkpoint on the task's official score) and saves it in the plain `save_pretrained` layout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from transformers import AutoTokenizer

from fastformers.checks import require_number
from fastformers.context import SCORES, StageContext
from fastformers.data.loading import TaskDataModule, texts_of
from fastformers.models.loading import count_parameters, load_model
from fastformers.training.fit import (
    TRAINING_KEYS,
    FineTuneModule,
    check_accelerator,
    check_training,
    drop_checkpoints,
    fit_best,
    resumes,
)

VERSION = 1  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "model"
CACHED = True
DISTRIBUTED = True  # trains: under DDP (hardware=ddp) every rank joins its fit
CONFIG_KEYS = ("task", "teacher", "finetune", *TRAINING_KEYS)
MONITOR = "finetune/val_score"
HEADLINE = SCORES


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ()


def validate(cfg: DictConfig) -> None:
    check_training(cfg, "finetune")
    if not cfg.teacher.pretrained:  # random init: sizes from the spec
        require_number(cfg, "teacher.tokenizer_vocab_size", 1, integer=True)
        require_number(cfg, "teacher.max_position_embeddings", 1, integer=True)
    check_accelerator(cfg.hardware)


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task = ctx.cfg, ctx.task
    train, val = ctx.data.examples(cfg.task.train_split), ctx.data.examples(cfg.finetune.val_split)
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.teacher, task, texts_of(train))
    if not cfg.teacher.pretrained:
        tokenizer = same_tokenizer_as_checkpoint(model, tokenizer, out, cfg)
    opts = cfg.finetune
    module = FineTuneModule(model, task, val, opts)
    data = TaskDataModule(task, tokenizer, train, val, cfg.task.max_seq_length, opts, cfg.seed)
    best_score, epochs, seconds = fit_best(module, data, opts, cfg, out, MONITOR, ctx.logger)
    if task.labels:  # outputs named as the task names its labels, for whoever loads the folder later
        model.config.id2label = {i: str(label) for i, label in enumerate(task.labels)}
        model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    drop_checkpoints(out)  # only now: a failure before this line leaves a resumable training (fit_best)
    return {
        "best_val_score": best_score,
        "epochs_run": epochs,
        "train_seconds": seconds,
        "train_examples": len(train),
        "parameters": count_parameters(model),
    }


def summary(metrics: dict[str, float]) -> list[str]:
    return []  # its scores show on its own line; the run's summary names the final model's (evaluate)


def same_tokenizer_as_checkpoint(model, tokenizer, out: Path, cfg: DictConfig):
    """A random-init teacher's tokenizer is trained on the task, and the tokenizers library breaks ties between
    merges differently from run to run: a resumed fit must read its data with the tokenizer its checkpoint was
    trained with. So the tokenizer is saved before training, and an attempt that resumes reuses it."""
    folder = out / "model"
    if resumes(out, cfg) and (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model.resize_token_embeddings(len(tokenizer))  # the checkpoint then restores the weights
    else:
        tokenizer.save_pretrained(folder)
    return tokenizer
