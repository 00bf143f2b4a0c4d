"""Every named experiment in conf/experiment/ composes into a config every stage accepts (the checks that run
before any work), each row of the BoolQ ablation too, and `experiment=quick` runs end to end."""

from pathlib import Path

import pytest
import torch

from fastformers import pipeline
from fastformers.bench.settings import plan_settings
from fastformers.cli import CONF_DIR
from fastformers.errors import FastformersError

EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
ABLATION_ROWS = sorted(path.stem for path in (Path(CONF_DIR) / "ablation").glob("*.yaml"))


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
    stages = pipeline.validate(cfg)
    assert len(stages) == len(cfg.stages)


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
    assert len(pipeline.validate(cfg)) == len(cfg.stages) and cfg.row.name == row


def test_the_quick_experiment_runs_end_to_end(make_cfg):
    results = pipeline.run(make_cfg("experiment=quick", "task=rte"))
    assert 0.0 <= results["evaluate/val/score"] <= 1.0 and results["finetune/epochs_run"] >= 1


def test_the_slurm_cluster_config_trains_one_process_per_gpu_of_every_node():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["cluster=slurm_ddp"], return_hydra_config=True)
    launcher, hardware = cfg.hydra.launcher, cfg.hardware
    assert launcher._target_.endswith("SlurmLauncher") and hardware.strategy == "ddp"
    assert (hardware.devices, hardware.num_nodes) == (launcher.tasks_per_node, launcher.nodes)
    assert launcher.gpus_per_node == launcher.tasks_per_node and hardware.accelerator == "gpu"
