"""Structured pruning mechanics: first-order importance of attention heads and FFN neurons (Michel et al.,
2019: a mask of ones scales every head's context vector and every FFN neuron's activation through forward
pre-hooks, and |d loss / d mask| is summed over a labelled slice), the same number kept in every layer, and the
model rewired physically smaller. `models.load_finetuned` rebuilds a pruned model's shapes from its config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

HEADS_KEPT = "attention_heads_kept"  # config.json key of a head-pruned model: heads left in every layer
PRUNING_RECORD = "fastformers_pruning"  # config.json key: what was kept, for the reader of a saved model


def encoder_layers(model) -> Any:
    """The transformer blocks of a BERT or RoBERTa classifier (typed Any: attribute access on its modules is
    what the callers do, which torch's stubs cannot check)."""
    return model.base_model.encoder.layer


def sliced_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A Linear keeping only the output rows (dim=0) or input columns (dim=1) listed in `index`."""
    weight = linear.weight.detach().index_select(dim, index)
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[index])
    return out


def keep_attention_heads(attention, heads: list[int]) -> None:
    """Slices Q, K, V rows and the output projection's columns down to `heads` (indices into the current
    heads); the head size, hence the attention scaling, is unchanged."""
    self_attn = attention.self
    size = self_attn.attention_head_size
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])
    for name in ("query", "key", "value"):
        setattr(self_attn, name, sliced_linear(getattr(self_attn, name), index, dim=0))
    attention.output.dense = sliced_linear(attention.output.dense, index, dim=1)
    self_attn.num_attention_heads = len(heads)
    self_attn.all_head_size = len(heads) * size


def keep_ffn_neurons(layer, neurons: list[int]) -> None:
    """Slices the FFN's first projection rows and second projection columns down to `neurons`."""
    index = torch.tensor(neurons, dtype=torch.long)
    layer.intermediate.dense = sliced_linear(layer.intermediate.dense, index, dim=0)
    layer.output.dense = sliced_linear(layer.output.dense, index, dim=1)


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
    setattr(
        config,
        PRUNING_RECORD,
        {
            "kept_heads": heads,
            "ffn_neurons_kept": len(neurons[0]),
            "heads_before": head_count,
            "ffn_neurons_before": ffn_count,
        },
    )
