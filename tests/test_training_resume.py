"""Training resumes: a training stage whose output folder holds an earlier attempt's `checkpoints/last.ckpt`
continues from it, and ends with the weights an uninterrupted run ends with (same batches, same dropout)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastformers import errors
from fastformers.data.loading import TrainOrder
from fastformers.run.pipeline import context_of
from fastformers.stages import finetune
from fastformers.training.fit import CHECKPOINTS, LAST, EpochLine, FineTuneModule
from tests.helpers import saved_tiny

EPOCHS = ["finetune.epochs=3", "finetune.batch_size=8"]  # tiny_bert (dropout 0.1) on the 48 CB fixture examples


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-5), name


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """The training steps run so far (one entry per batch), by wrapping FineTuneModule.training_step."""
    counted: list[int] = []
    real = FineTuneModule.training_step

    def counting(self, batch, batch_idx):
        counted.append(self.trainer.current_epoch)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(FineTuneModule, "training_step", counting)
    return counted


@pytest.fixture
def keep_checkpoints(monkeypatch) -> None:
    """The stage keeps its checkpoints, so a test can read the last epoch's weights."""
    monkeypatch.setattr(finetune, "drop_checkpoints", lambda out: None)


@pytest.fixture
def teacher(superglue_root, tmp_path) -> str:
    """A tiny model saved as a pretrained one: its tokenizer is fixed (a random-init teacher trains its own, and
    the tokenizers library breaks ties differently from run to run), so two runs can be compared."""
    saved_tiny("bert", superglue_root, tmp_path / "pretrained")
    return f"teacher.pretrained={tmp_path / 'pretrained'}"


def last_epoch_weights(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / CHECKPOINTS / LAST, weights_only=False)["state_dict"]
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


@pytest.fixture
def uninterrupted(make_cfg, tmp_path, steps, teacher) -> dict[str, torch.Tensor]:
    """The reference: the same config trained in one go; the best epoch's and the last epoch's weights."""
    finetune.run(context_of(make_cfg(*EPOCHS, teacher)), {}, tmp_path / "uninterrupted")
    assert steps
    steps.clear()
    return weights(tmp_path / "uninterrupted")


def vocabulary_of(out: Path) -> dict[str, int]:
    return json.loads((out / "model" / "tokenizer.json").read_text())["model"]["vocab"]


def best_epoch_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The best epoch's weights as ModelCheckpoint saved them, named as in the saved model."""
    (best,) = folder.glob("epoch=*.ckpt")
    state = torch.load(best, weights_only=True)["state_dict"]
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def test_a_failure_after_training_keeps_the_checkpoints_and_a_rerun_only_restores_the_best_epoch(
    make_cfg, tmp_path, monkeypatch, steps
):
    real_fit = finetune.fit_best

    def fit_then_fail(*args, **kwargs):
        real_fit(*args, **kwargs)
        raise RuntimeError("disk full while saving")

    out = tmp_path / "attempts"
    monkeypatch.setattr(finetune, "fit_best", fit_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        finetune.run(
            context_of(make_cfg(*EPOCHS)), {}, out
        )  # a random-init teacher: its tokenizer is trained on the task
    assert (out / CHECKPOINTS / LAST).is_file() and len(steps) == 18  # 3 epochs of 6 batches
    trained = best_epoch_weights(out / CHECKPOINTS)
    vocabulary = vocabulary_of(out)
    monkeypatch.setattr(finetune, "fit_best", real_fit)
    steps.clear()

    metrics = finetune.run(context_of(make_cfg(*EPOCHS)), {}, out)
    assert steps == []  # nothing trained again
    assert metrics["epochs_run"] == 3 and metrics["train_seconds"] > 0
    assert_same_weights(weights(out), trained)
    assert vocabulary_of(out) == vocabulary  # the data read as the checkpoint learned
    assert not (out / CHECKPOINTS).exists()


def test_a_run_stopped_mid_epoch_resumes_from_the_last_epoch_end_and_matches_an_uninterrupted_run(
    make_cfg, tmp_path, monkeypatch, steps, teacher, keep_checkpoints, uninterrupted
):
    """The last epoch's weights are compared too: the best epoch may be an early one."""
    real_batch_end = EpochLine.on_train_batch_end

    def sigterm_in_epoch_2(self, trainer, *args):
        if trainer.current_epoch == 1 and len(steps) == 9:  # half-way through the second epoch
            errors.STOP_SIGNALS.append(15)  # what the SIGTERM handler records
        real_batch_end(self, trainer, *args)

    out = tmp_path / "attempts"
    monkeypatch.setattr(EpochLine, "on_train_batch_end", sigterm_in_epoch_2)
    monkeypatch.setattr(errors, "STOP_SIGNALS", [])
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns the KeyboardInterrupt into exit 1
        finetune.run(context_of(make_cfg(*EPOCHS, teacher)), {}, out)
    assert (out / CHECKPOINTS / LAST).is_file() and not (out / "model").exists()
    errors.STOP_SIGNALS.clear()
    steps.clear()

    finetune.run(context_of(make_cfg(*EPOCHS, teacher)), {}, out)
    assert steps == [1] * 6 + [2] * 6  # the interrupted epoch again from its start, then the last one
    assert_same_weights(weights(out), uninterrupted)
    assert_same_weights(last_epoch_weights(out), last_epoch_weights(tmp_path / "uninterrupted"))


def test_an_epochs_batches_depend_on_the_seed_and_epoch_only():
    lengths = [5, 40, 12, 33, 7, 20, 18, 3, 25, 9] * 3
    fresh, resumed = TrainOrder(lengths, 4, seed=7, grouped=True), TrainOrder(lengths, 4, seed=7, grouped=True)
    fresh.set_epoch(0)
    first = list(fresh)
    fresh.set_epoch(2)
    resumed.set_epoch(2)
    assert list(fresh) == list(resumed) != first
