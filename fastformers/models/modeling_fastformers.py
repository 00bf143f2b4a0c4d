"""Where each supported encoder family keeps its layers, attention heads and FFN, and the classifiers of a
structurally pruned model (fewer heads and FFN neurons per layer than its config's sizes say).

This file is self-contained (torch and transformers only): fastformers reads its `LAYOUTS` table for pruning,
distillation and export, and copies the file beside every pruned model it saves, whose config.json then maps
`AutoModelForSequenceClassification` to one of the classes below (`auto_map`). So a pruned folder loads with
plain transformers:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

Each class subclasses its family's transformers classifier and narrows every layer to the sizes config.json
lists (`fastformers_layer_heads`, `fastformers_layer_ffn`) before the weights load. The head size, hence the
attention scaling, is unchanged: `num_attention_heads` and `hidden_size` keep their original values.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.bert.modeling_bert import BertForSequenceClassification
from transformers.models.distilbert.modeling_distilbert import DistilBertForSequenceClassification
from transformers.models.electra.modeling_electra import ElectraForSequenceClassification
from transformers.models.roberta.modeling_roberta import RobertaForSequenceClassification
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaForSequenceClassification

LAYER_HEADS = "fastformers_layer_heads"  # config.json key: attention heads kept in each layer
LAYER_FFN = "fastformers_layer_ffn"  # config.json key: FFN neurons kept in each layer
HEADS_KEPT = "attention_heads_kept"  # config.json key of models pruned before per-layer sizes: heads in every layer


@dataclass(frozen=True)
class Layout:
    """One family: its transformers classifier and, as dotted attribute paths, where its parts are."""

    model_type: str  # config.model_type
    module: str  # the transformers module of its modeling classes
    classifier: str  # the sequence classifier's class name there
    layers: str  # from the base model (model.base_model) to the ModuleList of transformer blocks
    attention: str  # from a block to the self-attention module that holds Q, K and V
    qkv: tuple[str, str, str]  # Q, K, V Linear names on that module
    heads_attr: str  # the attention module's head-count attribute, kept in step when heads are removed
    width_attr: str | None  # its total head width attribute, if it has one
    attention_output: str  # from a block: the Linear that takes the concatenated heads
    ffn_in: str  # from a block: the FFN's first Linear (hidden -> neurons)
    ffn_out: str  # from a block: the FFN's second Linear (neurons -> hidden)
    intermediate_size: str  # config key of the FFN width
    activation: str  # config key of the FFN activation
    tokenizer: str  # the tokenizer recipe of a randomly initialised model: wordpiece or bpe
    token_type_ids: bool  # whether its forward takes segment ids (RoBERTa's: all zeros, one type)
    onnx_model_type: str = "bert"  # onnxruntime transformer optimizer's model_type (optimum maps all of these so)

    @property
    def pruned_class(self) -> str:
        return f"Fastformers{self.classifier}"

    def config_key(self, generic: str) -> str:
        """A BERT-style config key (intermediate_size, hidden_act) as this family spells it."""
        return {"intermediate_size": self.intermediate_size, "hidden_act": self.activation}.get(generic, generic)

    def classifier_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.classifier)


_BERT_SHAPED = dict(
    layers="encoder.layer",
    attention="attention.self",
    qkv=("query", "key", "value"),
    heads_attr="num_attention_heads",
    width_attr="all_head_size",
    attention_output="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    intermediate_size="intermediate_size",
    activation="hidden_act",
)

LAYOUTS: dict[str, Layout] = {
    layout.model_type: layout
    for layout in (
        Layout(
            "bert",
            "transformers.models.bert.modeling_bert",
            "BertForSequenceClassification",
            tokenizer="wordpiece",
            token_type_ids=True,
            **_BERT_SHAPED,  # type: ignore[arg-type]
        ),
        Layout(
            "roberta",
            "transformers.models.roberta.modeling_roberta",
            "RobertaForSequenceClassification",
            tokenizer="bpe",
            token_type_ids=True,
            **_BERT_SHAPED,  # type: ignore[arg-type]
        ),
        Layout(
            "xlm-roberta",
            "transformers.models.xlm_roberta.modeling_xlm_roberta",
            "XLMRobertaForSequenceClassification",
            tokenizer="bpe",
            token_type_ids=True,
            **_BERT_SHAPED,  # type: ignore[arg-type]
        ),
        Layout(
            "electra",
            "transformers.models.electra.modeling_electra",
            "ElectraForSequenceClassification",
            tokenizer="wordpiece",
            token_type_ids=True,
            **_BERT_SHAPED,  # type: ignore[arg-type]
        ),
        Layout(
            "distilbert",
            "transformers.models.distilbert.modeling_distilbert",
            "DistilBertForSequenceClassification",
            layers="transformer.layer",
            attention="attention",
            qkv=("q_lin", "k_lin", "v_lin"),
            heads_attr="n_heads",
            width_attr=None,
            attention_output="attention.out_lin",
            ffn_in="ffn.lin1",
            ffn_out="ffn.lin2",
            intermediate_size="hidden_dim",
            activation="activation",
            tokenizer="wordpiece",
            token_type_ids=False,
        ),
    )
}
_BY_MODULE = {layout.module: layout for layout in LAYOUTS.values()}


def layout_of(thing: Any) -> Layout:
    """The layout of a model (by config.model_type) or of one of its blocks (by the module of its class);
    KeyError for any other family."""
    config = getattr(thing, "config", None)
    if config is not None and getattr(config, "model_type", None) in LAYOUTS:
        return LAYOUTS[config.model_type]
    for cls in type(thing).__mro__:
        if cls.__module__ in _BY_MODULE:
            return _BY_MODULE[cls.__module__]
    raise KeyError(getattr(config, "model_type", type(thing).__name__))


def part(module: Any, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _replace(module: Any, path: str, value: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(part(module, parent) if parent else module, name, value)


def blocks(model: Any) -> Any:
    """The transformer blocks of a classifier of any supported family."""
    return part(model.base_model, layout_of(model).layers)


def sliced_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A Linear keeping only the output rows (dim=0) or input columns (dim=1) listed in `index` (on the meta
    device too, where only the shape is made)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        bias = linear.bias.detach()
        out.bias.copy_(bias if dim == 1 else bias.index_select(0, index.to(bias.device)))
    return out


def head_size(block: Any) -> int:
    return int(part(block, layout_of(block).attention).attention_head_size)


def head_count(block: Any) -> int:
    layout = layout_of(block)
    return part(block, f"{layout.attention}.{layout.qkv[0]}").out_features // head_size(block)


def ffn_size(block: Any) -> int:
    return part(block, layout_of(block).ffn_in).out_features


def keep_heads(block: Any, heads: list[int]) -> None:
    """Slices Q, K, V rows and the attention output's columns of one block down to `heads` (indices into its
    current heads); the head size, hence the attention scaling, is unchanged."""
    layout = layout_of(block)
    attention, size = part(block, layout.attention), head_size(block)
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])
    for name in layout.qkv:
        setattr(attention, name, sliced_linear(getattr(attention, name), index, dim=0))
    _replace(block, layout.attention_output, sliced_linear(part(block, layout.attention_output), index, dim=1))
    setattr(attention, layout.heads_attr, len(heads))
    if layout.width_attr:
        setattr(attention, layout.width_attr, len(heads) * size)


def keep_neurons(block: Any, neurons: list[int]) -> None:
    """Slices the FFN's first projection rows and second projection columns of one block down to `neurons`."""
    layout, index = layout_of(block), torch.tensor(neurons, dtype=torch.long)
    _replace(block, layout.ffn_in, sliced_linear(part(block, layout.ffn_in), index, dim=0))
    _replace(block, layout.ffn_out, sliced_linear(part(block, layout.ffn_out), index, dim=1))


