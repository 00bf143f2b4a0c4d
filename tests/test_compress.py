"""experiment=compress (fastformers/run/compress.py): the search space as config, the budget, resuming a study and
retrying a killed trial, and the rule that picks the model (the fewest multiply-adds within the budget, confirmed
on the held-out slice). The search logic runs here on a stand-in for the stages; one slow test runs the command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from fastformers.bench.analysis import labelled_sample
from fastformers.data.loading import holdout_split, load_examples
from fastformers.data.tasks import TASKS
from fastformers.errors import FastformersError
from fastformers.run import compress, pipeline
from fastformers.stages import get_stage
from fastformers.tracking.runs import ROLE_TAG
from tests.helpers import cli

SMALL_SPACE = ["compress.space.layers=[1,2]", "compress.space.heads=[1.0,0.5]", "compress.space.ffn=[1.0,0.5]"]


def stage_key(cfg, name: str, inputs: dict | None = None) -> str:
    from fastformers.run.cache import cache_key

    return cache_key(pipeline.stage_payload(cfg, name, get_stage(name), "data", inputs or {}))


def test_the_space_composes_into_trial_runs_that_keep_the_teacher_key(make_cfg):
    cfg, held_out = compress.with_holdout(make_cfg("experiment=compress", "compress.holdout_from=train"))
    compress.validate(cfg)
    assert (cfg.task.train_split, held_out) == ("train[:90%]", "train[90%:]")
    a = compress.trial_cfg(cfg, {"layers": 3, "seeding": "every_other", "heads": 0.5, "ffn": 0.25}, 6)
    b = compress.trial_cfg(cfg, {"layers": 2, "seeding": "bottom", "heads": 1.0, "ffn": 0.75}, 6)
    assert list(a.student.layers) == [1, 3, 5] and list(b.student.layers) == [0, 1]
    assert (a.pruning.heads, a.pruning.ffn) == (0.5, 0.25) and "benchmark" not in a.stages
    teacher_run = compress.teacher_cfg(cfg)
    assert stage_key(a, "finetune") == stage_key(b, "finetune") == stage_key(teacher_run, "finetune")
    assert list(teacher_run.stages) == ["finetune", "export", "evaluate"] and teacher_run.student.name == "none"
    teacher = {"model": (Path("."), stage_key(a, "finetune"))}
    assert stage_key(a, "distill", teacher) != stage_key(b, "distill", teacher)
    timed = compress.trial_cfg(
        make_cfg("experiment=compress", "compress.latency_ms=5"),
        {"layers": 1, "seeding": "bottom", "heads": 1, "ffn": 1},
        2,
    )
    assert timed.stages[-1] == "benchmark"


def test_distillation_settings_are_dimensions_of_the_space_that_leave_the_teacher_alone(make_cfg):
    cfg = make_cfg("experiment=compress", "compress.space.distill={hidden_weight:[0.0,1.0],augment:[0,4]}")
    compress.validate(cfg)
    axes = compress.axes(cfg.compress.space, 6)
    assert axes["distill.hidden_weight"] == [0.0, 1.0] and axes["distill.augment"] == [0, 4]
    point = {"layers": 2, "seeding": "bottom", "heads": 1.0, "ffn": 0.5}
    plain = compress.trial_cfg(cfg, point | {"distill.hidden_weight": 0.0, "distill.augment": 0}, 6)
    tiny = compress.trial_cfg(cfg, point | {"distill.hidden_weight": 1.0, "distill.augment": 4}, 6)
    assert (tiny.distill.hidden_weight, tiny.distill.augment) == (1.0, 4)
    assert stage_key(plain, "finetune") == stage_key(tiny, "finetune")
    teacher = {"model": (Path("."), stage_key(plain, "finetune"))}
    assert stage_key(plain, "distill", teacher) != stage_key(tiny, "distill", teacher)
    for bad, said in (("{hiden_weight:[1.0]}", "not a distill setting"), ("{augment:[]}", "at least one value")):
        with pytest.raises(FastformersError, match=rf"compress\.space\.distill\..*{said}"):
            compress.validate(make_cfg("experiment=compress", f"compress.space.distill={bad}"))


def test_pruning_search_is_compress_at_the_recipe_depth(make_cfg):
    cfg = make_cfg("experiment=pruning_search")
    compress.validate(cfg)
    assert list(cfg.compress.objectives) == ["score", "latency_ms"] and list(cfg.compress.space.layers) == [3]
    assert "sweeper" not in str(cfg.get("hydra", ""))


def test_seeded_layers():
    assert compress.seeded_layers(3, 6, "bottom") == [0, 1, 2]
    assert compress.seeded_layers(3, 6, "every_other") == [1, 3, 5]
    assert compress.seeded_layers(2, 6, "every_other") == [2, 5]
    assert compress.seeded_layers(6, 6, "every_other") == list(range(6))
    with pytest.raises(FastformersError, match="teacher has 2"):
        compress.seeded_layers(3, 2, "bottom")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("compress.space.seeding=[top]", "compress.space.seeding"),
        ("compress.space.heads=[1.5]", "compress.space.heads"),
        ("compress.holdout=1.5", "compress.holdout"),
        ("compress.objectives=[gmacs]", "compress.objectives"),
        ("compress.storage=redis", "compress.storage"),
        ("stages=[finetune,evaluate]", "stages"),
    ],
)
def test_bad_compress_settings_name_their_field(make_cfg, override, named):
    with pytest.raises(FastformersError, match=named.replace(".", r"\.")):
        compress.validate(make_cfg("experiment=compress", override))


def test_the_held_out_slice_is_disjoint_from_what_trains(superglue_root):
    kept, held = holdout_split("train", 0.25)
    train = {e.uid for e in load_examples(TASKS["cb"], superglue_root, kept)}
    slice_ = {e.uid for e in load_examples(TASKS["cb"], superglue_root, held)}
    whole = {e.uid for e in load_examples(TASKS["cb"], superglue_root, "train")}
    assert slice_ and not train & slice_ and train | slice_ == whole
    with pytest.raises(FastformersError, match="whole percent"):
        holdout_split("train", 0.123)
    with pytest.raises(FastformersError, match="whole split"):
        holdout_split("train[:50%]", 0.1)


def test_a_small_train_keeps_all_of_it_and_holds_out_half_the_eval_split(make_cfg, superglue_root):
    small = make_cfg("experiment=compress", f"data.root={superglue_root}")  # the fixture's CB train: under 1000
    cfg, held_out = compress.with_holdout(small)
    assert (cfg.task.train_split, cfg.task.eval_split, held_out) == ("train", "val[:50%]", "val[50%:]")
    assert cfg.finetune.val_split == cfg.distill.val_split == "val[:50%]"  # best epochs are picked on the first half
    ranked = {e.uid for e in load_examples(TASKS["cb"], superglue_root, cfg.task.eval_split)}
    assert ranked and not ranked & {e.uid for e in load_examples(TASKS["cb"], superglue_root, held_out)}
    big = make_cfg("experiment=compress", f"data.root={superglue_root}", "compress.small_train=1")
    assert compress.with_holdout(big)[1] == "train[90%:]"
    assert compress.with_holdout(make_cfg("experiment=compress", "compress.holdout_from=test"))[1] == "test"


def test_the_budget_is_a_drop_in_points_and_optional_latency_and_size():
    budget = compress.Budget(teacher_score=0.80, max_drop=1.0, latency_ms=10.0, max_mb=50.0)
    fits = {"score": 0.795, "latency_ms": 9.0, "mb": 40.0}
    assert budget.keeps(fits)
    assert not budget.keeps(fits | {"score": 0.785})  # 1.5 points lost
    assert not budget.keeps(fits | {"latency_ms": 12.0})
    assert not budget.keeps(fits | {"latency_ms": None})  # a latency budget needs a measured latency
    assert not budget.keeps(fits | {"mb": 60.0})
    assert compress.Budget(0.80, 1.0).constraints({"score": 0.90}) == {"score_drop": pytest.approx(-11.0)}


def test_the_gate_s_score_test_is_part_of_the_budget(make_cfg, superglue_root):
    budget = compress.Budget(teacher_score=0.80, max_drop=5.0, alpha=0.05)
    assert budget.keeps({"score": 0.79, "gate_p": 0.4})
    assert not budget.keeps({"score": 0.79, "gate_p": 0.01})
    assert not budget.keeps({"score": 0.79})  # not tested: not within the budget
    cfg = make_cfg("experiment=compress")
    examples = load_examples(TASKS["cb"], superglue_root, "val")
    sample = labelled_sample(TASKS["cb"], examples)
    golds = [e.label for e in examples]
    same = compress.gate_test(cfg, sample, golds, golds)
    assert same["gate_p"] == 1.0 and same["delta_points"] == 0.0
    wrong = [(g + 1) % 3 for g in golds]  # every prediction moved off the teacher's (here: the gold) label
    worse = compress.gate_test(cfg, sample, wrong, golds)
    assert worse["gate_p"] < 0.05 and worse["delta_hi_points"] < 0 <= worse["differing_units"] - len(golds)


def made_trial(number: int, score: float, gmacs: float):
    trial = create_trial(
        state=TrialState.COMPLETE,
        values=[score, gmacs],
        params={"layers": number},
        distributions={"layers": CategoricalDistribution(list(range(10)))},
        user_attrs={"score": score, "gmacs": gmacs, "latency_ms": None, "mb": 1.0},
    )
    trial.number = number
    return trial


def test_the_choice_is_the_smallest_within_budget_confirmed_on_the_held_out_slice():
    budget = compress.Budget(teacher_score=0.80, max_drop=1.0)
    trials = [
        made_trial(0, 0.70, 0.1),  # smallest, but over the budget: never a candidate
        made_trial(1, 0.80, 0.5),
        made_trial(2, 0.795, 0.3),  # smallest within the budget
        made_trial(3, 0.82, 2.0),
    ]
    chosen, tried = compress.choose(trials, budget, confirm=lambda t: True, limit=3)
    assert chosen.number == 2 and [t.number for t in tried] == [2]
    chosen, tried = compress.choose(trials, budget, confirm=lambda t: t.number != 2, limit=3)
    assert chosen.number == 1 and [t.number for t in tried] == [2, 1]  # fails held-out: the next smallest
    chosen, tried = compress.choose(trials, budget, confirm=lambda t: False, limit=2)
    assert chosen is None and [t.number for t in tried] == [2, 1]


def fake_cost(params: dict) -> float:
    return params["layers"] * (params["heads"] + params["ffn"])


def fake_stages(calls: list):
    """Stands in for a trial's stages: the score falls and the cost shrinks with what is removed."""

    def evaluate(params: dict, number: int) -> compress.Point:
        calls.append(dict(params))
        kept = fake_cost(params)
        return compress.Point(score=0.5 + 0.1 * kept, gmacs=kept, shape={}, folder=Path("."), run_id="r")

    return evaluate


