"""Every named experiment in conf/experiment/ composes into a config every stage accepts (the checks that run
before any work), each row of the BoolQ ablation too, and `experiment=quick` runs end to end."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastformers.bench.settings import plan_settings
from fastformers.data.fixtures import SIZES
from fastformers.errors import FastformersError
from fastformers.run import pipeline
from fastformers.run.cli import CONF_DIR
from tests.helpers import rescored

EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
ABLATION_ROWS = sorted(path.stem for path in (Path(CONF_DIR) / "ablation").glob("*.yaml"))
SET_BY_THE_TESTS = ("teacher", "data", "paths", "finetune.epochs", "finetune.batch_size")  # make_cfg's overrides


def declared_values(value, keys: tuple = ()):
    """(keys, value) of every plain value a config file sets itself (its defaults list, Hydra's settings and
    interpolations left out): what must be in effect once the file is composed."""
    if isinstance(value, dict):
        for key, child in value.items():
            if keys or key not in ("defaults", "hydra"):
                yield from declared_values(child, (*keys, key))
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) or _interpolated(item) for item in value):
        for index, child in enumerate(value):
            yield from declared_values(child, (*keys, index))
    elif not _interpolated(value) and not ".".join(map(str, keys)).startswith(SET_BY_THE_TESTS):
        yield keys, value


def _interpolated(value) -> bool:
    return isinstance(value, str) and "${" in value


def overridden(cfg, path: Path) -> list[str]:
    """The values the file at `path` sets that the composed config does not hold (e.g. a defaults list applied
    after them, or a key misspelt so that it lands beside the one meant)."""
    composed = OmegaConf.to_container(cfg, resolve=True)
    wrong = []
    for keys, value in declared_values(OmegaConf.to_container(OmegaConf.load(path))):
        node = composed
        for key in keys:
            node = node[key] if isinstance(node, (dict, list)) and (isinstance(node, list) or key in node) else None
        if node != value:
            wrong.append(f"{'.'.join(map(str, keys))}={value!r} composed as {node!r}")
    return wrong


def test_the_experiment_list_is_what_the_docs_name():
    assert {
        "quick",
        "benchmark",
        "speed",
        "pruning_sweep",
        "pruning_search",
        "boolq_ablation",
        "superglue_table",
        "gpu_speed",
        "own_data",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_every_stage_check(make_cfg, experiment):
    job = ["+ablation=baseline"] if experiment == "boolq_ablation" else []  # its jobs' run names need their row
    cfg = make_cfg(f"experiment={experiment}", *job)
    if experiment == "gpu_speed" and not torch.cuda.is_available():  # trains on the GPU: refused up front
        with pytest.raises(FastformersError, match=r"(CUDA device|CUDAExecutionProvider)"):
            pipeline.validate(cfg)
        cfg = make_cfg(f"experiment={experiment}", "hardware=cpu", "precision=fp32")
    pipeline.validate(cfg)
    assert overridden(cfg, Path(CONF_DIR) / "experiment" / f"{experiment}.yaml") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_the_gpu_rows_say_why_they_are_skipped_without_a_gpu(make_cfg):
    rows = {
        s.name: s.skipped for s in plan_settings(make_cfg("experiment=gpu_speed", "hardware=cpu", "precision=fp32"))
    }
    assert rows["baseline"] is None
    for name in ("torch_cuda_fp16", "torch_cuda_bf16"):
        assert "runs on a CUDA GPU" in rows[name] and "sees none" in rows[name]
    assert "CUDAExecutionProvider" in rows["onnx_cuda_fp16"] and "onnxruntime-gpu" in rows["onnx_cuda_fp16"]


@pytest.mark.parametrize("row", ABLATION_ROWS)
def test_every_ablation_row_composes_and_passes_every_stage_check(make_cfg, row):
    cfg = make_cfg("experiment=boolq_ablation", f"+ablation={row}")
    pipeline.validate(cfg)
    assert overridden(cfg, Path(CONF_DIR) / "ablation" / f"{row}.yaml") == []


@pytest.mark.slow
def test_the_quick_experiment_runs_end_to_end(make_cfg):
    cfg = make_cfg("experiment=quick", "task=rte")
    results = pipeline.run(cfg)
    metrics, count = rescored(cfg)  # the predictions it wrote, scored again
    assert count == SIZES["val"] and results["evaluate/val/score"] == pytest.approx(metrics["score"])
    assert results["finetune/epochs_run"] == cfg.finetune.epochs  # patience null: every epoch runs
    # evaluate scores the epoch finetune kept, on the split finetune chose it by (one example of 18 at most)
    assert results["evaluate/val/score"] == pytest.approx(results["finetune/best_val_score"], abs=1.5 / SIZES["val"])


def test_the_slurm_cluster_config_trains_one_process_per_gpu_of_every_node():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["cluster=slurm_ddp"], return_hydra_config=True)
    launcher, hardware = cfg.hydra.launcher, cfg.hardware
    assert launcher._target_.endswith("SlurmLauncher") and hardware.strategy == "ddp"
    assert (hardware.devices, hardware.num_nodes) == (launcher.tasks_per_node, launcher.nodes)
    assert launcher.gpus_per_node == launcher.tasks_per_node and hardware.accelerator == "gpu"
