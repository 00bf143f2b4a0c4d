"""What several test files share and that is no pytest fixture: the real config tree shrunk for tests, tiny
models saved the way the stages save them, the MLflow runs of a config or a store, the CLI in a subprocess, and
the evaluate stage's written predictions scored again (tests/conftest.py keeps the fixtures)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fastformers.data.loading import fingerprint, load_examples, texts_of
from fastformers.data.task_config import task_of
from fastformers.data.tasks import TASKS
from fastformers.models.loading import build_random, load_finetuned
from fastformers.run import pipeline
from fastformers.run.cache import StageCache, cache_key
from fastformers.run.cli import CONF_DIR
from fastformers.tracking import runs as tracking

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "superglue"

# ------------------------------------------------------------------------------------------- configs and models

LAYERS, HIDDEN, HEADS, FFN = 2, 64, 4, 128  # the tiny models' shape (conf/teacher/tiny_bert.yaml's)


def compose_cfg(superglue_root: Path, output_dir: Path, *overrides: str) -> DictConfig:
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


def tiny_spec(family: str, hidden: int = HIDDEN, heads: int = HEADS, ffn: int = FFN, layers: int = LAYERS,
              vocab: int = 500) -> DictConfig:  # fmt: skip
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


def pair_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """Two sentence pairs of different lengths: a padded batch for comparing models' logits."""
    return dict(
        tokenizer(
            ["the cat sat on the mat", "a dog ran in the park all day"],
            ["yes", "no it did not"],
            padding=True,
            return_tensors="pt",
        )
    )


def masks_keeping(heads, neurons) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 masks that switch off every head and neuron not listed (per layer)."""
    head_mask, ffn_mask = torch.zeros(LAYERS, HEADS), torch.zeros(LAYERS, FFN)
    for layer, (h, n) in enumerate(zip(heads, neurons)):
        head_mask[layer, h], ffn_mask[layer, n] = 1.0, 1.0
    return head_mask, ffn_mask


# ------------------------------------------------------------------------------------------------------ MLflow


def mlflow_runs(cfg):
    """(client, the runs of the config's experiment, oldest first)."""
    client = MlflowClient(tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def store(cwd: Path) -> str:
    """The default local MLflow store of a CLI job run in `cwd`."""
    return f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}"


def runs_of(uri: str, experiment: str):
    """(client, the runs of `experiment` in the store at `uri`, oldest first)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def rescored(cfg: DictConfig, split: str = "val") -> tuple[dict[str, float], int]:
    """The metrics of the predictions the latest run's evaluate stage wrote for `split`, scored again against the
    split's examples in their order (uids checked), and how many there were: the logged score must be these."""
    _, runs = mlflow_runs(cfg)
    written = Path(runs[-1].data.tags["cache.evaluate.path"]) / f"predictions_{split}.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    task = task_of(cfg)
    examples = load_examples(task, cfg.data.root, split, cfg.data.split_seed, cfg.data.download)
    assert [row["uid"] for row in rows] == [example.uid for example in examples], "predictions out of order"
    return task.score(examples, [row["prediction"] for row in rows]), len(rows)


# --------------------------------------------------------------------------------------------- the CLI as a user

TINY = ["teacher=tiny_bert", "finetune.epochs=1", "finetune.batch_size=8", "distill.epochs=1"]
QUICK_BENCHMARK = [
    "benchmark.repeats=1",
    "benchmark.latency_examples=4",
    "benchmark.warmup_batches=1",
    "precision.min_agreement=0.5",
]  # random tiny models: int8 parity is not what is tested here
TINY_SWEEP = TINY + ["experiment=pruning_sweep", "student.layers=[1]", "pruning.ffn=0.5"] + QUICK_BENCHMARK


def cli(*args, cwd: Path, timeout=600, wait=True):
    """`fastformers ARGS` in a subprocess from `cwd`: its completed process (asserted to exit 0), or with
    wait=False the running one (its own process group, output in cwd/job.log)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "fastformers.run.cli", *args]
    if not wait:  # output to a file: an unread pipe fills up and blocks the job
        log = (cwd / "job.log").open("w")
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------ another job holding a build lock (DDP)

WAITING = "stage distill: waiting"  # what cache.claimed prints while another job holds the lock


class HeldStage:
    """A stage that, once its build lock is held, waits until the DDP job's rank 0 waits for that lock (its
    line in the job's log), then builds as usual: the lock is surely held while rank 0 reaches the stage."""

    def __init__(self, stage: Any, job_log: Path, held: Path, patience: float):
        self.stage, self.job_log, self.held, self.patience = stage, job_log, held, patience

    def run(self, ctx: Any, inputs: dict[str, Path], out: Path) -> Any:
        self.held.touch()
        deadline = time.monotonic() + self.patience
        while WAITING not in self.job_log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the DDP job never waited for the distill lock ({self.job_log})")
            time.sleep(0.2)
        return self.stage.run(ctx, inputs, out)


def hold_distill_then_build(overrides: list[str], job_log: str, held: str, patience: float = 600.0) -> None:
    """Another job of a sweep: takes the distill entry's build lock of the DDP job given by `overrides` (the
    cache's own API, through pipeline.run_cached), holds it until that job's rank 0 waits for it, then builds
    the entry on one process (the DDP job's finetune entry as its teacher) and releases the lock."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    stages = pipeline.validate(cfg)
    cache = StageCache(Path(cfg.paths.cache_dir).resolve())
    data_print = fingerprint(cfg.data.root, task_of(cfg))
    provided: dict = {}
    for name, stage in zip(cfg.stages, stages):
        inputs = {need: provided[need] for need in stage.uses(cfg)}
        payload = pipeline.stage_payload(cfg, name, stage, data_print, inputs)
        key = cache_key(payload)
        if name == "distill":
            one = cast(  # one process, its own MLflow run (the key above is the DDP job's)
                DictConfig,
                OmegaConf.merge(
                    cfg,
                    {
                        "hardware": {"devices": 1, "num_nodes": 1, "strategy": "auto"},
                        "mlflow": {"experiment_name": "other"},
                    },
                ),
            )
            holder = HeldStage(stage, Path(job_log), Path(held), patience)
            with tracking.start_run(one):  # a job's own run (the training logs into it), ended FINISHED
                ctx = pipeline.context_of(one, logger=tracking.lightning_logger(one))
                held_stage = cast(Any, holder)  # a stage module in all but name: run_cached calls only its run
                pipeline.run_cached(cache, name, key, held_stage, ctx, inputs, payload, "another-job")
            return
        pipeline.record_output(provided, stage, cache.entry(name, key), key)
