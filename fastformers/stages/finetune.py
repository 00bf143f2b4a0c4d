"""Stage `finetune`: trains the teacher on the task (AdamW, linear warm-up/decay, clipping,
best checkpoint on the task's official score) and saves it in the plain `save_pretrained` layout."""
from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig
from transformers import get_linear_schedule_with_warmup

from fastformers import tracking
from fastformers.data import TaskDataModule, load_examples, texts_of
from fastformers.errors import FastformersError
from fastformers.models import count_parameters, example_scores, load_model, model_inputs, task_loss
from fastformers.tasks import Example, Task, get_task

VERSION = 1  # bump when a code change alters what this stage writes: it invalidates cached entries
PROVIDES = "model"
USES: tuple[str, ...] = ()
CONFIG_KEYS = ("task", "teacher", "finetune", "seed", "data.split_seed")
MONITOR = "finetune/val_score"


def validate(cfg: DictConfig) -> None:
    opts = cfg.finetune
    for name in ("epochs", "batch_size", "learning_rate"):
        if not opts[name] or opts[name] <= 0:
            raise FastformersError(f"finetune.{name}={opts[name]!r} must be positive")
    if not 0 <= opts.warmup_ratio < 1:
        raise FastformersError(f"finetune.warmup_ratio={opts.warmup_ratio!r} must be in [0, 1)")
    check_accelerator(cfg.hardware)


def check_accelerator(hardware: DictConfig) -> None:
    """Training on a GPU that is not there would fail deep inside Lightning: say so before any work."""
    if hardware.accelerator not in ("cpu", "gpu", "auto"):
        raise FastformersError(f"hardware.accelerator={hardware.accelerator!r} must be cpu, gpu or auto")
    if hardware.accelerator == "gpu" and not torch.cuda.is_available():
        raise FastformersError(f"hardware.accelerator=gpu ({hardware.name}): torch {torch.__version__} sees no CUDA "
                               "device; install a CUDA build of torch on a GPU machine, or run with hardware=cpu")


class FineTuneModule(L.LightningModule):
    """Wraps a transformers classifier; validation computes the task's official metrics."""

    def __init__(self, model, task: Task, val_examples: Sequence[Example], opts: DictConfig):
        super().__init__()
        self.model, self.task, self.val_examples, self.opts = model, task, list(val_examples), opts
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps it: dropout would be off
        self.candidate_scoring = task.labels is None
        self._val_preds: list[int] = []

    def scores(self, batch) -> torch.Tensor:
        logits = self.model(**model_inputs(batch)).logits
        return example_scores(logits, batch["group_sizes"], self.candidate_scoring)

    def training_step(self, batch, batch_idx):
        loss = task_loss(self.scores(batch), batch)
        self.log("finetune/train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["group_sizes"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val_preds.extend(self.scores(batch).argmax(dim=1).tolist())

    def on_validation_epoch_end(self):
        metrics = self.task.score(self.val_examples, self._val_preds)
        self._val_preds = []
        self.log_dict({f"finetune/val_{k}": v for k, v in metrics.items()})

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the optimizer updates; subclasses add their own heads (e.g. a distillation projection)."""
        return list(self.model.named_parameters())

    def configure_optimizers(self):
        no_decay = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight")
        named = self.trained_parameters()
        params = [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": self.opts.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(params, lr=self.opts.learning_rate)
        total = self.trainer.estimated_stepping_batches
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.opts.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit_best(module: L.LightningModule, data: L.LightningDataModule, opts: DictConfig, cfg: DictConfig, out: Path,
             monitor: str) -> tuple[float, int, float]:
    """Trains with Lightning, then restores the best epoch's weights into `module`.

    Returns (best monitored score, epochs run, seconds). Checkpoints live in `out/checkpoints` only while
    training: the caller saves the model in save_pretrained form.
    """
    best = ModelCheckpoint(dirpath=out / "checkpoints", monitor=monitor, mode="max", save_top_k=1,
                           save_weights_only=True)
    callbacks = [best] + ([EarlyStopping(monitor=monitor, mode="max", patience=opts.patience)] if opts.patience else [])
    trainer = L.Trainer(
        max_epochs=opts.epochs, accelerator=cfg.hardware.accelerator, devices=1,
        precision=cfg.hardware.train_precision, logger=tracking.lightning_logger(cfg),
        callbacks=callbacks, gradient_clip_val=opts.max_grad_norm, num_sanity_val_steps=0,
        log_every_n_steps=opts.log_every_n_steps, enable_progress_bar=opts.progress_bar,
        enable_model_summary=False, default_root_dir=str(out),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    module.load_state_dict(torch.load(best.best_model_path, weights_only=True)["state_dict"])
    shutil.rmtree(out / "checkpoints")
    return float(best.best_model_score), trainer.current_epoch, seconds


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task = get_task(cfg.task.name)
    read = dict(root=cfg.data.root, split_seed=cfg.data.split_seed, download=cfg.data.download)
    train = load_examples(task, spec=cfg.task.train_split, **read)
    val = load_examples(task, spec=cfg.finetune.val_split, **read)
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.teacher, task, texts_of(train))
    opts = cfg.finetune
    module = FineTuneModule(model, task, val, opts)
    data = TaskDataModule(task, tokenizer, train, val, cfg.task.max_seq_length, opts.batch_size,
                          opts.eval_batch_size, cfg.seed)
    best_score, epochs, seconds = fit_best(module, data, opts, cfg, out, MONITOR)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {
        "best_val_score": best_score,
        "epochs_run": epochs,
        "train_seconds": seconds,
        "train_examples": len(train),
        "parameters": count_parameters(model),
    }