def search_cfg(make_cfg, trials: int, *more: str):
    return make_cfg("experiment=compress", f"compress.trials={trials}", *SMALL_SPACE, *more)


def test_a_point_drawn_again_is_pruned_and_not_counted(make_cfg):
    calls: list = []
    cfg = search_cfg(
        make_cfg, 16, "compress.space.seeding=[bottom]", "compress.max_misses=30", "compress.monotone=false"
    )
    study = compress.open_study(cfg)  # 8 points in all
    done = compress.search(
        cfg, study, fake_stages(calls), compress.Budget(0.8, 10.0), time.monotonic() + 600, 2, fake_cost
    )
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    assert len(calls) == len(done) == len({tuple(sorted(c.items())) for c in calls}) == 8  # every shape, once
    assert pruned and all(t.user_attrs["settled_by"] in {d.number for d in done} for t in pruned)
    # a repeat is replaced by an unvisited point, so the whole space is run; then the search stops after
    # max_misses repeats in a row instead of spinning until its deadline


def point(layers: int, heads: float, ffn: float, seeding: str = "bottom") -> dict:
    return {"layers": layers, "seeding": seeding, "heads": heads, "ffn": ffn}


def finished(number: int, params: dict, score: float, latency_ms: float | None = None):
    trial = made_trial(number, score, fake_cost(params))
    trial.params = params
    trial.user_attrs["latency_ms"] = latency_ms
    return trial


