"""Training, shared by every stage that trains: the Lightning modules (fine-tuning, and distillation with
soft targets and TinyBERT-style intermediate losses), `fit_best` (Trainer, best epoch restored), and
`train_student` (teacher scores, augmentation, then the student trained on them)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from transformers import get_linear_schedule_with_warmup

from fastformers.checks import require_number
from fastformers.data.loading import TaskDataModule, TrainOrder, make_loader
from fastformers.data.tasks import Example, Task
from fastformers.errors import FastformersError, check_stopped
from fastformers.models.loading import (
    example_scores,
    model_inputs,
    predict,
    score_examples,
    task_loss,
)
from fastformers.training import distributed

log = logging.getLogger(__name__)

# What shapes a trained model besides the stage's own block: the seeds, the numeric precision and the DDP layout
# (the global batch is the same on any layout, but the order of float sums is not).
TRAINING_KEYS = ("seed", "data.split_seed", "hardware.train_precision", "hardware.devices", "hardware.num_nodes")
CHECKPOINTS = "checkpoints"  # under a training stage's output folder until the stage's final save
LAST = "last.ckpt"  # ModelCheckpoint's name for the resumable checkpoint


def check_accelerator(hardware: DictConfig) -> None:
    """Training on a GPU that is not there would fail deep inside Lightning: say so before any work."""
    if hardware.accelerator not in ("cpu", "gpu", "auto"):
        raise FastformersError(f"hardware.accelerator={hardware.accelerator!r} must be cpu, gpu or auto")
    if hardware.accelerator == "gpu" and not torch.cuda.is_available():
        raise FastformersError(
            f"hardware.accelerator=gpu ({hardware.name}): torch {torch.__version__} sees no CUDA "
            "device; install a CUDA build of torch on a GPU machine, or run with hardware=cpu"
        )


def check_training(cfg: DictConfig, block: str, epochs: bool = True) -> None:
    """The numbers of a training block (conf/training/default.yaml under `finetune` or `distill`); `epochs=False`
    for the prune stage's re-distillation, which takes its epochs from `pruning.redistill_epochs`."""
    if epochs:
        require_number(cfg, f"{block}.epochs", 1, integer=True)
    for key in ("batch_size", "eval_batch_size", "log_every_n_steps"):
        require_number(cfg, f"{block}.{key}", 1, integer=True)
    require_number(cfg, f"{block}.learning_rate", 0, lo_open=True)
    require_number(cfg, f"{block}.weight_decay", 0)
    require_number(cfg, f"{block}.warmup_ratio", 0, 1, hi_open=True)
    require_number(cfg, f"{block}.max_grad_norm", 0, null="no clipping")
    require_number(cfg, f"{block}.patience", 0, integer=True, null="run all epochs")
    distributed.check_placement(cfg, (block,))


def check_distillation(cfg: DictConfig) -> None:
    """The soft-target settings of `distill` (also the prune stage's re-distillation)."""
    require_number(cfg, "distill.temperature", 0, lo_open=True)
    require_number(cfg, "distill.alpha", 0, 1)
    require_number(cfg, "distill.hidden_weight", 0)
    require_number(cfg, "distill.attention_weight", 0)
    require_number(cfg, "distill.augment", 0, integer=True)
    require_number(cfg, "distill.augment_rate", 0, 1, lo_open=True, hi_open=True)
    layer_map = cfg.distill.layer_map
    if layer_map is not None and not (
        OmegaConf.is_list(layer_map) and all(type(i) is int and i >= 1 for i in layer_map)  # type(): no bools
    ):
        shown = OmegaConf.to_container(layer_map) if OmegaConf.is_config(layer_map) else layer_map
        raise FastformersError(f"distill.layer_map={shown!r} must be a list of teacher layers (1-based) or null")


