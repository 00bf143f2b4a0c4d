"""Stage `distill`: trains a smaller student from the fine-tuned teacher (the paper's biggest lever).

- task_specific: soft cross-entropy between teacher and student scores at a temperature, mixed with the
  hard-label loss, plus optional TinyBERT-style hidden-state and attention MSE over a layer map;
- task_agnostic: the student (e.g. a generally distilled model) is fine-tuned on the labels alone, so both
  methods compare in one sweep (`distill.method=task_specific,task_agnostic`).
The teacher's scores are computed once per example before training and reused every epoch.
"""
from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from fastformers.data import TaskDataModule, load_examples, make_loader
from fastformers.errors import FastformersError
from fastformers.models import (
    check_family,
    count_parameters,
    example_scores,
    load_finetuned,
    model_family,
    model_inputs,
    predict,
    resolve_pretrained,
    score_examples,
    task_loss,
)
from fastformers.stages.finetune import FineTuneModule, fit_best
from fastformers.tasks import Example, Task, get_task

VERSION = 1  # bump when a code change alters what this stage writes
PROVIDES = "model"
USES = ("model",)
CONFIG_KEYS = ("task", "student", "distill", "seed", "data.split_seed")
METHODS = ("task_specific", "task_agnostic")
INITS = ("teacher_layers", "pretrained", "random")
LAYER_KEY = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")  # encoder.layer.<i>. in BERT and RoBERTa


def validate(cfg: DictConfig) -> None:
    student, opts = cfg.student, cfg.distill
    if student.name == "none":
        raise FastformersError("stage 'distill' needs a student: pick one, e.g. student=minilm_l3")
    if opts.method not in METHODS:
        raise FastformersError(f"distill.method={opts.method!r} must be one of {list(METHODS)}")
    if student.init not in INITS:
        raise FastformersError(f"student.init={student.init!r} must be one of {list(INITS)}")
    if student.init == "teacher_layers" and not student.layers:
        raise FastformersError("student.layers is empty: list the teacher layers to copy, e.g. [1,3,5]")
    if student.init == "pretrained" and not student.pretrained:
        raise FastformersError("student.pretrained is required when student.init=pretrained")
    if student.activation not in ("gelu", "relu"):
        raise FastformersError(f"student.activation={student.activation!r} must be gelu or relu")
    if opts.augment < 0 or not 0 < opts.augment_rate < 1:
        raise FastformersError(f"distill.augment={opts.augment!r} must be >= 0 and distill.augment_rate="
                               f"{opts.augment_rate!r} in (0, 1)")
    if opts.temperature <= 0 or not 0 <= opts.alpha <= 1:
        raise FastformersError("distill.temperature must be > 0 and distill.alpha in [0, 1]")
    for name in ("epochs", "batch_size", "learning_rate"):
        if not opts[name] or opts[name] <= 0:
            raise FastformersError(f"distill.{name}={opts[name]!r} must be positive")


def student_from_teacher_layers(teacher, layers: list[int], activation: str):
    """A shallower copy of the teacher: embeddings, head and the listed encoder layers, in list order."""
    depth = teacher.config.num_hidden_layers
    if any(not 0 <= i < depth for i in layers):
        raise FastformersError(f"student.layers={list(layers)} must be teacher layer indices in [0, {depth})")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    config.hidden_act = activation
    student = AutoModelForSequenceClassification.from_config(config)
    state = {}
    for key, value in teacher.state_dict().items():
        match = LAYER_KEY.match(key)
        if not match:
            state[key] = value
        elif int(match.group(2)) in layers:
            state[f"{match.group(1)}{layers.index(int(match.group(2)))}{match.group(3)}"] = value
    student.load_state_dict(state)
    return student


