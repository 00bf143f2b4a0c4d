"""Structured pruning: masks, first-order importance, uniform selection, physical rewiring, reload, ONNX
fusion and parity, and the stage in the pipeline (re-distillation, cache reuse, bad configs)."""

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fastformers.data.fixtures import SIZES
from fastformers.data.loading import load_examples, make_loader, texts_of
from fastformers.data.tasks import TASKS
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.onnx.optimize import optimize
from fastformers.errors import FastformersError
from fastformers.models.loading import (
    build_random,
    count_parameters,
    example_scores,
    load_finetuned,
    model_inputs,
    task_loss,
)
from fastformers.models.pruning import (
    HEADS_KEPT,
    attention_shape,
    encoder_layers,
    importance,
    kept_count,
    mask_shapes,
    masks_applied,
    rewire,
    top_per_layer,
)
from fastformers.run import pipeline
from tests.helpers import FFN, HEADS, HIDDEN, LAYERS, masks_keeping, mlflow_runs, pair_inputs, rescored, tiny_spec

HEAD_SIZE = HIDDEN // HEADS


def tiny(family, superglue_root):
    spec = tiny_spec(family, hidden=HIDDEN, heads=HEADS, ffn=FFN, vocab=300)
    torch.manual_seed(0)
    model, tokenizer = build_random(spec, TASKS["cb"], texts_of(load_examples(TASKS["cb"], superglue_root, "train")))
    return model.eval(), tokenizer


KEPT_HEADS = [[0, 2], [1, 3]]  # the same count in every layer, different heads
KEPT_NEURONS = [list(range(0, FFN, 4)), list(range(3, FFN, 4))]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_all_ones_masks_leave_outputs_unchanged(family, superglue_root):
    model, tokenizer = tiny(family, superglue_root)
    batch = pair_inputs(tokenizer)
    plain = model(**batch).logits
    head_shape, ffn_shape = mask_shapes(model)
    assert (head_shape, ffn_shape) == ((LAYERS, HEADS), (LAYERS, FFN))
    with masks_applied(model, torch.ones(head_shape), torch.ones(ffn_shape)):
        assert torch.equal(model(**batch).logits, plain)
    with masks_applied(model, *masks_keeping(KEPT_HEADS, KEPT_NEURONS)):
        assert not torch.allclose(model(**batch).logits, plain)  # zeros do switch things off
    assert torch.equal(model(**batch).logits, plain)  # and the hooks are gone afterwards


