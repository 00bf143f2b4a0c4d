"""Bad input refused before any work, in one line (issue 15): Hydra's own config errors from the CLI, config values
of the wrong type or range, weights that cannot be read, and the scratch folders that killed runs leave in the
stage cache."""

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastformers.checks import require_number
from fastformers.data.tasks import TASKS
from fastformers.errors import FastformersError
from fastformers.models.loading import load_finetuned, load_pretrained
from fastformers.run import pipeline
from fastformers.run.cache import StageCache, owner_identity, owner_tag, this_host
from tests.helpers import saved_tiny

# ------------------------------------------------------------------------------------- Hydra's errors, one line


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | env
    return subprocess.run(
        [sys.executable, "-m", "fastformers.run.cli", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["task=glue"],
            "task=glue: no such option in config group 'task' (options: boolq, cb, copa, multirc, record, rte, "
            "text_classification, wic)",
        ),
        (["finetune.epohcs=2"], "finetune.epohcs: no such key; did you mean finetune.epochs?"),
        (["techer=tiny_bert"], "techer: no such key; did you mean teacher?"),
        (
            ["hydra/launcher=joblb"],
            "hydra/launcher=joblb: no such option in config group 'hydra/launcher'; did you mean "
            "hydra/launcher=joblib? (options: basic, joblib, submitit_local, submitit_slurm)",
        ),
        (
            ["stages=[finetune"],
            "stages=[finetune: not a valid override: no viable alternative at input '[finetune'; "
            "See https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details",
        ),
        (["hydra.run.dir=${nope}"], "hydra.run.dir: Interpolation key 'nope' not found"),
        (["-m", "task=cb,glue"], "task=glue: no such option in config group 'task' (options: boolq, cb, copa, "),
        (["--cfg", "job", "finetune.epohcs=2"], "finetune.epohcs: no such key; did you mean finetune.epochs?"),
    ],
)
def test_hydra_config_errors_are_one_line_and_exit_2(tmp_path, args, line):
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [text for text in done.stderr.splitlines() if text.strip()]
    if args[0] == "-m":  # a sweep opens its MLflow store (whose first use logs) before it composes its jobs
        lines = [text for text in lines if "mlflow" not in text]
    (error,) = lines
    assert error.startswith(f"fastformers: error: {line}")
    assert not list(tmp_path.rglob("cache"))  # no stage ran


