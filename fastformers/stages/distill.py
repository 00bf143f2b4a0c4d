"""Stage `distill`: trains a smaller student from the fine-tuned teacher (the paper's biggest lever).

- task_specific: soft cross-entropy between teacher and student scores at a temperature, mixed with the
  hard-label loss, plus optional TinyBERT-style hidden-state and attention MSE over a layer map;
- task_agnostic: the student (e.g. a generally distilled model) is fine-tuned on the labels alone, so both
  methods compare in one sweep (`distill.method=task_specific,task_agnostic`).
The teacher's scores are computed once per example before training and reused every epoch.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from fastformers.context import SCORES, StageContext
from fastformers.data.tasks import Task
from fastformers.errors import FastformersError
from fastformers.models.loading import (
    FAMILIES,
    check_family,
    count_parameters,
    load_finetuned,
    model_family,
    readable_weights,
    resolve_pretrained,
)
from fastformers.models.modeling_fastformers import LAYER_FFN, LAYER_HEADS, shrink_to_config
from fastformers.models.pruning import family_layout
from fastformers.training.fit import (
    TRAINING_KEYS,
    agreement,
    check_distillation,
    check_training,
    drop_checkpoints,
    predictions,
    train_student,
    uniform_layer_map,
)

VERSION = 1  # a manual override: the code itself is part of the cache key (pipeline.stage_modules)
PROVIDES = "model"
CACHED = True
DISTRIBUTED = True  # trains: under DDP (hardware=ddp) every rank joins its fit
CONFIG_KEYS = ("task", "student", "distill", *TRAINING_KEYS)
METHODS = ("task_specific", "task_agnostic")
INITS = ("teacher_layers", "pretrained", "random")
HEADLINE = SCORES
LAYER_KEY = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")  # encoder.layer.<i>. (DistilBERT: transformer.layer.<i>.)


def uses(cfg: DictConfig) -> tuple[str, ...]:
    return ("model",)


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
    check_training(cfg, "distill")
    check_distillation(cfg)


def student_from_teacher_layers(teacher, layers: list[int], activation: str):
    """A shallower copy of the teacher: embeddings, head and the listed encoder layers, in list order."""
    depth = teacher.config.num_hidden_layers
    if any(not 0 <= i < depth for i in layers):
        raise FastformersError(f"student.layers={list(layers)} must be teacher layer indices in [0, {depth})")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # every family's config maps the BERT names (DistilBERT: n_layers)
    setattr(config, family_layout(teacher).config_key("hidden_act"), activation)
    for key in (LAYER_HEADS, LAYER_FFN):  # a pruned teacher: the copied layers keep their sizes
        if getattr(config, key, None) is not None:
            setattr(config, key, [getattr(config, key)[i] for i in layers])
    student = shrink_to_config(AutoModelForSequenceClassification.from_config(config))
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
            raise FastformersError(
                f"student {spec.name} is {family!r} but the teacher is "
                f"{teacher.config.model_type!r}: distillation stays within one family"
            )
        config = AutoConfig.from_pretrained(path, num_labels=task.num_labels)
        setattr(config, FAMILIES[family].config_key("hidden_act"), spec.activation)
        with readable_weights(path):
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, attn_implementation="eager")
        return model, AutoTokenizer.from_pretrained(path)
    config, layout = copy.deepcopy(teacher.config), family_layout(teacher)
    for key, value in dict(spec.arch).items():
        setattr(config, layout.config_key(key), value)
    setattr(config, layout.config_key("hidden_act"), spec.activation)
    return AutoModelForSequenceClassification.from_config(config), teacher_tokenizer


def run(ctx: StageContext, inputs: dict[str, Path], out: Path) -> dict[str, float]:
    cfg, task, opts, spec = ctx.cfg, ctx.task, ctx.cfg.distill, ctx.cfg.student
    train, val = ctx.data.examples(cfg.task.train_split), ctx.data.examples(opts.val_split)
    teacher, teacher_tokenizer = load_finetuned(inputs["model"] / "model")
    L.seed_everything(cfg.seed, workers=True)
    student, tokenizer = build_student(spec, teacher, teacher_tokenizer, task)
    if (
        opts.method == "task_specific"
        and (opts.hidden_weight > 0 or opts.attention_weight > 0)
        and tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    ):
        raise FastformersError(
            f"student {spec.name}: intermediate losses need the teacher's tokenizer; "
            "set distill.hidden_weight=0 distill.attention_weight=0"
        )
    max_length = cfg.task.max_seq_length
    teacher_preds = predictions(teacher, teacher_tokenizer, task, val, max_length, opts.eval_batch_size)
    initial_preds = predictions(student, tokenizer, task, val, max_length, opts.eval_batch_size)

    layer_map = (
        list(opts.layer_map)
        if opts.layer_map
        else uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    )
    student_score, epochs, seconds, train_examples = train_student(
        student, tokenizer, teacher, teacher_tokenizer, task, train, val, layer_map, opts, cfg, out, logger=ctx.logger
    )
    student.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    student_preds = predictions(student, tokenizer, task, val, max_length, opts.eval_batch_size)
    teacher_score = task.score(val, teacher_preds)["score"] if any(e.label is not None for e in val) else float("nan")
    drop_checkpoints(out)  # only now: a failure before this line leaves a resumable training (fit_best)
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


def summary(metrics: dict[str, float]) -> list[str]:
    return []  # its scores show on its own line; the run's summary names the final model's (evaluate)
