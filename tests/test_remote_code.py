"""Pruned model folders load where users take them: transformers alone (`trust_remote_code=True`, through the
modeling_fastformers.py and `auto_map` saved beside the weights) gives the same logits as
`models.load_finetuned`; the folder has a model card; folders saved before per-layer sizes still load; and the
prune stage's output goes through the export stage (onnxruntime and OpenVINO)."""

import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from fastformers.data.loading import load_examples, texts_of
from fastformers.data.tasks import TASKS
from fastformers.engines import export_index
from fastformers.models.hub import MODELING_FILE, save_pruned
from fastformers.models.loading import build_random, count_parameters, load_finetuned
from fastformers.models.modeling_fastformers import HEADS_KEPT, LAYER_FFN, LAYER_HEADS, LAYOUTS
from fastformers.models.pruning import attention_shape, encoder_layers, rewire
from fastformers.run import pipeline
from fastformers.stages import export, prune
from tests.helpers import compose_cfg, tiny_spec

HEADS = [[0, 2], [3]]  # per layer, and not the same count in both
NEURONS = [list(range(0, 128, 4)), list(range(10))]


@pytest.fixture(scope="module")
def cb_texts(superglue_root):
    return list(texts_of(load_examples(TASKS["cb"], superglue_root, "train")))


def tiny(family, texts):
    torch.manual_seed(0)
    model, tokenizer = build_random(tiny_spec(family, vocab=300), TASKS["cb"], texts)
    return model.eval(), tokenizer


def batch_of(tokenizer):
    return dict(
        tokenizer(["the cat sat on the mat", "a dog ran"], ["yes", "no it did not"], padding=True, return_tensors="pt")
    )


@pytest.mark.parametrize("family", ["bert", "distilbert", "xlm-roberta", "electra"])
def test_transformers_alone_loads_a_pruned_folder_with_the_same_logits(family, cb_texts, tmp_path):
    model, tokenizer = tiny(family, cb_texts)
    before = count_parameters(model)
    rewire(model, HEADS, NEURONS)
    folder = tmp_path / f"pruned-{family}"
    save_pruned(model, tokenizer, folder, "tiny random", before)

    assert (folder / MODELING_FILE).is_file() and (folder / "README.md").is_file()
    config = json.loads((folder / "config.json").read_text())
    name = LAYOUTS[family].pruned_class
    assert config["auto_map"] == {"AutoModelForSequenceClassification": f"modeling_fastformers.{name}"}
    assert (config[LAYER_HEADS], config[LAYER_FFN]) == ([2, 1], [32, 10])

    remote = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True).eval()
    assert type(remote).__name__ == name and isinstance(remote, LAYOUTS[family].classifier_class())
    ours, _ = load_finetuned(folder)
    assert count_parameters(remote) == count_parameters(ours) == count_parameters(model) < before
    batch = batch_of(tokenizer)
    expected = model(**batch).logits
    torch.testing.assert_close(ours(**batch).logits, expected)
    torch.testing.assert_close(remote(**batch).logits, expected, atol=1e-5, rtol=1e-5)  # SDPA by default


def test_the_model_card_says_what_was_pruned_from_what_and_how_to_load_it(cb_texts, tmp_path):
    model, tokenizer = tiny("bert", cb_texts)
    before = count_parameters(model)
    rewire(model, HEADS, NEURONS)
    save_pruned(model, tokenizer, tmp_path / "model", "bert-base-uncased fine-tuned on cb", before)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "`bert-base-uncased fine-tuned on cb`" in card
    assert "| 0 | 2 of 4 | [0, 2] | 32 of 128 |" in card and "| 1 | 1 of 4 | [3] | 10 of 128 |" in card
    assert f"{before:,} before, {count_parameters(model):,} after" in card
    assert "from_pretrained(folder, trust_remote_code=True)" in card and "load_finetuned" in card
    assert f"saved with transformers {transformers.__version__} and torch " in card


def test_an_unpruned_folder_needs_no_remote_code(cb_texts, tmp_path):
    model, tokenizer = tiny("distilbert", cb_texts)
    rewire(model, [[0, 1, 2, 3]] * 2, [list(range(128))] * 2)  # everything kept
    save_pruned(model, tokenizer, tmp_path / "model", "tiny", count_parameters(model))
    assert not (tmp_path / "model" / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "model" / "config.json").read_text())
    assert "loads as a plain transformers model" in (tmp_path / "model" / "README.md").read_text()
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model")).eval()
    batch = batch_of(tokenizer)
    torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_folder_saved_before_per_layer_sizes_still_loads(cb_texts, tmp_path):
    """Older folders: one head count for every layer (attention_heads_kept), the FFN width in the config, no
    per-layer lists, no auto_map."""
    model, tokenizer = tiny("bert", cb_texts)
    rewire(model, [[0, 2], [1, 3]], [list(range(0, 128, 2))] * 2)
    folder = tmp_path / "old"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key in (LAYER_HEADS, LAYER_FFN):
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    assert config[HEADS_KEPT] == 2 and config["intermediate_size"] == 64
    loaded, _ = load_finetuned(folder)
    assert attention_shape(loaded) == (2, 32)
    batch = batch_of(tokenizer)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_prune_stage_output_loads_remotely_and_exports_to_onnxruntime_and_openvino(superglue_root, tmp_path):
    """The prune stage (no re-distillation) on a tiny DistilBERT, then the export stage on its folder."""
    cfg = compose_cfg(
        superglue_root,
        tmp_path / "outputs",
        "teacher=tiny_distilbert",
        "pruning=heads50_ffn50",
        "pruning.redistill_epochs=0",
        "pruning.importance_examples=16",
        "export.parity_examples=16",
    )
    texts = list(texts_of(load_examples(TASKS["cb"], superglue_root, "train")))
    torch.manual_seed(0)
    model, tokenizer = build_random(cfg.teacher, TASKS["cb"], texts)
    model.save_pretrained(tmp_path / "finetune" / "model")
    tokenizer.save_pretrained(tmp_path / "finetune" / "model")

    (tmp_path / "prune").mkdir()
    metrics = prune.run(pipeline.context_of(cfg), {"model": tmp_path / "finetune"}, tmp_path / "prune")
    assert (metrics["heads_kept"], metrics["ffn_neurons_kept"]) == (2, 64)
    folder = tmp_path / "prune" / "model"
    ours, _ = load_finetuned(folder)
    assert [len(encoder_layers(ours)), *attention_shape(ours)] == [2, 2, 32]
    assert count_parameters(ours) == metrics["parameters"] < metrics["parameters_before"]
    assert "tiny_distilbert (random init) fine-tuned on cb" in (folder / "README.md").read_text()
    remote = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True).eval()
    batch = batch_of(tokenizer)
    torch.testing.assert_close(remote(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=1e-5)

    (tmp_path / "export").mkdir()
    export_metrics = export.run(pipeline.context_of(cfg), {"model": tmp_path / "prune"}, tmp_path / "export")
    index = export_index(tmp_path / "export")
    assert {"onnxruntime/fp32", "openvino/fp32"} <= set(index["artifacts"])
    assert export_metrics["fused/Attention"] == 2
    assert all(k in index["parity"] for k in ("exported", "onnxruntime/fp32", "openvino/fp32"))
    shutil.rmtree(tmp_path / "export")
