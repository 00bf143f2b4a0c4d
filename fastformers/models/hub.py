"""A pruned model folder the way the Hugging Face hub ships a custom architecture: beside the weights,
modeling_fastformers.py (self-contained: it narrows each layer to the sizes config.json lists before the
weights load), `auto_map` in config.json naming its classifier class, and a README.md model card saying what was
pruned and how to load it. Then `AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True)` loads it with transformers alone, and `models.load_finetuned(folder)` as before."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

from fastformers.models import modeling_fastformers
from fastformers.models.loading import count_parameters
from fastformers.models.pruning import PRUNING_RECORD, encoder_layers, family_layout, mask_shapes, pruned

MODELING_FILE = Path(modeling_fastformers.__file__).name  # modeling_fastformers.py
AUTO_CLASS = "AutoModelForSequenceClassification"


def save_pruned(model, tokenizer, folder: Path, source: str, parameters_before: int) -> None:
    """save_pretrained, plus (when anything was removed) the modeling file and `auto_map`, and the model card."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pruned(model.config):
        shutil.copyfile(modeling_fastformers.__file__, folder / MODELING_FILE)
        name = family_layout(model).pruned_class
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["auto_map"] = {AUTO_CLASS: f"{Path(MODELING_FILE).stem}.{name}"}
        config["architectures"] = [name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").write_text(model_card(model, source, parameters_before))


def model_card(model, source: str, parameters_before: int) -> str:
    """What was pruned (heads and FFN neurons kept per layer, of how many), from which model, the parameter
    counts before and after, and how to load it."""
    config, layout = model.config, family_layout(model)
    record = getattr(config, PRUNING_RECORD, None) or {}
    (_, heads), (_, ffn) = mask_shapes(model)
    heads_before, ffn_before = record.get("heads_before", heads), record.get("ffn_neurons_before", ffn)
    kept_heads = record.get("kept_heads") or [list(range(heads))] * len(encoder_layers(model))
    after = count_parameters(model)
    rows = [
        f"| {i} | {len(h)} of {heads_before} | {h} | {modeling_fastformers.ffn_size(block)} of {ffn_before} |"
        for i, (h, block) in enumerate(zip(kept_heads, encoder_layers(model)))
    ]
    remote = pruned(config)
    load = (
        "model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)\n"
        if remote
        else "model = AutoModelForSequenceClassification.from_pretrained(folder)\n"
    )
    why = (
        f"\n`{MODELING_FILE}` in this folder (`auto_map` in config.json) subclasses transformers' "
        f"`{layout.classifier}` and narrows every layer to the sizes config.json lists "
        f"(`{modeling_fastformers.LAYER_HEADS}`, `{modeling_fastformers.LAYER_FFN}`) before the weights load; "
        "it needs only torch and transformers. `trust_remote_code=True` runs that file: read it first.\n"
        if remote
        else "\nNothing was removed (every head and FFN neuron kept): it loads as a plain transformers model.\n"
    )
    return (
        f"# Structurally pruned {layout.model_type} classifier\n\n"
        f"Structured pruning (the FastFormers recipe, Kim & Awadalla 2020) of `{source}`: attention heads and "
        "FFN neurons ranked by first-order importance (Michel et al., 2019), the most important kept in every "
        "layer and the rest removed from the weights (fewer parameters and FLOPs, not masks).\n\n"
        f"- model type: `{layout.model_type}`, {len(rows)} layers, {config.num_labels} labels\n"
        f"- parameters: {parameters_before:,} before, {after:,} after "
        f"({1 - after / parameters_before:.1%} removed)\n"
        f"- saved with transformers {version('transformers')} and torch {version('torch')} (the modeling file "
        "overrides transformers' own classes: another major version may need it updated)\n\n"
        "| layer | heads kept | which (original indices) | FFN neurons kept |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "## Load\n\n"
        "```python\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        'folder = "path/to/this/folder"  # or its hub id\n'
        + load
        + "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        "```\n"
        + why
        + "\nWith fastformers installed, `fastformers.models.loading.load_finetuned(folder)` loads it too "
        "(eager attention, the ONNX export's choice).\n"
    )