def test_a_finished_trial_settles_the_points_its_verdict_implies():
    budget = compress.Budget(teacher_score=0.80, max_drop=1.0, latency_ms=5.0)
    lost = finished(0, point(3, 0.5, 0.5), score=0.70, latency_ms=3.0)  # over the score budget; cost 3
    kept = finished(1, point(4, 0.5, 0.5), score=0.80, latency_ms=4.0)  # within every budget; cost 4
    slow = finished(2, point(4, 0.25, 1.0), score=0.80, latency_ms=6.0)  # keeps the score, too slow; cost 5

    def settled(trials, params, cost=fake_cost):
        found = compress.settled_by(trials, params, budget, cost)
        return found and found[0]

    trials = [lost, kept, slow]
    assert settled(trials, point(2, 0.5, 0.25)) == 0  # no larger than a loss, same seeding
    assert settled(trials, point(3, 0.5, 0.5)) == 0  # the same point
    assert settled(trials, point(3, 0.75, 0.75)) == 1  # costs more than one within the budget: never the smallest
    assert settled(trials, point(3, 1.0, 1.0, seeding="every_other")) == 1  # whatever its seeding
    assert settled([lost, slow], point(4, 0.5, 1.0)) == 2  # no smaller than one over the latency budget
    open_points = [
        point(2, 1.0, 0.25),  # more heads than the loss: it may keep the score
        point(2, 0.5, 0.25, seeding="every_other"),  # other teacher layers: no trial of its seeding lost
        point(4, 0.25, 0.5),  # cheaper than the one within the budget: it could be chosen
        point(3, 0.75, 0.5),  # between the loss and the one within the budget
    ]
    for params in open_points:
        assert compress.settled_by(trials, params, budget, fake_cost) is None, params
    assert settled(trials, point(2, 0.5, 0.25), cost=None) is None  # compress.monotone=false: repeats only
    assert settled(trials, point(4, 0.5, 0.5), cost=None) == 1


