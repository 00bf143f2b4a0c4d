"""The stages a run can chain, by name, and the rules of chaining them. Each module is one stage with one entry,
`run(ctx, inputs, out) -> metrics` (ctx: the run's `StageContext`), and declares what it provides (e.g. a model),
what it uses, which config keys define its output and what the terminal shows of its metrics: the `Stage`
protocol below, which every module here satisfies. The pipeline names no stage; this registry does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig, open_dict

from fastformers.context import StageContext
from fastformers.errors import FastformersError
from fastformers.stages import benchmark, distill, evaluate, export, finetune, prune, teacher

log = logging.getLogger(__name__)


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

    @property
    def HEADLINE(self) -> tuple[str, ...]:  # the metrics its line on the terminal shows (`*`: any one name)
        ...

    def summary(self, metrics: dict[str, float]) -> list[str]:
        """The lines the run's closing summary shows of this stage's metrics (none for most)."""
        ...

    def uses(self, cfg: DictConfig) -> tuple[str, ...]:
        """The outputs of earlier stages this one reads, for this config."""
        ...

    def validate(self, cfg: DictConfig) -> None:
        """Every check that needs no data or model: a bad config fails before minutes of work."""
        ...

    def run(self, ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
        """Builds the output in `out` from the `inputs` folders; returns its metrics."""
        ...


STAGES: dict[str, Stage] = {  # in the order a run chains them, which is also the order of the summary's lines
    "teacher": teacher,  # your own fine-tuned model (teacher.pretrained) as the teacher, instead of finetune
    "finetune": finetune,
    "distill": distill,
    "prune": prune,
    "export": export,
    "evaluate": evaluate,
    "benchmark": benchmark,
}
GIVEN_TEACHER = "teacher"  # the stage that takes teacher.pretrained, a fine-tuned model, as the teacher as it is
TRAINS_TEACHER = "finetune"


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise FastformersError(f"stages: unknown stage {name!r}; choose from {list(STAGES)}")
    return STAGES[name]


def in_chain_order(names) -> list[str]:
    """`names` in the order the registry chains stages."""
    return sorted(names, key=list(STAGES).index)


def check_chain(cfg: DictConfig) -> None:
    """Stages that exclude each other (a pruning setting without the prune stage is refused earlier, by
    checks.check_config, before anything heavy is imported)."""
    if TRAINS_TEACHER in cfg.stages and GIVEN_TEACHER in cfg.stages:
        raise FastformersError("stages: 'finetune' and 'teacher' both make the teacher; keep one of them")


def start_from_given_teacher(cfg: DictConfig, made_by_earlier: tuple[str, ...]) -> None:
    """A run whose first stage needs a model that no stage makes (e.g. stages=[distill,prune,export,evaluate])
    starts from teacher.pretrained, the user's own fine-tuned model, as it is: the `teacher` stage is put in
    front, in `cfg.stages` itself, so the run's stage lines, cache and MLflow params all say what ran.
    `made_by_earlier`: the outputs a stage may need that only an earlier stage makes."""
    names = list(cfg.stages)
    if TRAINS_TEACHER in names or GIVEN_TEACHER in names or not cfg.teacher.get("pretrained"):
        return
    if not set(made_by_earlier) & set(get_stage(names[0]).uses(cfg)):
        return
    log.info("stages: no finetune stage: the teacher is teacher.pretrained=%s as it is", cfg.teacher.pretrained)
    with open_dict(cfg):
        cfg.stages = [GIVEN_TEACHER, *names]