class FineTuneModule(L.LightningModule):
    """Wraps a transformers classifier; validation computes the task's official metrics."""

    def __init__(self, model, task: Task, val_examples: Sequence[Example], opts: DictConfig):
        super().__init__()
        self.model, self.task, self.val_examples, self.opts = model, task, list(val_examples), opts
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps it: dropout would be off
        self.candidate_scoring = task.labels is None
        self._val_preds: dict[int, int] = {}

    def scores(self, batch) -> torch.Tensor:
        logits = self.model(**model_inputs(batch)).logits
        return example_scores(logits, batch["group_sizes"], self.candidate_scoring)

    def training_step(self, batch, batch_idx):
        loss = task_loss(self.scores(batch), batch)
        self.log("finetune/train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["group_sizes"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val_preds.update(zip(batch["index"].tolist(), self.scores(batch).argmax(dim=1).tolist()))

    def val_metrics(self) -> dict[str, float]:
        """The task's metrics over the whole val set (every rank validates on all of it, shortest first)."""
        preds = [self._val_preds[index] for index in range(len(self.val_examples))]
        self._val_preds = {}
        return self.task.score(self.val_examples, preds)

    def on_validation_epoch_end(self):
        self.log_dict({f"finetune/val_{k}": v for k, v in self.val_metrics().items()})

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


class EpochLine(L.Callback):
    """One line per epoch on the terminal: the epoch, train loss, val score, time so far and what is left; and,
    after every batch, whether a stop signal arrived. Its clock is saved in the checkpoints, so a resumed run
    reports the training time of all its attempts."""

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs, self.started = stage, epochs, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.started -= state_dict["elapsed"]

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        check_stopped()  # a stop signal swallowed inside a library call still stops training here

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        done = trainer.current_epoch + 1
        elapsed = self.elapsed()
        metrics = trainer.callback_metrics
        loss = metrics.get(f"{self.stage}/train_loss_epoch", metrics.get(f"{self.stage}/train_loss"))
        score = metrics.get(f"{self.stage}/val_score")
        parts = [f"{self.stage} epoch {done}/{self.epochs}"]
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        if score is not None:
            parts.append(f"val score {float(score):.4f}")
        parts.append(f"{minutes(elapsed)} elapsed, ETA {minutes(elapsed / done * (self.epochs - done))}")
        line, bar = ", ".join(parts), trainer.progress_bar_callback
        if bar is not None:
            bar.print(line)  # with a bar on screen, above it rather than through it
        else:
            print(line, flush=True)


class EpochSeed(L.Callback):
    """Every epoch starts from seed + epoch: its batch order (TrainOrder) and torch's RNG (dropout). Lightning
    saves no RNG state and does not reach TrainOrder's set_epoch, so without this a resumed epoch would train
    on other batches with other dropout masks than the same epoch of an uninterrupted run."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        order = getattr(trainer.train_dataloader, "batch_sampler", None)
        if isinstance(order, TrainOrder):
            order.set_epoch(trainer.current_epoch)  # the loader draws its batches lazily, after this hook

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        """At the first step rather than the epoch start: creating the epoch's loader iterator draws from torch's
        RNG, before this epoch's start hook in a resumed run and after it in an uninterrupted one."""
        if batch_idx == 0:
            torch.manual_seed(self.seed + trainer.current_epoch)  # every device's generator too


class MovableCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state still works after its folder moved: the state (in last.ckpt) holds
    absolute paths, and a resumed build runs in the failed build's folder under another name, so each path is
    re-rooted by file name into this callback's folder (otherwise Lightning drops the best score)."""

    def load_state_dict(self, state_dict: dict) -> None:
        folder = Path(self.dirpath or ".")

        def moved(path):
            return str(folder / Path(path).name) if path else path

        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = moved(state.get(key))
        state["best_k_models"] = {moved(path): score for path, score in state.get("best_k_models", {}).items()}
        super().load_state_dict(state)


class LastCheckpoint(Checkpoint):
    """`last.ckpt`: what a resumed fit needs (weights, optimizer, LR schedule, loop and callbacks' state), at
    every epoch end; a Checkpoint listed after the best-epoch tracker, so Lightning calls it after that tracker
    and early stopping have updated their state. Not ModelCheckpoint(save_last=True): Lightning 2.6 writes that
    only in a step where it also saved a top-k file. Written beside and renamed, so a kill -9 mid-write keeps
    the previous one."""

    def __init__(self, folder: Path):
        self.path = folder / LAST

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        partial = self.path.with_suffix(".partial")
        trainer.save_checkpoint(partial)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(partial, self.path)


class ResumableEarlyStopping(EarlyStopping):
    """Early stopping that stays stopped across a resume: Lightning does not save `should_stop`, so a run
    resumed from the checkpoint of the epoch that stopped it would otherwise train one more epoch."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.stopped_epoch:
            trainer.should_stop = True


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def show_progress_bar(setting) -> bool:
    """`auto`: a progress bar when stdout is a terminal (a log file gets the per-epoch lines only)."""
    return sys.stdout.isatty() if setting == "auto" else bool(setting)


def fit_best(
    module: L.LightningModule,
    data: L.LightningDataModule,
    opts: DictConfig,
    cfg: DictConfig,
    out: Path,
    monitor: str,
    logger: Logger | None = None,
) -> tuple[float, int, float]:
    """Trains with Lightning, then restores the best epoch's weights into `module`; its metrics go to `logger`
    (the run's, made by the pipeline: this module knows nothing of MLflow, so neither do trained models' keys).

    Returns (best monitored score, epochs run, seconds of all attempts). Resumable: at every epoch end
    `out/checkpoints` gets the best epoch's weights and `last.ckpt` (weights, optimizer, LR schedule, loop and
    callback state); a call whose `out` holds an earlier attempt's last.ckpt continues from it, and one whose
    last.ckpt is at the last epoch only restores the best weights. An exception, SIGTERM or kill -9 mid-epoch
    loses that partial epoch (it is trained again, with the same batches and dropout: EpochSeed). Under DDP the
    other ranks' folders are temporary, so training starts over. The caller removes the checkpoints
    (`drop_checkpoints`) once its final save succeeded, so a failure after training keeps them.
    """
    folder = out / CHECKPOINTS
    resume = resume_point(folder, cfg)
    best = MovableCheckpoint(dirpath=folder, monitor=monitor, mode="max", save_top_k=1, save_weights_only=True)
    line = EpochLine(monitor.split("/", maxsplit=1)[0], opts.epochs)
    callbacks = [best, LastCheckpoint(folder), line, EpochSeed(cfg.seed)]  # last after best: holds its new state
    callbacks += [ResumableEarlyStopping(monitor=monitor, mode="max", patience=opts.patience)] if opts.patience else []
    worker = distributed.is_worker(cfg.hardware)
    trainer = L.Trainer(
        max_epochs=opts.epochs,
        **distributed.trainer_placement(cfg.hardware),
        use_distributed_sampler=False,  # TrainOrder splits the global batches itself; all ranks validate on all
        precision=cfg.hardware.train_precision,
        logger=False if worker or logger is None else logger,
        callbacks=callbacks,
        gradient_clip_val=opts.max_grad_norm,
        num_sanity_val_steps=0,
        log_every_n_steps=opts.log_every_n_steps,
        enable_progress_bar=show_progress_bar(opts.progress_bar),
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if trainer.is_global_zero:  # rank 0 alone restores the best epoch and writes the model
        module.load_state_dict(torch.load(best.best_model_path, weights_only=True)["state_dict"])
    return float(best.best_model_score or 0.0), trainer.current_epoch, line.elapsed()


def resumes(out: Path, cfg: DictConfig) -> bool:
    """Whether `fit_best` will continue an earlier attempt's training in `out` (not under DDP: the other ranks'
    folders are temporary, so they could not follow)."""
    return (out / CHECKPOINTS / LAST).is_file() and distributed.world_size(cfg.hardware) == 1


def resume_point(folder: Path, cfg: DictConfig) -> Path | None:
    """An earlier attempt's last.ckpt to continue from, if any. Anything else left in the folder (no last.ckpt
    yet, or a DDP run) is removed: Lightning would otherwise save beside it under versioned names."""
    if resumes(folder.parent, cfg):
        log.info("resuming from %s", folder / LAST)
        return folder / LAST
    if folder.exists() and not distributed.is_worker(cfg.hardware):
        shutil.rmtree(folder)
    return None


def drop_checkpoints(out: Path) -> None:
    """The last thing a training stage does, after its final save: the cache entry keeps the model only."""
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy against the teacher's softened distribution, scaled by T^2 (Hinton et al.)."""
    valid = torch.isfinite(teacher)  # padded candidates are -inf in both
    targets = F.softmax(teacher / temperature, dim=-1)
    log_probs = F.log_softmax(student / temperature, dim=-1).masked_fill(~valid, 0.0)
    return -(targets * log_probs).sum(dim=-1).mean() * temperature**2


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's mapping: student layer i (1-based) learns from teacher layer i * T / S."""
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over real tokens only; `mask` broadcasts over the trailing dimensions."""
    mask = mask.to(student.dtype)
    squared = (student - teacher) ** 2 * mask
    return squared.sum() / (mask.expand_as(squared).sum().clamp(min=1))


class DistillModule(FineTuneModule):
    """Fine-tuning with a teacher: soft targets from cached scores, optional intermediate losses."""

    def __init__(
        self, student, teacher, task, val_examples, opts: DictConfig, layer_map: list[int], prefix: str = "distill"
    ):
        super().__init__(student, task, val_examples, opts)
        self.prefix = prefix  # metric names: `distill/...`, or `prune/...` when re-distilling a pruned model
        self.teacher = teacher.eval().requires_grad_(False)
        self.layer_map = layer_map
        self.intermediate = opts.method == "task_specific" and (opts.hidden_weight > 0 or opts.attention_weight > 0)
        width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
        widen = self.intermediate and width_s != width_t  # only a used projection: DDP needs every gradient
        self.projection = torch.nn.Linear(width_s, width_t) if widen else torch.nn.Identity()

    def training_step(self, batch, batch_idx):
        opts = self.opts
        outputs = self.model(
            **model_inputs(batch),
            output_hidden_states=self.intermediate,
            output_attentions=self.intermediate and opts.attention_weight > 0,
        )
        scores = example_scores(outputs.logits, batch["group_sizes"], self.candidate_scoring)
        hard = task_loss(scores, batch)
        losses = {"hard": hard}
        if opts.method == "task_specific":
            losses["soft"] = soft_cross_entropy(scores, batch["teacher_scores"], opts.temperature)
            loss = (1 - opts.alpha) * hard + opts.alpha * losses["soft"]
            if self.intermediate:
                hidden, attention = self.intermediate_losses(batch, outputs)
                losses |= {"hidden": hidden, "attention": attention}
                loss = loss + opts.hidden_weight * hidden + opts.attention_weight * attention
        else:
            loss = hard
        size = len(batch["group_sizes"])
        self.log_dict(
            {f"{self.prefix}/train_{k}_loss": v for k, v in losses.items()},
            on_step=False,
            on_epoch=True,
            batch_size=size,
        )
        self.log(f"{self.prefix}/train_loss", loss, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def intermediate_losses(self, batch, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (embeddings + mapped layers, projected to the teacher's width) and attention maps."""
        with torch.no_grad():
            teacher_out = self.teacher(
                **model_inputs(batch), output_hidden_states=True, output_attentions=self.opts.attention_weight > 0
            )
        mask = batch["attention_mask"]
        pairs = [(0, 0)] + [(i + 1, t) for i, t in enumerate(self.layer_map)]
        hidden: torch.Tensor = sum(  # type: ignore[assignment]
            masked_mse(self.projection(outputs.hidden_states[s]), teacher_out.hidden_states[t], mask[..., None])
            for s, t in pairs
        ) / len(pairs)
        attention = hidden.new_zeros(())
        if self.opts.attention_weight > 0:
            pair_mask = (mask[:, None, :, None] * mask[:, None, None, :]).to(hidden.dtype)
            for s, t in enumerate(self.layer_map):
                student_att, teacher_att = outputs.attentions[s], teacher_out.attentions[t - 1]
                if student_att.shape[1] != teacher_att.shape[1]:  # different head counts: compare head means
                    student_att, teacher_att = student_att.mean(1, keepdim=True), teacher_att.mean(1, keepdim=True)
                attention = attention + masked_mse(student_att, teacher_att, pair_mask)
            attention = attention / len(self.layer_map)
        return torch.as_tensor(hidden), attention

    def trained_parameters(self):
        return super().trained_parameters() + [(f"projection.{n}", p) for n, p in self.projection.named_parameters()]

    def on_validation_epoch_end(self):
        self.log_dict({f"{self.prefix}/val_{k}": v for k, v in self.val_metrics().items()})

    def state_dict(self, *args, **kwargs):
        """Checkpoints hold the student (and projection) only; the frozen teacher is never saved."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def augmented(examples: list[Example], copies: int, rate: float, seed: int) -> list[Example]:
    """TinyBERT's augmentation without its masked LM: `copies` perturbed versions of every example, each word
    dropped or swapped for a random word of the training text with probability `rate`. They carry no label:
    the teacher's scores are their only target, so a small task shows the student more of the teacher."""
    rng = random.Random(seed)
    vocabulary = sorted({w for e in examples for pair in e.pairs for text in pair if text for w in text.split()})

    def perturb(text: str) -> str:
        if not text:
            return text
        kept = []
        for word in text.split():
            draw = rng.random()
            if draw >= rate:
                kept.append(word)
            elif draw >= rate / 2:
                kept.append(rng.choice(vocabulary))
        return " ".join(kept) or text

    return [
        Example(
            f"{e.uid}#aug{k}",
            [(perturb(a), perturb(b) if b is not None else None) for a, b in e.pairs],
            meta=dict(e.meta),
        )
        for k in range(copies)
        for e in examples
    ]