def build_student(spec: DictConfig, teacher, teacher_tokenizer, task: Task):
    """The student and its tokenizer, from the teacher's layers, a pretrained model, or sizes."""
    if spec.init == "teacher_layers":
        return student_from_teacher_layers(teacher, list(spec.layers), spec.activation), teacher_tokenizer
    if spec.init == "pretrained":
        path = resolve_pretrained(spec.pretrained)
        family = model_family(path)
        check_family(spec, family)
        if family != teacher.config.model_type:
            raise FastformersError(f"student {spec.name} is {family!r} but the teacher is "
                                   f"{teacher.config.model_type!r}: distillation stays within one family")
        config = AutoConfig.from_pretrained(path, num_labels=task.num_labels, hidden_act=spec.activation)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, attn_implementation="eager")
        return model, AutoTokenizer.from_pretrained(path)
    config = copy.deepcopy(teacher.config)
    for key, value in dict(spec.arch).items():
        setattr(config, key, value)
    config.hidden_act = spec.activation
    return AutoModelForSequenceClassification.from_config(config), teacher_tokenizer


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy against the teacher's softened distribution, scaled by T^2 (Hinton et al.)."""
    valid = torch.isfinite(teacher)  # padded candidates are -inf in both
    targets = F.softmax(teacher / temperature, dim=-1)
    log_probs = F.log_softmax(student / temperature, dim=-1).masked_fill(~valid, 0.0)
    return -(targets * log_probs).sum(dim=-1).mean() * temperature**2


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's mapping: student layer i (1-based) learns from teacher layer i * T / S."""
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over real tokens only; `mask` broadcasts over the trailing dimensions."""
    mask = mask.to(student.dtype)
    squared = (student - teacher) ** 2 * mask
    return squared.sum() / (mask.expand_as(squared).sum().clamp(min=1))


class DistillModule(FineTuneModule):
    """Fine-tuning with a teacher: soft targets from cached scores, optional intermediate losses."""

    def __init__(self, student, teacher, task, val_examples, opts: DictConfig, layer_map: list[int],
                 prefix: str = "distill"):
        super().__init__(student, task, val_examples, opts)
        self.prefix = prefix  # metric names: `distill/...`, or `prune/...` when re-distilling a pruned model
        self.teacher = teacher.eval().requires_grad_(False)
        self.layer_map = layer_map
        self.intermediate = opts.method == "task_specific" and (opts.hidden_weight > 0 or opts.attention_weight > 0)
        width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
        self.projection = torch.nn.Linear(width_s, width_t) if width_s != width_t else torch.nn.Identity()

    def training_step(self, batch, batch_idx):
        opts = self.opts
        outputs = self.model(**model_inputs(batch), output_hidden_states=self.intermediate,
                             output_attentions=self.intermediate and opts.attention_weight > 0)
        scores = example_scores(outputs.logits, batch["group_sizes"], self.candidate_scoring)
        hard = task_loss(scores, batch)
        losses = {"hard": hard}
        if opts.method == "task_specific":
            losses["soft"] = soft_cross_entropy(scores, batch["teacher_scores"], opts.temperature)
            loss = (1 - opts.alpha) * hard + opts.alpha * losses["soft"]
            if self.intermediate:
                hidden, attention = self.intermediate_losses(batch, outputs)
                losses |= {"hidden": hidden, "attention": attention}
                loss = loss + opts.hidden_weight * hidden + opts.attention_weight * attention
        else:
            loss = hard
        size = len(batch["group_sizes"])
        self.log_dict({f"{self.prefix}/train_{k}_loss": v for k, v in losses.items()}, on_step=False,
                      on_epoch=True, batch_size=size)
        self.log(f"{self.prefix}/train_loss", loss, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def intermediate_losses(self, batch, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (embeddings + mapped layers, projected to the teacher's width) and attention maps."""
        with torch.no_grad():
            teacher_out = self.teacher(**model_inputs(batch), output_hidden_states=True,
                                       output_attentions=self.opts.attention_weight > 0)
        mask = batch["attention_mask"]
        pairs = [(0, 0)] + [(i + 1, t) for i, t in enumerate(self.layer_map)]
        hidden = sum(
            masked_mse(self.projection(outputs.hidden_states[s]), teacher_out.hidden_states[t], mask[..., None])
            for s, t in pairs
        ) / len(pairs)
        attention = hidden.new_zeros(())
        if self.opts.attention_weight > 0:
            pair_mask = (mask[:, None, :, None] * mask[:, None, None, :]).to(hidden.dtype)
            for s, t in enumerate(self.layer_map):
                student_att, teacher_att = outputs.attentions[s], teacher_out.attentions[t - 1]
                if student_att.shape[1] != teacher_att.shape[1]:  # different head counts: compare head means
                    student_att, teacher_att = student_att.mean(1, keepdim=True), teacher_att.mean(1, keepdim=True)
                attention = attention + masked_mse(student_att, teacher_att, pair_mask)
            attention = attention / len(self.layer_map)
        return hidden, attention

    def trained_parameters(self):
        return super().trained_parameters() + [(f"projection.{n}", p) for n, p in self.projection.named_parameters()]

    def on_validation_epoch_end(self):
        metrics = self.task.score(self.val_examples, self._val_preds)
        self._val_preds = []
        self.log_dict({f"{self.prefix}/val_{k}": v for k, v in metrics.items()})

    def state_dict(self, *args, **kwargs):
        """Checkpoints hold the student (and projection) only; the frozen teacher is never saved."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        return super().load_state_dict(state_dict, strict=False, **kwargs)


def augmented(examples: list[Example], copies: int, rate: float, seed: int) -> list[Example]:
    """TinyBERT's augmentation without its masked LM: `copies` perturbed versions of every example, each word
    dropped or swapped for a random word of the training text with probability `rate`. They carry no label:
    the teacher's scores are their only target, so a small task shows the student more of the teacher."""
    rng = random.Random(seed)
    vocabulary = sorted({w for e in examples for pair in e.pairs for text in pair if text for w in text.split()})

    def perturb(text: str | None) -> str | None:
        if not text:
            return text
        kept = []
        for word in text.split():
            draw = rng.random()
            if draw >= rate:
                kept.append(word)
            elif draw >= rate / 2:
                kept.append(rng.choice(vocabulary))
        return " ".join(kept) or text

    return [Example(f"{e.uid}#aug{k}", [(perturb(a), perturb(b)) for a, b in e.pairs], meta=dict(e.meta))
            for k in range(copies) for e in examples]


