"""Config values checked up front, before any work: every key that resolves, and each number a stage reads of the
right type and within its bounds (a string such as `pruning.heads=abc` is refused by name, not met later as a
TypeError deep inside a stage)."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastformers.errors import FastformersError


def check_config(cfg: DictConfig) -> None:
    """The run's own keys, checked with nothing heavy imported (the CLI calls this before importing the pipeline,
    so a typo fails in a second or two, not after torch, lightning and mlflow have loaded)."""
    check_resolvable(cfg)
    require_number(cfg, "seed", integer=True)
    require_number(cfg, "data.split_seed", integer=True)
    require_number(cfg, "task.max_seq_length", 1, integer=True, meaning="the most tokens of a row")
    for axis, what in (("heads", "attention heads"), ("ffn", "FFN neurons")):
        require_number(
            cfg, f"pruning.{axis}", 0, 1, lo_open=True, meaning=f"the fraction of {what} KEPT in every layer"
        )
    student_family = cfg.student.get("family")
    if student_family and student_family != cfg.teacher.family:
        raise FastformersError(
            f"student.family={student_family!r} differs from teacher.family="
            f"{cfg.teacher.family!r}: distillation stays within one family"
        )
    if (cfg.pruning.heads != 1.0 or cfg.pruning.ffn != 1.0) and "prune" not in cfg.stages:
        raise FastformersError(
            f"pruning.heads={cfg.pruning.heads} pruning.ffn={cfg.pruning.ffn} needs the prune "
            "stage: add it after the model it prunes, e.g. stages=[finetune,distill,prune,evaluate]"
        )
    if not cfg.stages:
        raise FastformersError("stages is empty: name at least one, e.g. stages=[finetune,evaluate]")
    require_distinct(list(cfg.stages), "stages")


def first_line(err: BaseException) -> str:
    """An exception's message without the `full_key:` / `object_type=` lines OmegaConf appends."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_resolvable(cfg: DictConfig) -> None:
    """Every interpolation resolves (`${...}` to a key that exists, an environment variable that is set ...)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise FastformersError(f"{key or 'config'}: {first_line(err)}") from None


def require_number(
    cfg: DictConfig,
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    integer: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
    null: str | None = None,
    meaning: str = "",
) -> None:
    """`key` holds a finite number (`integer`: an int) within [lo, hi] (an open end with lo_open / hi_open); with
    `null` (what null means, e.g. "all"), null is accepted too. Booleans are not numbers here. The message names
    the key and value and says what is expected, e.g. "pruning.heads='abc' must be a number in (0, 1]"."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise FastformersError(f"{key}: {first_line(err)}") from None
    if value is None and null is not None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = (
        number
        and math.isfinite(value)
        and (isinstance(value, int) or not integer)
        and (lo is None or value > lo or (value == lo and not lo_open))
        and (hi is None or value < hi or (value == hi and not hi_open))
    )
    if not fits:
        wanted = requirement(lo, hi, integer, lo_open, hi_open) + (f" (or null = {null})" if null is not None else "")
        raise FastformersError(f"{key}={value!r} must be {wanted}" + (f": {meaning}" if meaning else ""))


def requirement(lo: float | None, hi: float | None, integer: bool, lo_open: bool, hi_open: bool) -> str:
    """What `require_number` asks for, in words: "a positive integer", "a number in [0, 1)", "a number >= 0"."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        if (lo == 0 and lo_open) or (integer and lo == 1 and not lo_open):
            return "a positive integer" if integer else "a positive number"
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def require_distinct(names: list[str], key: str) -> None:
    """No name listed twice, e.g. "stages: 'finetune' is listed twice"."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FastformersError(f"{key}: {name!r} is listed twice")
        seen.add(name)
