"""Stage `prune`: structured pruning of attention heads and FFN neurons, then re-distillation.

1. Importance (Michel et al., 2019, as FastFormers uses it): a mask of ones multiplies every head's context
   vector and every FFN neuron's activation, through forward pre-hooks on the two output projections
   (transformers 5 has no head_mask); |d loss / d mask| is summed over a labelled slice of examples.
2. Selection keeps the same number of heads and neurons in every layer, so fused kernels stay uniform;
   which ones are kept differs per layer.
3. Rewiring slices Q/K/V, the attention output and both FFN projections: fewer parameters and FLOPs.
4. Re-distillation: the pruned model learns from the unpruned one with the distill stage's module.
"""
from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fastformers.data import load_examples, make_loader, parse_split
from fastformers.errors import FastformersError
from fastformers.models import (
    HEADS_KEPT,
    count_parameters,
    encoder_layers,
    example_scores,
    keep_attention_heads,
    keep_ffn_neurons,
    load_finetuned,
    model_inputs,
    task_loss,
)
from fastformers.stages.distill import predictions, train_student
from fastformers.tasks import Task, get_task

VERSION = 1  # bump when a code change alters what this stage writes
PROVIDES = "model"
USES = ("model",)
CONFIG_KEYS = ("task", "pruning", "distill", "seed", "data.split_seed")
NORMALIZATIONS = ("none", "layer")
PRUNING_RECORD = "fastformers_pruning"  # config.json key: what was kept, for the reader of a saved model


def validate(cfg: DictConfig) -> None:
    opts = cfg.pruning
    for axis, what in (("heads", "attention heads"), ("ffn", "FFN neurons")):
        if opts[axis] is None or not 0 < opts[axis] <= 1:
            raise FastformersError(f"pruning.{axis}={opts[axis]!r} is the fraction of {what} KEPT in every layer: "
                                   "it must be in (0, 1]")
    if opts.normalize not in NORMALIZATIONS:
        raise FastformersError(f"pruning.normalize={opts.normalize!r} must be one of {list(NORMALIZATIONS)}")
    if opts.importance_examples is not None and opts.importance_examples <= 0:
        raise FastformersError(f"pruning.importance_examples={opts.importance_examples!r} must be positive or null")
    if opts.redistill_epochs < 0:
        raise FastformersError(f"pruning.redistill_epochs={opts.redistill_epochs!r} must be >= 0 "
                               "(0 = no re-distillation)")
    parse_split(opts.importance_split)


def kept_count(total: int, fraction: float) -> int:
    return max(1, round(total * fraction))


def _scale_heads(mask: torch.Tensor, head_size: int, module, args):
    context = args[0]
    return ((context.unflatten(-1, (-1, head_size)) * mask[:, None]).flatten(-2),) + args[1:]


def _scale_neurons(mask: torch.Tensor, module, args):
    return (args[0] * mask,) + args[1:]