def test_a_search_runs_no_point_an_earlier_trial_settled(make_cfg):
    calls: list = []
    cfg = search_cfg(make_cfg, 16, "compress.space.layers=[1,2,3,4]", "compress.max_misses=30")
    budget = compress.Budget(0.8, 1.0)  # fake_stages: 0.5 + 0.1 * layers * (heads + ffn), so 4 layers at 0.75
    study = compress.open_study(cfg)
    done = compress.search(cfg, study, fake_stages(calls), budget, time.monotonic() + 600, 4, fake_cost)
    for i, trial in enumerate(done):
        assert compress.settled_by(done[:i], trial.params, budget, fake_cost) is None, trial.params
    assert len(done) < 16  # every point of the 32 was run or settled: the search stopped early
    fits = [fake_stages([])(p, 0) for p in compress.space_points(cfg.compress.space, 4)]
    smallest_fit = min(f.gmacs for f in fits if budget.keeps({"score": f.score}))
    assert min(t.user_attrs["gmacs"] for t in done if budget.keeps(t.user_attrs)) == smallest_fit  # none missed


def test_a_new_study_s_first_trials_cover_every_value_of_every_dimension(make_cfg):
    calls: list = []
    cfg = search_cfg(make_cfg, 3, "compress.space.layers=[1,2,3]", "compress.space.heads=[1.0,0.75,0.5]")
    study = compress.open_study(cfg)
    compress.search(cfg, study, fake_stages(calls), compress.Budget(0.8, 10.0), time.monotonic() + 600, 6, fake_cost)
    for name, values in compress.axes(cfg.compress.space, 6).items():
        assert {c[name] for c in calls} == set(values), name  # 3 trials: each depth and each heads share once
    again = search_cfg(make_cfg, 4, "compress.space.layers=[1,2,3]", "compress.space.heads=[1.0,0.75,0.5]")
    compress.search(again, study, fake_stages(calls), compress.Budget(0.8, 10.0), time.monotonic() + 600, 6, fake_cost)
    assert len(calls) == 4  # a resumed study is not seeded again: one more trial, drawn by the sampler