def layer_sizes(config: Any, layers: int) -> tuple[list[int] | None, list[int] | None]:
    """(heads, FFN neurons) per layer that a pruned model's config lists; None where it lists none. A config
    saved before per-layer sizes gives the same head count for every layer (its FFN width is in the config)."""
    heads = getattr(config, LAYER_HEADS, None)
    if heads is None and getattr(config, HEADS_KEPT, None) is not None:
        heads = [int(getattr(config, HEADS_KEPT))] * layers
    ffn = getattr(config, LAYER_FFN, None)
    return (list(heads) if heads is not None else None), (list(ffn) if ffn is not None else None)


def shrink_to_config(model: Any) -> Any:
    """Narrows every layer of a freshly built model to the sizes its config lists (shapes: the weights that
    go in them are loaded next)."""
    layers = blocks(model)
    heads, ffn = layer_sizes(model.config, len(layers))
    for i, block in enumerate(layers):
        if heads is not None and heads[i] < head_count(block):
            keep_heads(block, list(range(heads[i])))
        if ffn is not None and ffn[i] < ffn_size(block):
            keep_neurons(block, list(range(ffn[i])))
    return model


class FastformersBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_config(self)


class FastformersRobertaForSequenceClassification(RobertaForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_config(self)


class FastformersXLMRobertaForSequenceClassification(XLMRobertaForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_config(self)


class FastformersElectraForSequenceClassification(ElectraForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_config(self)


class FastformersDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config):
        super().__init__(config)
        shrink_to_config(self)
