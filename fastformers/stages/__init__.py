"""The stages a run can chain, by name. Each module is one stage with one entry, `run(cfg, inputs, out) ->
metrics`, and declares what it provides (e.g. a model), what it uses, and which config keys define its output:
the `Stage` protocol below, which every module here satisfies."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from fastformers.errors import FastformersError


class Stage(Protocol):
    """What every module in this package is (read-only members, so a module's `PROVIDES = "model"` fits)."""

    @property
    def VERSION(self) -> int:  # bumped to rebuild entries the code hash would keep (e.g. a data-format change)
        ...

    @property
    def PROVIDES(self) -> str | None:  # the output later stages may use ("model", "onnx", "pick"), if any
        ...

    @property
    def CONFIG_KEYS(self) -> tuple[str, ...]:  # the config keys whose resolved values define the output
        ...

    @property
    def CACHED(self) -> bool:  # False for measurements (timings), taken afresh in every run
        ...

    @property
    def DISTRIBUTED(self) -> bool:  # True for training: under DDP every rank runs it (rank 0 writes the entry)
        ...

    def uses(self, cfg: DictConfig) -> tuple[str, ...]:
        """The outputs of earlier stages this one reads, for this config."""
        ...

    def validate(self, cfg: DictConfig) -> None:
        """Every check that needs no data or model: a bad config fails before minutes of work."""
        ...

    def run(self, cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
        """Builds the output in `out` from the `inputs` folders; returns its metrics."""
        ...


def _stages() -> dict[str, Stage]:
    from fastformers.stages import benchmark, distill, evaluate, export, finetune, prune, teacher

    return {
        "teacher": teacher,  # your own fine-tuned model (teacher.pretrained) as the teacher, instead of finetune
        "finetune": finetune,
        "distill": distill,
        "prune": prune,
        "export": export,
        "evaluate": evaluate,
        "benchmark": benchmark,
    }


def get_stage(name: str) -> Stage:
    stages = _stages()
    if name not in stages:
        raise FastformersError(f"stages: unknown stage {name!r}; choose from {list(stages)}")
    return stages[name]
