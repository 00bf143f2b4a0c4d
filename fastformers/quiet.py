"""Dependencies' noise, silenced where it starts: each line a user sees once, no advertisements, no progress
bars for loading a few MB, no deprecation notices about the dependencies' own internals. Real warnings stay."""

from __future__ import annotations

import logging
import os
import warnings

KNOWN_NOISE = (  # (category, message regex) of warnings about dependencies' internals, not about our code
    # served records are JSON objects of any field types: the task's reader validates them, not MLflow
    (UserWarning, r".*Any type hint is inferred as AnyType.*"),
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated.*"),  # lightning's pytree shim, torch 2.13
    (Warning, r".*The number of training batches \(\d+\) is smaller than the logging interval.*"),
    # DDP: every rank validates on the whole val set (TaskDataModule), so epoch metrics need no syncing
    (Warning, r".*It is recommended to use `self.log\(.*sync_dist=True.*"),
    # a resumed training's checkpoint folder holds the earlier attempt's files by design (training.resume_point
    # clears any folder it does not resume from)
    (Warning, r".*Checkpoint directory .* exists and is not empty.*"),
)


class _Drop(logging.Filter):
    """Drops records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


def quiet_dependencies() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for copying a few small files
    import lightning.pytorch  # noqa: F401 -- first: its import installs handlers and warning filters of its own

    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # their own stderr handlers repeat what Hydra's handler prints
            logger.removeHandler(handler)
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_Drop("litlogger"))
    # training.LastCheckpoint saves full training state at every epoch end; Lightning says so at INFO each time
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").addFilter(
        _Drop("`weights_only` was not set")
    )
    # onnxruntime's quantizer asks for shape-inference pre-processing on every call; the fused graphs need none
    # (and logs two INFO lines per tensor of the static quantizer's bookkeeping to the root logger)
    logging.getLogger().addFilter(
        _Drop(
            "Please consider to run pre-processing before quantization",
            "get_tensor_type returns DefaultTensorType",
            "Quantization parameters for tensor",
        )
    )
    logging.getLogger("nncf").setLevel(logging.WARNING)  # an INFO line per operator it leaves unquantized
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars for small files
    except ImportError:
        pass