@pytest.mark.slow
def test_hydra_full_error_still_gets_hydras_trace(tmp_path):
    done = run_cli("finetune.epohcs=2", cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert done.returncode == 1 and "Traceback" in done.stderr and "fastformers: error:" not in done.stderr


# --------------------------------------------------------------------------------- config values, up front


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["pruning.heads=abc"], r"^pruning.heads='abc' must be a number in \(0, 1\]"),
        (["stages=[finetune,prune]", "pruning.ffn=abc"], r"^pruning.ffn='abc' must be a number in \(0, 1\]"),
        (["task.max_seq_length=0"], r"^task.max_seq_length=0 must be a positive integer"),
        (["data.split_seed=abc"], r"^data.split_seed='abc' must be an integer$"),
        (["seed=1.5"], r"^seed=1.5 must be an integer$"),
        (["stages=[finetune,finetune]"], r"^stages: 'finetune' is listed twice$"),
        (["finetune.epochs=abc"], r"^finetune.epochs='abc' must be a positive integer$"),
        (["finetune.epochs=true"], r"^finetune.epochs=True must be a positive integer$"),
        (["finetune.batch_size=2.5"], r"^finetune.batch_size=2.5 must be a positive integer$"),
        (["finetune.learning_rate=fast"], r"^finetune.learning_rate='fast' must be a positive number$"),
        (["finetune.warmup_ratio=1"], r"^finetune.warmup_ratio=1 must be a number in \[0, 1\)$"),
        (["finetune.epochs=${nope}"], r"^finetune.epochs: Interpolation key 'nope' not found$"),
        (["stages=[finetune,distill]", "student=tiny_random", "distill.alpha=abc"], r"^distill.alpha='abc' must be"),
        (["stages=[finetune,distill]", "student=tiny_random", "distill.temperature=0"], r"^distill.temperature=0"),
        (["stages=[finetune,distill]", "student=tiny_random", "distill.epochs=x"], r"^distill.epochs='x' must be"),
        (["stages=[finetune,distill]", "student=tiny_random", "distill.layer_map=abc"], r"^distill.layer_map='abc'"),
        (["evaluate.batch_size=abc"], r"^evaluate.batch_size='abc' must be a positive integer$"),
        (["stages=[finetune,export,benchmark]", "benchmark.repeats=x"], r"^benchmark.repeats='x' must be a posit"),
        (["stages=[finetune,export]", "export.parity_examples=0"], r"^export.parity_examples=0 must be a positive"),
    ],
)
def test_config_values_are_typed_before_any_work(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    with pytest.raises(FastformersError, match=message):
        pipeline.validate(cfg)


@pytest.mark.parametrize(
    "value, bounds, message",
    [
        ("x", dict(lo=0, hi=1), "k='x' must be a number in [0, 1]"),
        (float("nan"), dict(lo=0), "k=nan must be a number >= 0"),
        (0, dict(lo=0, lo_open=True), "k=0 must be a positive number"),
        (-1, dict(lo=0, integer=True), "k=-1 must be an integer >= 0"),
        (None, dict(lo=1, integer=True), "k=None must be a positive integer"),
        (
            "x",
            dict(lo=1, integer=True, null="all", meaning="the first N"),
            "k='x' must be a positive integer (or null = all): the first N",
        ),
    ],
)
def test_require_number_says_what_is_expected(value, bounds, message):
    with pytest.raises(FastformersError) as refused:
        require_number(OmegaConf.create({"k": value}), "k", **bounds)
    assert str(refused.value).startswith(message)


def test_require_number_accepts_what_is_in_bounds():
    cfg = OmegaConf.create({"a": 1, "b": 0.5, "c": None, "d": 0})
    require_number(cfg, "a", 1, integer=True)
    require_number(cfg, "b", 0, 1, lo_open=True)
    require_number(cfg, "c", 1, integer=True, null="all")
    require_number(cfg, "d", 0, integer=True)


# ------------------------------------------------------------------------------------ weights that cannot load


class NotWeights:
    """A custom class in a pytorch_model.bin: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, superglue_root) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    saved_tiny("bert", superglue_root, folder)
    return folder


def broken(tiny_folder: Path, tmp_path: Path, how: str) -> Path:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / how))
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "not_safetensors":
        weights.write_text("this is not a safetensors file")
    else:  # a pickle that loads code, instead of safetensors
        weights.unlink()
        torch.save({"weights": NotWeights()}, folder / "pytorch_model.bin")
    return folder


MESSAGES = {
    "truncated": "model.safetensors: cannot be read (truncated or not a safetensors file: Error while deserializing "
    "header: incomplete metadata, file not fully covered)",
    "not_safetensors": "model.safetensors: cannot be read (truncated or not a safetensors file: ",
    "pickle": "pytorch_model.bin: refused: a pickle that loads code (torch weights_only); convert it to safetensors",
}


@pytest.mark.parametrize("how", list(MESSAGES))
def test_weights_that_cannot_load_are_named_with_what_is_wrong(tiny_folder, tmp_path, how):
    folder = broken(tiny_folder, tmp_path, how)
    expected = f"{folder}/{MESSAGES[how]}"
    with pytest.raises(FastformersError) as refused:
        load_finetuned(folder)
    assert str(refused.value).startswith(expected)
    spec = OmegaConf.create({"name": "t", "pretrained": str(folder), "family": "bert", "attn_implementation": "eager"})
    with pytest.raises(FastformersError) as refused:
        load_pretrained(spec, TASKS["cb"])
    assert str(refused.value).startswith(expected)


def test_intact_weights_still_load(tiny_folder):
    model, _ = load_finetuned(tiny_folder)
    assert model.config.num_hidden_layers == 2


# ---------------------------------------------------------------------------- scratch folders of killed runs


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_scratch_folders_of_gone_processes_are_kept_as_failed_folders_live_ones_left_alone(tmp_path, caplog):
    cache = StageCache(tmp_path)
    stage = tmp_path / "finetune"
    me = owner_identity()
    gone = stage / f".k1.0123abcd.{owner_tag({**me, 'pid': dead_pid()})}.tmp"
    mine = stage / f".k2.0123abcd.{owner_tag(me)}.tmp"
    elsewhere = stage / f".k3.0123abcd.{owner_tag({**me, 'pid': dead_pid(), 'host': 'not-' + me['host']})}.tmp"
    container = stage / f".k5.0123abcd.{owner_tag({**me, 'pid': dead_pid(), 'pid_ns': 1})}.tmp"  # same host name
    older = stage / f".k4.0123abcd.{dead_pid()}@{this_host()}.tmp"  # made before names held a start and namespace
    for folder in (gone, mine, elsewhere, container, older):
        (folder / "checkpoints").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="fastformers.run.cache"):
        assert cache.lookup("finetune", "k0") is None
    (failed,) = stage.glob(".k1.failed-*")  # kept for the next build of k1 to resume from
    assert (failed / "checkpoints").is_dir() and not gone.exists()
    assert mine.is_dir() and elsewhere.is_dir() and container.is_dir() and older.is_dir()
    assert [r.getMessage() for r in caplog.records if "scratch" in r.getMessage()] == [
        f"cache: the scratch folder of process {gone.name.split('.')[3].split('-')[0]}, which is gone, is kept as "
        f"{failed} (a re-run of stage finetune resumes from them)"
    ]


def test_a_build_names_its_scratch_folder_by_its_owner(tmp_path):
    cache = StageCache(tmp_path)
    with cache.build("finetune", "k1", {}) as scratch:
        assert scratch.name.endswith(f".{owner_tag(owner_identity())}.tmp") and scratch.name.startswith(".k1.")
        (scratch / "model.bin").write_bytes(b"weights")
    assert cache.lookup("finetune", "k1") is not None
    assert "." not in this_host() and socket.gethostname()
