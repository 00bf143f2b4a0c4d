"""The families beyond BERT and RoBERTa (DistilBERT, XLM-R, ELECTRA) on tiny random models: the family table,
the student made from teacher layers, head/FFN importance, physical rewiring (parameters really removed, logits
equal to the masked model's, reload), the ONNX export (parity with PyTorch, fused graph, int8), the config files,
and the one-line refusal of any other family."""

import numpy as np
import pytest
import torch
from transformers import AlbertConfig, AutoModelForSequenceClassification

from fastformers.bench.roofline import Shape
from fastformers.data.loading import load_examples, make_loader, texts_of
from fastformers.data.tasks import TASKS
from fastformers.engines.onnx.convert import export_onnx
from fastformers.engines.onnx.optimize import optimize
from fastformers.engines.onnx.quantize import quantize_int8
from fastformers.engines.onnxruntime_engine import OnnxClassifier
from fastformers.errors import FastformersError
from fastformers.models.loading import (
    FAMILIES,
    build_random,
    check_family,
    count_parameters,
    example_scores,
    load_finetuned,
    model_inputs,
    task_loss,
    train_tokenizer,
)
from fastformers.models.modeling_fastformers import LAYOUTS, part
from fastformers.models.pruning import (
    attention_shape,
    encoder_layers,
    family_layout,
    importance,
    mask_shapes,
    masks_applied,
    rewire,
    top_per_layer,
)
from fastformers.stages.distill import student_from_teacher_layers
from tests.helpers import FFN, HEADS, HIDDEN, LAYERS, compose_cfg, masks_keeping, pair_inputs, tiny_spec

NEW = ["distilbert", "xlm-roberta", "electra"]
HEAD_SIZE = HIDDEN // HEADS
KEPT_HEADS = [[0, 2], [1, 3]]
KEPT_NEURONS = [list(range(0, FFN, 4)), list(range(3, FFN, 4))]


@pytest.fixture(scope="module")
def cb_texts(superglue_root):
    return list(texts_of(load_examples(TASKS["cb"], superglue_root, "train")))


def tiny(family, texts):
    torch.manual_seed(0)
    model, tokenizer = build_random(
        tiny_spec(family, hidden=HIDDEN, heads=HEADS, ffn=FFN, vocab=300), TASKS["cb"], texts
    )
    return model.eval(), tokenizer


def test_the_table_names_every_supported_family_and_its_classifier():
    assert sorted(FAMILIES) == ["bert", "distilbert", "electra", "roberta", "xlm-roberta"]
    for name, layout in LAYOUTS.items():
        assert layout.classifier_class().config_class.model_type == name


@pytest.mark.parametrize("family", NEW)
def test_tiny_model_has_the_familys_classes_shapes_and_inputs(family, cb_texts):
    model, tokenizer = tiny(family, cb_texts)
    assert model.config.model_type == family
    assert family_layout(model) is LAYOUTS[family]
    assert mask_shapes(model) == ((LAYERS, HEADS), (LAYERS, FFN))
    assert attention_shape(model) == (HEADS, HIDDEN)
    batch = pair_inputs(tokenizer)
    if not LAYOUTS[family].token_type_ids:  # DistilBERT's forward takes no segment ids: its tokenizer makes none
        assert "token_type_ids" not in batch and "token_type_ids" not in tokenizer.model_input_names
    assert model(**model_inputs(batch)).logits.shape == (2, 3)


@pytest.mark.parametrize("family", NEW)
def test_student_from_teacher_layers_copies_the_chosen_layers(family, cb_texts):
    teacher, tokenizer = tiny(family, cb_texts)
    student = student_from_teacher_layers(teacher, [1], "relu").eval()
    layout = LAYOUTS[family]
    assert student.config.num_hidden_layers == 1 and len(encoder_layers(student)) == 1
    assert getattr(student.config, layout.activation) == "relu"
    copied, source = encoder_layers(student)[0].state_dict(), encoder_layers(teacher)[1].state_dict()
    assert copied.keys() == source.keys()
    assert all(torch.equal(copied[k], source[k]) for k in copied)
    assert count_parameters(student) < count_parameters(teacher)
    out = student(**pair_inputs(tokenizer), output_hidden_states=True)  # the intermediate losses read these
    assert out.logits.shape == (2, 3) and len(out.hidden_states) == 2


@pytest.mark.parametrize("family", NEW)
def test_importance_scores_every_head_and_neuron(family, cb_texts, superglue_root):
    model, tokenizer = tiny(family, cb_texts)
    examples = load_examples(TASKS["cb"], superglue_root, "train")[:16]
    loader = make_loader(examples, tokenizer, TASKS["cb"], 64, 8)

    def loss_of(batch):
        return task_loss(example_scores(model(**model_inputs(batch)).logits, batch["group_sizes"], False), batch)

    heads, ffn = importance(model, loader, loss_of)
    assert heads.shape == (LAYERS, HEADS) and ffn.shape == (LAYERS, FFN)
    assert torch.isfinite(heads).all() and (heads > 0).all() and (ffn > 0).any()
    assert len(top_per_layer(heads, 2)[0]) == 2


