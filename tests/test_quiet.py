"""A quiet terminal: the dependencies' noise is dropped at its source, while warnings about the user's own data,
config or model still show, each error is printed once, and `-v` brings the detail back."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fastformers.data.tasks import TASKS
from fastformers.models.loading import build_random, load_pretrained
from tests.helpers import tiny_spec

REPO = Path(__file__).resolve().parent.parent

# After quiet_dependencies(): the library noise the issue lists, then warnings about the user's inputs.
PROBE = """
import logging, warnings
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
from fastformers.run.quiet import quiet_dependencies
quiet_dependencies()
import fastformers.tracking.serving  # MLflow warns about the served model's type hints while it is defined
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
rank_zero_info("GPU available: False, used: False")
logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
warnings.warn("data.root: 3 records of CB/train.jsonl have no label", UserWarning)
rank_zero_warn("The dataloader does not have many workers which may be a bottleneck")
logging.getLogger("fastformers.run.pipeline").warning("skipping rte: no data files")
logging.getLogger("transformers.tokenization_utils_base").warning("Token indices sequence length is longer")
"""
NOISE = ("Any type hint", "GPU available", "pre-processing", "MLflow database tables")
USERS_OWN = ("have no label", "may be a bottleneck", "skipping rte", "Token indices sequence length")


def probe(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "FASTFORMERS_VERBOSE"} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow  # a fresh interpreter importing lightning and mlflow: 30-60 s on 2 busy cores
def test_the_dependencies_noise_is_dropped_and_warnings_about_the_users_inputs_still_show():
    terminal = probe()
    assert [line for line in NOISE if line in terminal] == []
    assert [line for line in USERS_OWN if line not in terminal] == []


@pytest.mark.slow
def test_verbose_brings_the_dependencies_output_back():
    terminal = probe(FASTFORMERS_VERBOSE="1")
    assert [line for line in NOISE if line not in terminal] == []
    assert [line for line in USERS_OWN if line not in terminal] == []


def pretrained_folder(tmp_path: Path, drop_layer: int | None) -> Path:
    """A saved tiny BERT as a hub checkpoint would be: without a classification head and, with `drop_layer`,
    without that encoder layer's weights."""
    model, tokenizer = build_random(tiny_spec("bert"), TASKS["cb"], ["a small text", "another text"] * 20)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = ("classifier.",) + (() if drop_layer is None else (f"bert.encoder.layer.{drop_layer}.",))
    save_file({k: v for k, v in weights.items() if not k.startswith(dropped)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def pretrained_spec(folder: Path):
    return OmegaConf.create({"name": "mine", "pretrained": str(folder), "family": "bert", "attn_implementation": None})


def test_a_fresh_head_loads_silently_but_missing_encoder_weights_are_named(tmp_path, caplog, capfd):
    whole, partial = pretrained_folder(tmp_path / "whole", None), pretrained_folder(tmp_path / "partial", 0)
    capfd.readouterr()
    caplog.set_level(logging.INFO)
    load_pretrained(pretrained_spec(whole), TASKS["cb"])
    assert "LOAD REPORT" not in capfd.readouterr().err + caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    load_pretrained(pretrained_spec(partial), TASKS["cb"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "encoder weights are not in the checkpoint" in warned[0]
    assert "bert.encoder.layer.0." in warned[0] and str(tmp_path / "partial") in warned[0]


def test_bad_input_is_one_line_on_stderr_before_any_heavy_import(tmp_path):
    """`-X importtime` lists every module the command imported: a config error stops before torch."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fastformers.run.cli", "pruning.heads=abc"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "pruning.heads" in line]
    assert errors == [
        "fastformers: error: pruning.heads='abc' must be a number in (0, 1]: the fraction of "
        "attention heads KEPT in every layer"
    ]
    assert "pruning.heads" not in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "fastformers.checks" in imported and not {"torch", "lightning", "mlflow"} & imported
    (log_file,) = (tmp_path / "outputs" / "runs").glob("*/*/*.log")
    assert "pruning.heads='abc'" in log_file.read_text()  # the job's log keeps it too


def test_nncf_hides_its_info_lines_and_progress_bars_but_not_its_warnings(capfd, caplog):
    """Judged on the records NNCF's logger lets through (its stream handler may hold a stream an earlier test's
    capture replaced, so the terminal text alone would depend on test order) and on the progress bar's output."""
    from nncf.common.logging.logger import nncf_logger
    from nncf.common.logging.track_progress import track

    from fastformers.engines.openvino_engine import nncf_quiet

    nncf_logger.addHandler(caplog.handler)  # NNCF's logger does not propagate: listen on it, at its own level
    try:
        with nncf_quiet():
            assert list(track(range(3), total=3, description="Statistics collection")) == [0, 1, 2]
            nncf_logger.info("Not adding activation input quantizer for operation: 19")
            nncf_logger.warning("Dataset contains only 3 samples")
    finally:
        nncf_logger.removeHandler(caplog.handler)
    passed = [record.getMessage() for record in caplog.records]
    terminal = "".join(capfd.readouterr())
    assert "Statistics collection" not in terminal
    assert "Dataset contains only 3 samples" in passed and not any("Not adding" in m for m in passed)


def test_the_verbose_flag_is_taken_out_of_hydras_arguments(monkeypatch):
    from fastformers.run.cli import take_verbose_flag
    from fastformers.run.quiet import VERBOSE_ENV, verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    argv = ["fastformers", "task=rte"]
    take_verbose_flag(argv)
    assert argv == ["fastformers", "task=rte"] and not verbose()

    argv = ["fastformers", "-v", "task=rte", "--verbose"]
    take_verbose_flag(argv)
    assert argv == ["fastformers", "task=rte"] and verbose()