def test_importance_ranks_first_the_head_and_neuron_made_to_matter(superglue_root):
    """In layer 0 only head 2 and neuron 5 reach the output projections: every other gradient is zero."""
    model, tokenizer = tiny("bert", superglue_root)
    layer = encoder_layers(model)[0]
    with torch.no_grad():
        attn_out = layer.attention.output.dense.weight
        keep = slice(2 * HEAD_SIZE, 3 * HEAD_SIZE)
        attn_out[:, keep] *= 5.0
        attn_out[:, : keep.start] = 0.0
        attn_out[:, keep.stop :] = 0.0
        ffn_out = layer.output.dense.weight
        ffn_out[:, 5] = ffn_out[:, 5] * 5.0 + 0.5
        ffn_out[:, :5] = 0.0
        ffn_out[:, 6:] = 0.0
    examples = load_examples(TASKS["cb"], superglue_root, "train")
    loader = make_loader(examples, tokenizer, TASKS["cb"], 64, 8)

    def loss_of(batch):
        return task_loss(example_scores(model(**model_inputs(batch)).logits, batch["group_sizes"], False), batch)

    head_scores, ffn_scores = importance(model, loader, loss_of)
    assert top_per_layer(head_scores, 1)[0] == [2]
    assert top_per_layer(ffn_scores, 1)[0] == [5]
    assert head_scores[0, 2] > 0 and torch.count_nonzero(head_scores[0]) == 1
    assert torch.isfinite(head_scores).all() and (head_scores[1] > 0).all()  # layer 1 untouched: all matter
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_rewired_model_is_smaller_by_exactly_the_removed_weights_and_equals_the_masked_one(family, superglue_root):
    model, tokenizer = tiny(family, superglue_root)
    batch = pair_inputs(tokenizer)
    with masks_applied(model, *masks_keeping(KEPT_HEADS, KEPT_NEURONS)):
        masked = model(**batch).logits
    before = count_parameters(model)
    rewire(model, KEPT_HEADS, KEPT_NEURONS)

    removed_heads, removed_neurons = HEADS - 2, FFN - len(KEPT_NEURONS[0])
    per_layer = removed_heads * HEAD_SIZE * (4 * HIDDEN + 3) + removed_neurons * (2 * HIDDEN + 1)
    assert count_parameters(model) == before - LAYERS * per_layer
    for layer in encoder_layers(model):
        assert layer.attention.self.query.weight.shape == (2 * HEAD_SIZE, HIDDEN)
        assert layer.attention.output.dense.weight.shape == (HIDDEN, 2 * HEAD_SIZE)
        assert layer.intermediate.dense.weight.shape == (len(KEPT_NEURONS[0]), HIDDEN)
    torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=1e-5)
    assert getattr(model.config, HEADS_KEPT) == 2 and model.config.intermediate_size == len(KEPT_NEURONS[0])


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory, superglue_root):
    model, tokenizer = tiny("bert", superglue_root)
    rewire(model, KEPT_HEADS, KEPT_NEURONS)
    folder = tmp_path_factory.mktemp("pruned") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_a_saved_pruned_model_loads_back_to_the_same_shapes_and_outputs(pruned_folder):
    folder, model, tokenizer = pruned_folder
    loaded, _ = load_finetuned(folder)
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    batch = pair_inputs(tokenizer)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    sdpa, _ = load_finetuned(folder, attn_implementation=None)  # the PyTorch baseline's attention
    torch.testing.assert_close(sdpa(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_pruned_model_exports_with_fused_attention_and_matches_pytorch(pruned_folder):
    folder, model, tokenizer = pruned_folder
    exported = export_onnx(model, tokenizer, folder.parent / "onnx" / "model.onnx", opset=17)
    fused, fusions = optimize(exported, *attention_shape(model))
    assert fusions["Attention"] == LAYERS and fusions["EmbedLayerNormalization"] == 1
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    batch = pair_inputs(tokenizer)
    logits = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
    np.testing.assert_allclose(logits, model(**batch).logits.detach().numpy(), atol=1e-4)


def test_kept_count_keeps_at_least_one():
    assert kept_count(12, 0.5) == 6 and kept_count(1536, 0.25) == 384 and kept_count(4, 0.01) == 1


@pytest.mark.slow
def test_prune_stage_rewires_redistills_and_reuses_the_cached_teacher(make_cfg):
    stages = "stages=[finetune,prune,evaluate]"
    first = make_cfg(stages, "pruning.heads=0.5", "pruning.ffn=0.25", "distill.epochs=1", "finetune.epochs=1")
    results = pipeline.run(first)
    assert results["prune/heads_kept"] == 2 and results["prune/heads_before"] == 4
    assert results["prune/ffn_neurons_kept"] == 32 and results["prune/ffn_neurons_before"] == 128
    assert results["prune/parameters"] < results["prune/parameters_before"]
    assert results["prune/redistill_seconds"] > 0
    metrics, count = rescored(first)  # the pruned model's written predictions, scored again
    assert count == SIZES["val"] and results["evaluate/val/score"] == pytest.approx(metrics["score"])

    second = make_cfg(stages, "pruning.heads=0.75", "distill.epochs=1", "finetune.epochs=1")
    assert pipeline.run(second)["prune/heads_kept"] == 3
    client, (older, newer) = mlflow_runs(second)
    assert (older.data.tags["cache.finetune"], newer.data.tags["cache.finetune"]) == ("miss", "hit")
    assert newer.data.tags["cache.prune"] == "miss"
    assert newer.info.run_name.endswith("/h0.75-f1.0/fp32")
    artifacts = [a.path for a in client.list_artifacts(older.info.run_id, "prune")]
    assert "prune/importance.json" in artifacts
    assert any(m.key == "prune/val_score" for m in client.get_metric_history(older.info.run_id, "prune/val_score"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["stages=[finetune,prune]", "pruning.heads=0"],
            r"pruning.heads=0 must be a number in \(0, 1\]: the fraction of attention heads",
        ),
        (
            ["stages=[finetune,prune]", "pruning.ffn=1.5"],
            r"pruning.ffn=1.5 must be a number in \(0, 1\]: the fraction of FFN neurons",
        ),
        (["pruning=heads50_ffn25"], "needs the prune stage"),
        (["stages=[prune]"], "'prune' needs the 'model' output of an earlier stage"),
        (["stages=[finetune,prune]", "pruning.normalize=l1"], "pruning.normalize='l1' must be one of"),
    ],
)
def test_bad_pruning_configs_fail_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.run(cfg)
    assert not os.path.exists(cfg.paths.cache_dir)


@pytest.mark.slow
def test_importance_on_an_unlabelled_split_fails_with_the_field_named(make_cfg):
    cfg = make_cfg("stages=[finetune,prune]", "pruning.heads=0.5", "pruning.importance_split=test", "finetune.epochs=1")
    with pytest.raises(FastformersError, match=r"pruning.importance_split='test' has no labels"):
        pipeline.run(cfg)
    _, (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED" and run.data.tags["cache.finetune"] == "miss"