@contextmanager
def masks_applied(model, heads: torch.Tensor, ffn: torch.Tensor):
    """Multiplies head h of layer l by heads[l, h] and FFN neuron n by ffn[l, n] while the context is open."""
    handles = []
    for i, layer in enumerate(encoder_layers(model)):
        size = layer.attention.self.attention_head_size
        handles.append(layer.attention.output.dense.register_forward_pre_hook(partial(_scale_heads, heads[i], size)))
        handles.append(layer.output.dense.register_forward_pre_hook(partial(_scale_neurons, ffn[i])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_shapes(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """([layers, heads], [layers, FFN neurons]) of the model as it is now (uniform across layers)."""
    layers = encoder_layers(model)
    first = layers[0]
    return (len(layers), first.attention.self.num_attention_heads), (len(layers), first.intermediate.dense.out_features)


def importance(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over batches of |d loss / d mask| for every head [L, H] and every FFN neuron [L, I]."""
    head_shape, ffn_shape = mask_shapes(model)
    heads, ffn = torch.ones(head_shape, requires_grad=True), torch.ones(ffn_shape, requires_grad=True)
    head_scores, ffn_scores = torch.zeros(head_shape), torch.zeros(ffn_shape)
    candidate_scoring = loader.collate_fn.candidate_scoring
    frozen = [p for p in model.parameters() if p.requires_grad]  # only the masks need gradients
    model.eval()
    try:
        for param in frozen:
            param.requires_grad_(False)
        with masks_applied(model, heads, ffn):
            for batch in loader:
                logits = model(**model_inputs(batch)).logits
                loss = task_loss(example_scores(logits, batch["group_sizes"], candidate_scoring), batch)
                head_grad, ffn_grad = torch.autograd.grad(loss, (heads, ffn), allow_unused=True)
                head_scores += head_grad.abs() if head_grad is not None else 0
                ffn_scores += ffn_grad.abs() if ffn_grad is not None else 0
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return head_scores, ffn_scores


def normalized(scores: torch.Tensor, how: str) -> torch.Tensor:
    """`layer`: each layer's scores divided by their L2 norm (Michel et al.), comparable across layers."""
    return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-12) if how == "layer" else scores


def top_per_layer(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The k highest-scoring indices of every layer, in their original order."""
    return [sorted(row.topk(k).indices.tolist()) for row in scores]


def rewire(model, heads: list[list[int]], neurons: list[list[int]]) -> None:
    """Removes every head and neuron not listed, and records the new shapes in the config so that
    models.load_finetuned rebuilds them."""
    (_, head_count), (_, ffn_count) = mask_shapes(model)
    for layer, layer_heads, layer_neurons in zip(encoder_layers(model), heads, neurons, strict=True):
        if len(layer_heads) < head_count:
            keep_attention_heads(layer.attention, layer_heads)
        if len(layer_neurons) < ffn_count:
            keep_ffn_neurons(layer, layer_neurons)
    config = model.config
    if len(heads[0]) < head_count:
        setattr(config, HEADS_KEPT, len(heads[0]))  # num_attention_heads stays: it sets the head size
    config.intermediate_size = len(neurons[0])
    setattr(config, PRUNING_RECORD, {"kept_heads": heads, "ffn_neurons_kept": len(neurons[0]),
                                     "heads_before": head_count, "ffn_neurons_before": ffn_count})


def val_score(model, tokenizer, task: Task, examples, cfg: DictConfig) -> float:
    preds = predictions(model, tokenizer, task, examples, cfg.task.max_seq_length, cfg.distill.eval_batch_size)
    return task.score(examples, preds)["score"]


def redistill(pruned, teacher, tokenizer, task: Task, train, val, cfg: DictConfig, out: Path) -> tuple[float, float]:
    """The distill stage's soft-target training (and its intermediate losses, if on), layer to layer,
    with the unpruned model as teacher; returns (best val score, seconds)."""
    opts = OmegaConf.merge(cfg.distill, {"epochs": cfg.pruning.redistill_epochs, "method": "task_specific"})
    layer_map = list(range(1, pruned.config.num_hidden_layers + 1))
    score, _, seconds, _ = train_student(pruned, tokenizer, teacher, tokenizer, task, train, val, layer_map, opts,
                                         cfg, out, prefix="prune")
    return score, seconds


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task, opts = get_task(cfg.task.name), cfg.pruning
    read = dict(root=cfg.data.root, split_seed=cfg.data.split_seed, download=cfg.data.download)
    sample = load_examples(task, spec=opts.importance_split, **read)[: opts.importance_examples]
    if not any(e.label is not None for e in sample):
        raise FastformersError(f"pruning.importance_split={opts.importance_split!r} has no labels: importance "
                               "needs the task loss, pick a labelled split such as train")
    val = load_examples(task, spec=cfg.distill.val_split, **read)
    model, tokenizer = load_finetuned(inputs["model"] / "model")
    score_before = val_score(model, tokenizer, task, val, cfg)
    params_before = count_parameters(model)

    started = time.perf_counter()
    loader = make_loader(sample, tokenizer, task, cfg.task.max_seq_length, opts.importance_batch_size)
    head_scores, ffn_scores = (normalized(s, opts.normalize) for s in importance(model, loader))
    importance_seconds = time.perf_counter() - started
    heads = top_per_layer(head_scores, kept_count(head_scores.shape[1], opts.heads))
    neurons = top_per_layer(ffn_scores, kept_count(ffn_scores.shape[1], opts.ffn))
    (out / "importance.json").write_text(json.dumps({
        "examples": len(sample), "split": opts.importance_split, "normalize": opts.normalize,
        "head_scores": head_scores.tolist(), "ffn_scores": ffn_scores.tolist(),
        "kept_heads": heads, "kept_ffn_neurons": neurons}))

    pruned_anything = len(heads[0]) < head_scores.shape[1] or len(neurons[0]) < ffn_scores.shape[1]
    teacher = copy.deepcopy(model)
    rewire(model, heads, neurons)
    score_pruned = val_score(model, tokenizer, task, val, cfg) if pruned_anything else score_before
    score_final, redistill_seconds = score_pruned, 0.0
    if pruned_anything and opts.redistill_epochs > 0:
        L.seed_everything(cfg.seed, workers=True)
        train = load_examples(task, spec=cfg.task.train_split, **read)
        score_final, redistill_seconds = redistill(model, teacher, tokenizer, task, train, val, cfg, out)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    params_after = count_parameters(model)
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
