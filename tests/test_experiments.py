"""Every named experiment in conf/experiment/ composes into a config every stage accepts (the checks that run
before any work), each row of the BoolQ ablation too, and `experiment=quick` runs end to end."""

from pathlib import Path

import pytest

from fastformers import pipeline
from fastformers.cli import CONF_DIR

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
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_every_stage_check(make_cfg, experiment):
    job = ["+ablation=baseline"] if experiment == "boolq_ablation" else []  # its jobs' run names need their row
    cfg = make_cfg(f"experiment={experiment}", *job)
    stages = pipeline.validate(cfg)
    assert len(stages) == len(cfg.stages)


@pytest.mark.parametrize("row", ABLATION_ROWS)
def test_every_ablation_row_composes_and_passes_every_stage_check(make_cfg, row):
    cfg = make_cfg("experiment=boolq_ablation", f"+ablation={row}")
    assert len(pipeline.validate(cfg)) == len(cfg.stages) and cfg.row.name == row


def test_the_quick_experiment_runs_end_to_end(make_cfg):
    results = pipeline.run(make_cfg("experiment=quick", "task=rte"))
    assert 0.0 <= results["evaluate/val/score"] <= 1.0 and results["finetune/epochs_run"] >= 1