def predictions(model, tokenizer, task: Task, examples, max_length: int, batch_size: int) -> list[int]:
    return predict(model, make_loader(examples, tokenizer, task, max_length, batch_size))


def agreement(preds: list[int], others: list[int]) -> float:
    return sum(a == b for a, b in zip(preds, others, strict=True)) / len(preds)


def attach_teacher_scores(teacher, tokenizer, task: Task, examples, max_length: int, batch_size: int) -> None:
    loader = make_loader(examples, tokenizer, task, max_length, batch_size)
    for example, scores in zip(examples, score_examples(teacher, loader), strict=True):
        example.teacher_scores = scores


def train_student(student, tokenizer, teacher, teacher_tokenizer, task: Task, train, val, layer_map: list[int],
                  opts: DictConfig, cfg: DictConfig, out: Path,
                  prefix: str = "distill") -> tuple[float, int, float, int]:
    """The training both distillations share (this stage's, and the prune stage's from the unpruned model): the
    teacher scores the train set and its augmented copies once, then Lightning trains the student on them.
    Returns (best val score, epochs run, seconds, training examples with the copies); metrics go to `prefix/`."""
    if opts.method == "task_specific":
        train = train + augmented(train, opts.augment, opts.augment_rate, cfg.seed)
        attach_teacher_scores(teacher, teacher_tokenizer, task, train, cfg.task.max_seq_length, opts.eval_batch_size)
    module = DistillModule(student, teacher, task, val, opts, layer_map, prefix)
    data = TaskDataModule(task, tokenizer, train, val, cfg.task.max_seq_length, opts.batch_size,
                          opts.eval_batch_size, cfg.seed)
    score, epochs, seconds = fit_best(module, data, opts, cfg, out, f"{prefix}/val_score")
    return score, epochs, seconds, len(train)


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    task, opts, spec = get_task(cfg.task.name), cfg.distill, cfg.student
    read = dict(root=cfg.data.root, split_seed=cfg.data.split_seed, download=cfg.data.download)
    train = load_examples(task, spec=cfg.task.train_split, **read)
    val = load_examples(task, spec=opts.val_split, **read)
    teacher, teacher_tokenizer = load_finetuned(inputs["model"] / "model")
    L.seed_everything(cfg.seed, workers=True)
    student, tokenizer = build_student(spec, teacher, teacher_tokenizer, task)
    if opts.method == "task_specific" and (opts.hidden_weight > 0 or opts.attention_weight > 0) \
            and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise FastformersError(f"student {spec.name}: intermediate losses need the teacher's tokenizer; "
                               "set distill.hidden_weight=0 distill.attention_weight=0")
    max_length = cfg.task.max_seq_length
    teacher_preds = predictions(teacher, teacher_tokenizer, task, val, max_length, opts.eval_batch_size)
    initial_preds = predictions(student, tokenizer, task, val, max_length, opts.eval_batch_size)

    layer_map = list(opts.layer_map) if opts.layer_map else uniform_layer_map(
        student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    student_score, epochs, seconds, train_examples = train_student(
        student, tokenizer, teacher, teacher_tokenizer, task, train, val, layer_map, opts, cfg, out)
    student.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    student_preds = predictions(student, tokenizer, task, val, max_length, opts.eval_batch_size)
    teacher_score = task.score(val, teacher_preds)["score"] if any(e.label is not None for e in val) else float("nan")
    return {
        "best_val_score": student_score,
        "teacher_val_score": teacher_score,
        "delta_to_teacher": student_score - teacher_score,
        "agreement_with_teacher": agreement(student_preds, teacher_preds),
        "initial_agreement_with_teacher": agreement(initial_preds, teacher_preds),
        "student_parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "student_layers": student.config.num_hidden_layers,
        "student_hidden_size": student.config.hidden_size,
        "teacher_layers": teacher.config.num_hidden_layers,
        "teacher_hidden_size": teacher.config.hidden_size,
        "epochs_run": epochs,
        "train_seconds": seconds,
        "train_examples": train_examples,  # with the augmented copies
    }