def test_the_front_is_what_no_other_trial_beats_on_both_objectives():
    trials = [made_trial(0, 0.70, 0.1), made_trial(1, 0.80, 0.5), made_trial(2, 0.75, 0.6), made_trial(3, 0.82, 2.0)]
    assert [t.number for t in compress.pareto_front(trials)] == [0, 1, 3]  # 2 is beaten by 1 on both


def test_a_candidate_is_confirmed_on_the_held_out_slice_by_the_drop_and_the_gate(make_cfg, monkeypatch):
    cfg = make_cfg("experiment=compress")
    golds = [0, 1, 2, 0, 1, 2, 0, 1] * 4
    sample = compress.gate.Labelled(
        golds, [3] * 32, [[i] for i in range(32)], lambda pos, preds: sum(preds[i] == golds[i] for i in pos) / len(pos)
    )
    holdout = compress.HoldOut("train[90%:]", sample, 1.0, golds)
    trial = made_trial(5, 0.8, 0.3)

    def judged(predictions, max_drop: float):
        monkeypatch.setattr(compress, "holdout_point", lambda *a: (sample.score(range(32), predictions), predictions))
        return compress.confirm_on_holdout(cfg, holdout, trial, 2, compress.Budget(1.0, max_drop, alpha=0.05))

    assert judged(golds, 1.0).passed  # as good as the teacher
    one_wrong = [(g + 1) % 3 if i == 0 else g for i, g in enumerate(golds)]
    assert not judged(one_wrong, 1.0).passed  # 3.1 points lost: over the budget, though the test finds no loss
    assert judged(one_wrong, 5.0).passed and judged(one_wrong, 5.0).test["gate_p"] > 0.05
    six_wrong = [(g + 1) % 3 if i < 6 else g for i, g in enumerate(golds)]
    result = judged(six_wrong, 50.0)  # within a generous budget, but the paired test finds the loss
    assert not result.passed and result.test["gate_p"] < 0.05


def test_the_paper_s_points_are_its_baseline_and_its_reduction(make_cfg):
    points = compress.paper_points(make_cfg("experiment=compress"))
    assert points["paper_baseline_gmacs"] == pytest.approx(48.3, abs=0.1)  # BERT-base padded to 512
    assert points["paper_student_gmacs"] == pytest.approx(0.39, abs=0.01)


@pytest.mark.parametrize(("storage", "file"), [("sqlite", "optuna.db"), ("journal", "optuna.journal")])
def test_a_stopped_search_resumes_without_repeating_finished_trials(make_cfg, storage, file):
    budget = compress.Budget(teacher_score=0.8, max_drop=10.0)
    first: list = []
    cfg = search_cfg(make_cfg, 2, f"compress.storage={storage}")
    done = compress.search(
        cfg, compress.open_study(cfg), fake_stages(first), budget, time.monotonic() + 600, 2, fake_cost
    )
    assert len(first) == 2 and len(done) == 2
    again: list = []  # a new process: the study is read back from outputs/optuna.db
    cfg = search_cfg(make_cfg, 3, f"compress.storage={storage}")
    done = compress.search(
        cfg, compress.open_study(cfg), fake_stages(again), budget, time.monotonic() + 600, 2, fake_cost
    )
    assert len(again) == 1 and len(done) == 3
    assert again[0] != first[0]  # the resumed sampler does not replay the first run's seeded draws
    assert all(t.constraints for t in done)  # the budget reached the sampler
    assert Path(cfg.paths.output_dir, file).is_file()


def test_a_study_resumes_only_with_the_settings_it_started_with(make_cfg):
    compress.open_study(search_cfg(make_cfg, 2))
    compress.open_study(search_cfg(make_cfg, 5, "distill.progress_bar=true", "compress.timeout_minutes=90"))
    with pytest.raises(FastformersError, match=r"^distill\.hidden_weight=0\.0, but study .* started with 1\.0"):
        compress.open_study(search_cfg(make_cfg, 2, "distill.hidden_weight=0.0"))


def test_a_second_search_from_the_same_folder_is_refused_while_one_runs(make_cfg):
    cfg = search_cfg(make_cfg, 1)
    with compress.one_search(cfg), pytest.raises(FastformersError, match="another search is running"):
        compress.run(cfg)  # the first `with` is what a running search holds
    with compress.one_search(cfg):  # released with the first: the next one starts
        pass


