"""Structured pruning mechanics: first-order importance of attention heads and FFN neurons (Michel et al.,
2019: a mask of ones scales every head's context vector and every FFN neuron's activation through forward
pre-hooks, and |d loss / d mask| is summed over a labelled slice), the same number kept in every layer, and the
model rewired physically smaller. Where each family keeps its layers, heads and FFN, and the slicing itself, are
in modeling_fastformers.py (the file a pruned folder ships for transformers); `models.load_finetuned` rebuilds a
pruned model's shapes from its config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from fastformers.errors import FastformersError
from fastformers.models.modeling_fastformers import (
    HEADS_KEPT,
    LAYER_FFN,
    LAYER_HEADS,
    LAYOUTS,
    Layout,
    head_count,
    head_size,
    keep_heads,
    keep_neurons,
    layout_of,
    part,
)

PRUNING_RECORD = "fastformers_pruning"  # config.json key: what was kept, for the reader of a saved model


def family_layout(model) -> Layout:
    """The model's row of the family table (modeling_fastformers.LAYOUTS); any other family is refused."""
    try:
        return layout_of(model)
    except KeyError as err:
        raise FastformersError(f"model type {err.args[0]!r} is not supported; use one of {sorted(LAYOUTS)}") from None


def encoder_layers(model) -> Any:
    """The transformer blocks of a classifier of a supported family (typed Any: attribute access on its modules
    is what the callers do, which torch's stubs cannot check)."""
    return part(model.base_model, family_layout(model).layers)


def keep_attention_heads(layer, heads: list[int]) -> None:
    """Slices one block's Q, K, V rows and attention output columns down to `heads` (indices into its current
    heads); the head size, hence the attention scaling, is unchanged."""
    keep_heads(layer, heads)


def keep_ffn_neurons(layer, neurons: list[int]) -> None:
    """Slices one block's FFN first projection rows and second projection columns down to `neurons`."""
    keep_neurons(layer, neurons)


def attention_shape(model) -> tuple[int, int]:
    """(heads, total head width) of the first layer's attention: what the ONNX optimizer is told (pruning
    narrows it, so it cannot be inferred from hidden_size)."""
    first = encoder_layers(model)[0]
    return head_count(first), head_count(first) * head_size(first)


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
    handles, layout = [], family_layout(model)
    for i, layer in enumerate(encoder_layers(model)):
        scale_heads = partial(_scale_heads, heads[i], head_size(layer))
        handles.append(part(layer, layout.attention_output).register_forward_pre_hook(scale_heads))
        handles.append(part(layer, layout.ffn_out).register_forward_pre_hook(partial(_scale_neurons, ffn[i])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_shapes(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """([layers, heads], [layers, FFN neurons]) of the model as it is now (uniform across layers)."""
    layers = encoder_layers(model)
    ffn = part(layers[0], family_layout(model).ffn_in).out_features
    return (len(layers), head_count(layers[0])), (len(layers), ffn)


def importance(model, batches: Iterable, loss_of: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over batches of |d loss / d mask| for every head [L, H] and every FFN neuron [L, I]; `loss_of(batch)`
    runs the model on a batch and returns the task loss."""
    head_shape, ffn_shape = mask_shapes(model)
    heads, ffn = torch.ones(head_shape, requires_grad=True), torch.ones(ffn_shape, requires_grad=True)
    head_scores, ffn_scores = torch.zeros(head_shape), torch.zeros(ffn_shape)
    frozen = [p for p in model.parameters() if p.requires_grad]  # only the masks need gradients
    model.eval()
    try:
        for param in frozen:
            param.requires_grad_(False)
        with masks_applied(model, heads, ffn):
            for batch in batches:
                loss = loss_of(batch)
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
    """Removes every head and neuron not listed, and records the new shapes in the config (per layer, and the
    family's FFN width when every layer keeps the same count) so that models.load_finetuned, and transformers
    through modeling_fastformers.py, rebuild them."""
    (_, heads_before), (_, ffn_before) = mask_shapes(model)
    for layer, layer_heads, layer_neurons in zip(encoder_layers(model), heads, neurons, strict=True):
        if len(layer_heads) < heads_before:
            keep_attention_heads(layer, layer_heads)
        if len(layer_neurons) < ffn_before:
            keep_ffn_neurons(layer, layer_neurons)
    config, layout = model.config, family_layout(model)
    head_counts, ffn_counts = [len(h) for h in heads], [len(n) for n in neurons]
    if min(head_counts) < heads_before:
        setattr(config, LAYER_HEADS, head_counts)  # num_attention_heads stays: it sets the head size
        if len(set(head_counts)) == 1:
            setattr(config, HEADS_KEPT, head_counts[0])  # what fastformers before per-layer sizes reads
    if min(ffn_counts) < ffn_before:
        setattr(config, LAYER_FFN, ffn_counts)
        if len(set(ffn_counts)) == 1:
            setattr(config, layout.intermediate_size, ffn_counts[0])  # a plain from_pretrained then fits the FFN
    setattr(
        config,
        PRUNING_RECORD,
        {
            "kept_heads": heads,
            "ffn_neurons_kept": ffn_counts[0],
            "heads_before": heads_before,
            "ffn_neurons_before": ffn_before,
        },
    )


def pruned(config) -> bool:
    """Whether a model config records removed heads or FFN neurons."""
    return any(getattr(config, key, None) is not None for key in (LAYER_HEADS, LAYER_FFN, HEADS_KEPT))
