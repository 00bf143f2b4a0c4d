"""Stage `prune`: structured pruning of attention heads and FFN neurons, then re-distillation.

1. Importance (Michel et al., 2019, as FastFormers uses it): a mask of ones multiplies every head's context
   vector and every FFN neuron's activation, through forward pre-hooks on the two output projections
   (transformers 5 has no head_mask); |d loss / d mask| is summed over a labelled slice of examples.
2. Selection keeps the same number of heads and neurons in every layer, so fused kernels stay uniform;
   which ones are kept differs per layer.
3. Rewiring slices Q/K/V, the attention output and both FFN projections: fewer parameters and FLOPs.
4. Re-distillation: the pruned model learns from the unpruned one with the distill stage's module.
The mechanics (1-3) live in fastformers/models/pruning.py, the training (4) in fastformers/training/fit.py.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import cast

import lightning as L
from omegaconf import DictConfig, OmegaConf

from fastformers.checks import require_number
from fastformers.context import SCORES, StageContext
from fastformers.data.loading import parse_split
from fastformers.data.tasks import Task
from fastformers.errors import FastformersError
from fastformers.models.hub import save_pruned
from fastformers.models.loading import (
    count_parameters,
    example_scores,
    load_finetuned,
    model_inputs,
    task_loss,
)
from fastformers.models.pruning import (
    importance,
    kept_count,
    normalized,
    rewire,
    top_per_layer,
)
from fastformers.training.fit import (
    TRAINING_KEYS,
    check_distillation,
    check_training,
    drop_checkpoints,
    predictions,
    train_student,
)

VERSION = 1  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "model"
CACHED = True
DISTRIBUTED = True  # trains: under DDP (hardware=ddp) every rank joins its fit
CONFIG_KEYS = ("task", "pruning", "distill", *TRAINING_KEYS)
NORMALIZATIONS = ("none", "layer")
HEADLINE = SCORES


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ("model",)


def validate(cfg: DictConfig) -> None:
    opts = cfg.pruning  # pruning.heads and pruning.ffn: checked by pipeline.validate, whatever the stages
    if opts.normalize not in NORMALIZATIONS:
        raise FastformersError(f"pruning.normalize={opts.normalize!r} must be one of {list(NORMALIZATIONS)}")
    require_number(cfg, "pruning.importance_examples", 1, integer=True, null="all of importance_split")
    require_number(cfg, "pruning.importance_batch_size", 1, integer=True)
    require_number(cfg, "pruning.redistill_epochs", 0, integer=True, meaning="0 = no re-distillation")
    if opts.redistill_epochs:  # re-distillation trains with the distill stage's settings
        check_training(cfg, "distill", epochs=False)
        check_distillation(cfg)
    parse_split(opts.importance_split)


def val_score(model, tokenizer, task: Task, examples, cfg: DictConfig) -> float:
    preds = predictions(model, tokenizer, task, examples, cfg.task.max_seq_length, cfg.distill.eval_batch_size)
    return task.score(examples, preds)["score"]


def redistill(pruned, teacher, tokenizer, train, val, ctx: StageContext, out: Path) -> tuple[float, float]:
    """The distill stage's soft-target training (and its intermediate losses, if on), layer to layer,
    with the unpruned model as teacher; returns (best val score, seconds)."""
    cfg = ctx.cfg
    opts = cast(
        DictConfig, OmegaConf.merge(cfg.distill, {"epochs": cfg.pruning.redistill_epochs, "method": "task_specific"})
    )
    layer_map = list(range(1, pruned.config.num_hidden_layers + 1))
    score, _, seconds, _ = train_student(
        pruned, tokenizer, teacher, tokenizer, ctx.task, train, val, layer_map, opts, cfg, out, "prune", ctx.logger
    )
    return score, seconds


def source_name(cfg: DictConfig) -> str:
    """What the pruned model was made from, for its model card: the teacher, or the student distilled from it."""
    teacher = cfg.teacher.pretrained or f"{cfg.teacher.name} (random init)"
    if "distill" in cfg.stages and cfg.student.name != "none":
        return f"student {cfg.student.name} distilled from {teacher}, fine-tuned on {cfg.task.name}"
    return f"{teacher} fine-tuned on {cfg.task.name}"


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task, opts = ctx.cfg, ctx.task, ctx.cfg.pruning
    sample = ctx.data.examples(opts.importance_split)[: opts.importance_examples]
    if not any(e.label is not None for e in sample):
        raise FastformersError(
            f"pruning.importance_split={opts.importance_split!r} has no labels: importance "
            "needs the task loss, pick a labelled split such as train"
        )
    val = ctx.data.examples(cfg.distill.val_split)
    model, tokenizer = load_finetuned(inputs["model"] / "model")
    score_before = val_score(model, tokenizer, task, val, cfg)
    params_before = count_parameters(model)

    started = time.perf_counter()
    loader = ctx.data.loader(sample, tokenizer, opts.importance_batch_size)

    def loss_of(batch):
        scores = example_scores(
            model(**model_inputs(batch)).logits, batch["group_sizes"], loader.collate_fn.candidate_scoring
        )
        return task_loss(scores, batch)

    head_scores, ffn_scores = (normalized(s, opts.normalize) for s in importance(model, loader, loss_of))
    importance_seconds = time.perf_counter() - started
    heads = top_per_layer(head_scores, kept_count(head_scores.shape[1], opts.heads))
    neurons = top_per_layer(ffn_scores, kept_count(ffn_scores.shape[1], opts.ffn))
    (out / "importance.json").write_text(
        json.dumps(
            {
                "examples": len(sample),
                "split": opts.importance_split,
                "normalize": opts.normalize,
                "head_scores": head_scores.tolist(),
                "ffn_scores": ffn_scores.tolist(),
                "kept_heads": heads,
                "kept_ffn_neurons": neurons,
            }
        )
    )

    pruned_anything = len(heads[0]) < head_scores.shape[1] or len(neurons[0]) < ffn_scores.shape[1]
    teacher = copy.deepcopy(model)
    rewire(model, heads, neurons)
    score_pruned = val_score(model, tokenizer, task, val, cfg) if pruned_anything else score_before
    score_final, redistill_seconds = score_pruned, 0.0
    if pruned_anything and opts.redistill_epochs > 0:
        L.seed_everything(cfg.seed, workers=True)
        train = ctx.data.examples(cfg.task.train_split)
        score_final, redistill_seconds = redistill(model, teacher, tokenizer, train, val, ctx, out)
    save_pruned(model, tokenizer, out / "model", source_name(cfg), params_before)
    params_after = count_parameters(model)
    drop_checkpoints(out)  # only now: a failure before this line leaves a resumable re-distillation (fit_best)
    return {
        "heads_kept": len(heads[0]),
        "heads_before": head_scores.shape[1],
        "ffn_neurons_kept": len(neurons[0]),
        "ffn_neurons_before": ffn_scores.shape[1],
        "parameters_before": params_before,
        "parameters": params_after,
        "parameters_removed_share": 1 - params_after / params_before,
        "val_score_before_pruning": score_before,
        "val_score_after_pruning": score_pruned,
        "best_val_score": score_final,
        "delta_to_unpruned": score_final - score_before,
        "importance_examples": len(sample),
        "importance_seconds": importance_seconds,
        "redistill_seconds": redistill_seconds,
    }


def summary(metrics: dict[str, float]) -> list[str]:
    return []  # its scores show on its own line; the run's summary names the final model's (evaluate)