def test_a_trial_whose_run_the_store_lost_is_warned_about_not_fatal(tmp_path, caplog):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a store that never held the trial's run
    trial = made_trial(3, 0.8, 0.3)
    trial.user_attrs["run_id"] = "0" * 32
    compress.note_on_trial_run(client, trial, {"compress/latency_p50_ms": 1.0}, {"compress.front": "1"})
    assert "trial 3's run" in caplog.text and "not updated" in caplog.text


def test_a_search_past_its_deadline_starts_no_trial(make_cfg):
    calls: list = []
    cfg = search_cfg(make_cfg, 3)
    budget = compress.Budget(0.8, 10.0)
    assert (
        compress.search(cfg, compress.open_study(cfg), fake_stages(calls), budget, time.monotonic() - 1, 2, fake_cost)
        == []
    )
    assert calls == []


def test_a_killed_trial_goes_stale_and_is_retried(make_cfg):
    cfg = search_cfg(make_cfg, 1, "compress.heartbeat_seconds=1")
    storage = compress.storage_of(cfg)
    study = compress.open_study(cfg, storage)
    killed = study.ask()  # what a process killed mid-trial leaves: a RUNNING trial with a heartbeat
    params = compress.suggest(killed, cfg.compress.space, 2)
    storage.record_heartbeat(killed._trial_id)
    silent_since = time.monotonic()
    while time.monotonic() - silent_since < 2 * cfg.compress.heartbeat_seconds + 2:  # past the grace period
        time.sleep(0.5)
    calls: list = []
    resumed = compress.open_study(cfg, compress.storage_of(cfg))
    compress.search(cfg, resumed, fake_stages(calls), compress.Budget(0.8, 10.0), time.monotonic() + 600, 2, fake_cost)
    states = [t.state for t in resumed.get_trials(deepcopy=False)]
    assert calls == [params]  # the retry ran the killed trial's point again
    assert states == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
def test_pruning_search_runs_resumes_and_leaves_a_model_transformers_loads(superglue_root, tmp_path):
    tiny = [
        "experiment=pruning_search",
        "teacher=tiny_bert",
        "finetune.epochs=1",
        "finetune.batch_size=8",
        "distill.epochs=1",
        f"data.root={superglue_root}",
        "compress.space.layers=[1]",
        "benchmark.repeats=1",
        "benchmark.latency_examples=4",
        "benchmark.warmup_batches=1",
        "precision.min_agreement=0.5",
    ]
    first = cli(*tiny, "compress.trials=2", "compress.seeds=[]", cwd=tmp_path, timeout=900)
    assert "2 finished trials" in first.stdout
    second = cli(*tiny, "compress.trials=3", "compress.seeds=[43]", cwd=tmp_path, timeout=900)
    (tmp_path / "second.log").write_text(second.stdout)
    assert "stage finetune: from the cache" in second.stdout
    assert second.stdout.count("stage prune: ran") <= 2  # one new trial and the chosen point's other seed at most
    assert "3 finished trials" in second.stdout and "GMAC x engine gain" in second.stdout
    assert "seeds [42, 43]" in second.stdout and "on the held-out slice" in second.stdout
    assert "compress: the Pareto figure and the trials' table" in second.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruning_search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "compress"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    ids = {r.info.run_id for r in parents}
    trials = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids and "compress/shape_layers" in r.data.metrics
    ]
    assert len(trials) == 3 and all("benchmark/onnx_int8/latency_p50_ms" in r.data.metrics for r in trials)
    folder = Path(
        next(p for p in parents if "compress.chosen_folder" in p.data.tags).data.tags["compress.chosen_folder"]
    )
    load = (
        "import sys; from transformers import AutoModelForSequenceClassification as A; "
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(m).__name__)"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", load, str(folder)], capture_output=True, text=True, cwd=folder, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert len(list(folder.parent.glob("compress_pareto_*.png"))) == 1  # the search leaves its figure beside it
    logged = [a.path for p in parents for a in client.list_artifacts(p.info.run_id, "report")]
    assert any(path.endswith(".png") for path in logged) and any(path.endswith(".csv") for path in logged)
