"""What every stage of a run reads besides its inputs, built once by the pipeline: the config, the task, its data,
the engines and the run's Lightning logger. It imports no MLflow or engine code (the engines come from a factory
the pipeline passes in), so a stage's cache key, which hashes every fastformers module a stage imports, does not
change when tracking or an engine the stage never runs changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from fastformers.data.loading import DataSource
from fastformers.data.tasks import Task

if TYPE_CHECKING:  # a type only: the cache key skips it (cache._imported_modules)
    from fastformers.engines import Engine


@dataclass(frozen=True)
class StageContext:
    """A run's shared values, one for all its stages (`replace` it to swap the logger)."""

    cfg: DictConfig
    task: Task
    data: DataSource
    make_engine: Callable[[str], Engine]  # an engine by name, as configured under `engines.<name>`
    logger: Logger | None = None  # training's metrics go here (None: not logged, e.g. a DDP worker)
    engines: dict[str, Engine] = field(default_factory=dict, repr=False, compare=False)  # those made so far

    def engine(self, name: str) -> Engine:
        """The engine `name`, instantiated on first use and shared by every stage after."""
        if name not in self.engines:
            self.engines[name] = self.make_engine(name)
        return self.engines[name]


# What a stage's line on the terminal shows of a model's metrics (`*`: any one name, e.g. the split's label).
SCORES = ("best_val_score", "*/score", "*/accuracy", "*/f1", "*/f1a", "*/em")