def predictions(model, tokenizer, task: Task, examples, max_length: int, batch_size: int) -> list[int]:
    return predict(model, make_loader(examples, tokenizer, task, max_length, batch_size))


def agreement(preds: list[int], others: list[int]) -> float:
    return sum(a == b for a, b in zip(preds, others, strict=True)) / len(preds)


def attach_teacher_scores(teacher, tokenizer, task: Task, examples, max_length: int, batch_size: int) -> None:
    loader = make_loader(examples, tokenizer, task, max_length, batch_size)
    for example, scores in zip(examples, score_examples(teacher, loader), strict=True):
        example.teacher_scores = scores


def train_student(
    student,
    tokenizer,
    teacher,
    teacher_tokenizer,
    task: Task,
    train,
    val,
    layer_map: list[int],
    opts: DictConfig,
    cfg: DictConfig,
    out: Path,
    prefix: str = "distill",
    logger: Logger | None = None,
) -> tuple[float, int, float, int]:
    """The training both distillations share (this stage's, and the prune stage's from the unpruned model): the
    teacher scores the train set and its augmented copies once, then Lightning trains the student on them.
    Returns (best val score, epochs run, seconds, training examples with the copies); metrics go to `prefix/`."""
    if opts.method == "task_specific":
        train = train + augmented(train, opts.augment, opts.augment_rate, cfg.seed)
        attach_teacher_scores(teacher, teacher_tokenizer, task, train, cfg.task.max_seq_length, opts.eval_batch_size)
    module = DistillModule(student, teacher, task, val, opts, layer_map, prefix)
    data = TaskDataModule(task, tokenizer, train, val, cfg.task.max_seq_length, opts, cfg.seed)
    score, epochs, seconds = fit_best(module, data, opts, cfg, out, f"{prefix}/val_score", logger)
    return score, epochs, seconds, len(train)
