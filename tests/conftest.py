"""What the tests share: fixture data in the official SuperGLUE shapes (fastformers/fixtures.py), the real config
tree shrunk for tests, tiny models saved the way the stages save them, and the MLflow runs of a config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fastformers import tracking
from fastformers.cli import CONF_DIR
from fastformers.data import load_examples, texts_of
from fastformers.fixtures import MAKERS, write_superglue  # noqa: F401 -- MAKERS: imported by the reader tests
from fastformers.models import build_random, load_finetuned
from fastformers.pruning import encoder_layers
from fastformers.tasks import TASKS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"


@pytest.fixture(scope="session")
def superglue_root(tmp_path_factory) -> Path:
    return write_superglue(tmp_path_factory.mktemp("superglue"))


def compose_cfg(superglue_root: Path, output_dir: Path, *overrides: str):
    """The real config tree with a tiny random model, fixture data and a private output folder."""
    base = [
        "teacher=tiny_bert",
        f"data.root={superglue_root}",
        f"paths.output_dir={output_dir}",
        "finetune.epochs=2",
        "finetune.batch_size=8",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


@pytest.fixture
def make_cfg(superglue_root, tmp_path):
    """`compose_cfg` for one test, with its own output folder."""

    def make(*overrides: str, data_root: Path | None = None):
        return compose_cfg(data_root or superglue_root, tmp_path / "outputs", *overrides)

    return make


LAYERS = 2


def attention_shape(model) -> tuple[int, int]:
    """(heads, total head width) of the first layer's attention, what the export stage gives the optimizer."""
    layer = encoder_layers(model)[0].attention.self
    return layer.num_attention_heads, layer.all_head_size


def tiny_spec(family: str, hidden: int = 64, heads: int = 4, ffn: int = 128, layers: int = LAYERS, vocab: int = 500):
    """A random tiny model's spec (conf/teacher/tiny_bert.yaml's shape)."""
    return OmegaConf.create(
        {
            "name": "tiny",
            "pretrained": None,
            "family": family,
            "attn_implementation": "eager",
            "arch": {
                "num_hidden_layers": layers,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "intermediate_size": ffn,
            },
            "tokenizer_vocab_size": vocab,
            "max_position_embeddings": 128,
        }
    )


def saved_tiny(family, superglue_root, folder):
    """A random tiny model saved like the finetune stage saves one, reloaded the way the export stage does."""
    texts = texts_of(load_examples(TASKS["cb"], superglue_root, "train"))
    model, tokenizer = build_random(tiny_spec(family), TASKS["cb"], texts)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_finetuned(folder)


def mlflow_runs(cfg):
    client = MlflowClient(tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