@pytest.mark.parametrize("family", NEW)
def test_rewired_model_loses_exactly_the_removed_weights_equals_the_masked_one_and_reloads(family, cb_texts, tmp_path):
    model, tokenizer = tiny(family, cb_texts)
    batch = pair_inputs(tokenizer)
    with masks_applied(model, *masks_keeping(KEPT_HEADS, KEPT_NEURONS)):
        masked = model(**batch).logits
    before = count_parameters(model)
    rewire(model, KEPT_HEADS, KEPT_NEURONS)

    per_layer = (HEADS - 2) * HEAD_SIZE * (4 * HIDDEN + 3) + (FFN - len(KEPT_NEURONS[0])) * (2 * HIDDEN + 1)
    assert count_parameters(model) == before - LAYERS * per_layer
    layout = LAYOUTS[family]
    for layer in encoder_layers(model):
        assert part(layer, f"{layout.attention}.{layout.qkv[0]}").weight.shape == (2 * HEAD_SIZE, HIDDEN)
        assert part(layer, layout.attention_output).weight.shape == (HIDDEN, 2 * HEAD_SIZE)
        assert part(layer, layout.ffn_in).weight.shape == (len(KEPT_NEURONS[0]), HIDDEN)
    assert attention_shape(model) == (2, 2 * HEAD_SIZE)
    pruned = model(**batch).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    reloaded, _ = load_finetuned(tmp_path / "model")
    assert count_parameters(reloaded) == count_parameters(model)
    torch.testing.assert_close(reloaded(**batch).logits, pruned, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", NEW)
def test_pruned_model_exports_with_parity_fuses_and_runs_int8(family, cb_texts, tmp_path):
    model, tokenizer = tiny(family, cb_texts)
    rewire(model, KEPT_HEADS, KEPT_NEURONS)
    exported = export_onnx(model, tokenizer, tmp_path / "model.onnx", opset=17)
    fused, fusions = optimize(exported, *attention_shape(model), model_type=family_layout(model).onnx_model_type)
    int8 = quantize_int8(fused)
    batch = pair_inputs(tokenizer)
    expected = model(**batch).logits.detach().numpy()
    feeds = {k: v.numpy() for k, v in model_inputs(batch).items()}
    for graph in (exported, fused):
        np.testing.assert_allclose(OnnxClassifier(graph).run(feeds), expected, atol=1e-4, rtol=1e-4)
    assert fusions.get("Attention", 0) == LAYERS  # the optimizer was told the pruned width
    logits = OnnxClassifier(int8).run(feeds)
    assert logits.shape == expected.shape and np.isfinite(logits).all()
    assert np.abs(logits - expected).max() < 0.5  # int8 stays near fp32 on a tiny random model


@pytest.mark.parametrize(
    "name, family",
    [("tiny_distilbert", "distilbert"), ("tiny_xlm_roberta", "xlm-roberta"), ("tiny_electra", "electra")],
)
def test_tiny_teacher_configs_build_their_family(name, family, superglue_root, tmp_path, cb_texts):
    cfg = compose_cfg(superglue_root, tmp_path, f"teacher={name}", "student=tiny_random")
    assert cfg.teacher.family == family and cfg.student.family == family  # the student follows the teacher
    model, _ = build_random(cfg.teacher, TASKS["cb"], cb_texts[:50])
    assert model.config.model_type == family and model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "name, hub_id, family",
    [
        ("distilbert_base", "distilbert-base-uncased", "distilbert"),
        ("xlm_roberta_base", "xlm-roberta-base", "xlm-roberta"),
        ("electra_base", "google/electra-base-discriminator", "electra"),
    ],
)
def test_hub_teacher_configs_name_the_model_and_its_family(name, hub_id, family, superglue_root, tmp_path):
    cfg = compose_cfg(superglue_root, tmp_path, f"teacher={name}")
    assert (cfg.teacher.pretrained, cfg.teacher.family) == (hub_id, family)
    check_family(cfg.teacher, family)


def test_any_other_family_is_refused_in_one_line_naming_the_supported_ones(tmp_path, cb_texts):
    supported = r"use one of \['bert', 'distilbert', 'electra', 'roberta', 'xlm-roberta'\]"
    spec = tiny_spec("albert")
    with pytest.raises(FastformersError, match=f"model type 'albert' is not supported; {supported}"):
        check_family(spec, "albert")
    with pytest.raises(FastformersError, match=f"family 'albert' is not supported; {supported}"):
        build_random(spec, TASKS["cb"], cb_texts[:50])
    with pytest.raises(FastformersError, match="no tokenizer recipe"):
        train_tokenizer("albert", cb_texts[:50], 100)
    config = AlbertConfig(
        vocab_size=100,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        embedding_size=16,
    )
    albert = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(FastformersError, match=f"model type 'albert' is not supported; {supported}") as err:
        encoder_layers(albert)
    assert "\n" not in str(err.value)
    albert.save_pretrained(tmp_path / "albert")
    with pytest.raises(FastformersError, match=f"model type 'albert' is not supported; {supported}"):
        load_finetuned(tmp_path / "albert")


@pytest.mark.parametrize("family", NEW)
def test_a_pruned_teachers_layers_keep_their_sizes_in_the_student(family, cb_texts):
    teacher, _ = tiny(family, cb_texts)
    rewire(teacher, [[0, 1, 2], [3]], [list(range(0, FFN, 2)), list(range(10))])
    student = student_from_teacher_layers(teacher, [1], "gelu").eval()
    assert attention_shape(student) == (1, HEAD_SIZE) and mask_shapes(student)[1] == (1, 10)
    copied, source = encoder_layers(student)[0].state_dict(), encoder_layers(teacher)[1].state_dict()
    assert all(torch.equal(copied[k], source[k]) for k in source)


@pytest.mark.parametrize("family", NEW)
def test_roofline_shape_reads_every_familys_config_and_kept_sizes(family, cb_texts):
    model, _ = tiny(family, cb_texts)
    assert Shape.of(model.config) == Shape(LAYERS, HIDDEN, HEADS, HEAD_SIZE, FFN)
    rewire(model, KEPT_HEADS, KEPT_NEURONS)
    assert Shape.of(model.config) == Shape(LAYERS, HIDDEN, 2, HEAD_SIZE, len(KEPT_NEURONS[0]))
