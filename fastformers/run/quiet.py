"""Dependencies' noise, silenced where it starts: each line a user sees once, no advertisements, no progress
bars for loading a few MB, no deprecation notices about the dependencies' own internals, no INFO lines about
what a library found or did. Real warnings stay: only the exact messages and loggers named here are dropped.
`fastformers -v` (or `hydra.verbose=true`) skips all of it and shows everything the dependencies say."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

VERBOSE_ENV = "FASTFORMERS_VERBOSE"  # set by `-v` / hydra.verbose; inherited by spawned instances and DDP ranks

KNOWN_NOISE = (  # (category, message regex) of warnings about dependencies' internals, not about our code
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated.*"),  # lightning's pytree shim, torch 2.13
    (Warning, r".*The number of training batches \(\d+\) is smaller than the logging interval.*"),
    # DDP: every rank validates on the whole val set (TaskDataModule), so epoch metrics need no syncing
    (Warning, r".*It is recommended to use `self.log\(.*sync_dist=True.*"),
    # a resumed training's checkpoint folder holds the earlier attempt's files by design (training.resume_point
    # clears any folder it does not resume from)
    (Warning, r".*Checkpoint directory .* exists and is not empty.*"),
    # distillation holds the frozen teacher in eval mode inside the trained module, by design (training/fit.py)
    (Warning, r".*Found \d+ module\(s\) in eval mode at the start of training.*"),
)
# Warnings a library shows through its own `catch_warnings(); simplefilter("once")`, which puts them ahead of any
# filter: dropped where they are shown instead.
FORCED_NOISE = (
    # MLflow, when serving.py defines the served model: its records are JSON objects of any field types, which the
    # task's reader validates, not MLflow
    (UserWarning, re.compile(r".*Any type hint is inferred as AnyType")),
)
QUIET_LOGGERS = (  # INFO lines about what a library found or did; their warnings and errors still show
    "mlflow.store.db.utils",  # "Creating initial MLflow database tables...", "Updating database tables"
    "lightning.pytorch.utilities.rank_zero",  # GPU/TPU available, train_dataloader, litlogger tips, fit stopped
    "lightning.fabric.utilities.seed",  # "Seed set to 42"
)  # (NNCF's own: engines/openvino_engine.nncf_quiet; creating its logger here would bypass its logger class)
# onnxruntime's quantizer logs to the root logger: it asks for shape-inference pre-processing on every call (the
# fused graphs need none), and logs bookkeeping per tensor it leaves in float (LayerNorm outputs, shape tensors)
ROOT_NOISE = (
    "Please consider to run pre-processing before quantization",
    "failed to infer the type of tensor",
    "get_tensor_type returns DefaultTensorType",
    "Quantization parameters for tensor",
)


def verbose() -> bool:
    """Whether this command asked for the dependencies' own output (`-v`, hydra.verbose)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Drop(logging.Filter):
    """Drops records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


def quiet_dependencies() -> None:
    """Installs every silencer below, unless the command is verbose; call it before importing the pipeline, since
    some noise is raised while modules are imported."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for copying a few small files
    import lightning.pytorch  # noqa: F401 -- first: its import installs handlers and warning filters of its own

    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    _drop_forced_warnings()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # their own stderr handlers repeat what Hydra's handler prints
            logger.removeHandler(handler)
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # training.LastCheckpoint saves full training state at every epoch end; Lightning says so at INFO each time
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(
        _Drop("`weights_only` was not set")
    )
    logging.getLogger().addFilter(_Drop(*ROOT_NOISE))
    for name in onnxruntime_optimizer_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars for small files
    except ImportError:
        pass


def _drop_forced_warnings() -> None:
    """Wraps `warnings.showwarning` so that the FORCED_NOISE messages are not shown; everything else is shown as
    before (by whatever showwarning was installed)."""
    shown = warnings.showwarning
    if getattr(shown, "drops_forced_noise", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not is_forced_noise(message, category):
            shown(message, category, filename, lineno, file, line)

    showwarning.drops_forced_noise = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def is_forced_noise(message: Warning | str, category: type[Warning]) -> bool:
    return any(issubclass(category, kind) and pattern.match(str(message)) for kind, pattern in FORCED_NOISE)


def onnxruntime_optimizer_loggers() -> list[str]:
    """The loggers of onnxruntime's transformer optimizer (export), found without importing it: one per module of
    onnxruntime/transformers/, named by the bare module name (that folder is put on sys.path) or the dotted one.
    Each logs INFO lines per fusion ("Fused Attention: 2", "Removed 66 nodes", "Model saved to ...")."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "transformers"
    return [name for path in folder.glob("*.py") for name in (path.stem, f"onnxruntime.transformers.{path.stem}")]
