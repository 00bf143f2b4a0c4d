"""Split shares, dynamic padding and candidate groups in batches."""

import shutil

import numpy
import pytest

from fastformers.data.loading import TrainOrder, fingerprint, load_examples, make_loader, parse_split, texts_of
from fastformers.data.tasks import TASKS
from fastformers.errors import FastformersError
from fastformers.models.loading import build_random, score_examples, train_tokenizer
from tests.helpers import tiny_spec


def test_split_specs():
    assert parse_split("val") == ("val", 0.0, 1.0)
    assert parse_split("val[:60%]") == ("val", 0.0, 0.6)
    assert parse_split("val[60%:]") == ("val", 0.6, 1.0)
    for bad in ("dev", "val[70%:20%]", "val[:200%]"):
        with pytest.raises(FastformersError, match="split"):
            parse_split(bad)


def test_seeded_shares_are_disjoint_and_cover_the_file(superglue_root):
    task = TASKS["cb"]
    head = load_examples(task, superglue_root, "val[:60%]", split_seed=3)
    tail = load_examples(task, superglue_root, "val[60%:]", split_seed=3)
    whole = load_examples(task, superglue_root, "val")
    assert {e.uid for e in head}.isdisjoint({e.uid for e in tail})
    assert {e.uid for e in head} | {e.uid for e in tail} == {e.uid for e in whole}
    assert len(head) == round(0.6 * len(whole))
    assert [e.uid for e in load_examples(task, superglue_root, "val[:60%]", split_seed=3)] == [e.uid for e in head]


@pytest.fixture(scope="module")
def tokenizer(superglue_root):
    texts = [t for e in load_examples(TASKS["cb"], superglue_root, "train") for p in e.pairs for t in p]
    return train_tokenizer("bert", texts, 300)


def test_batches_are_padded_to_their_own_longest_row(superglue_root, tokenizer):
    examples = load_examples(TASKS["cb"], superglue_root, "train")
    examples[0].pairs = [(examples[0].pairs[0][0] + " much longer" * 20, examples[0].pairs[0][1])]
    loader = make_loader(examples, tokenizer, TASKS["cb"], max_length=64, batch_size=4)
    batches = list(loader)
    lengths = [batch["input_ids"].shape[1] for batch in batches]
    assert lengths == sorted(lengths)  # shortest first: each batch pads to rows of similar length
    assert lengths[-1] == 64  # truncated at max_seq_length
    assert max(lengths[:-1]) < 40  # other batches are not padded to the long one
    assert 0 in batches[-1]["index"].tolist()  # the long example, and every batch says whose rows it holds
    order = [i for batch in batches for i in batch["index"].tolist()]
    assert sorted(order) == list(range(len(examples)))
    labels = [label for batch in batches for label in batch["labels"].tolist()]
    assert labels == [examples[i].label for i in order]


def test_scores_come_back_in_the_examples_order(superglue_root):
    examples = load_examples(TASKS["cb"], superglue_root, "train")
    examples[0].pairs = [(examples[0].pairs[0][0] + " much longer" * 20, examples[0].pairs[0][1])]
    model, tokenizer = build_random(tiny_spec("bert"), TASKS["cb"], texts_of(examples))
    loader = make_loader(examples, tokenizer, TASKS["cb"], max_length=64, batch_size=4)
    one_by_one = [score_examples(model, make_loader([e], tokenizer, TASKS["cb"], 64, 1))[0] for e in examples]
    numpy.testing.assert_allclose(score_examples(model, loader), one_by_one, atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_train_order_splits_every_global_batch_over_the_ranks(grouped):
    lengths = [(i * 37) % 101 for i in range(50)]
    whole = TrainOrder(lengths, 8, seed=3, grouped=grouped).global_batches()
    ranks = [list(TrainOrder(lengths, 8, seed=3, grouped=grouped, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(TrainOrder(lengths, 8, 3, grouped, 1, 2)) == len(whole) == 7
    for batch, first, second in zip(whole, *ranks, strict=True):
        assert sorted(first + second) == sorted(batch + batch[: len(batch) % 2])  # the last one padded
    assert sorted(i for batch in whole for i in batch) == list(range(50))
    if grouped:  # similar lengths together: far less spread within a batch than in random batches
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in whole[:-1])
        assert spread < 0.5 * sum(max(lengths) - min(lengths) for _ in whole[:-1])
    order = TrainOrder(lengths, 8, seed=3, grouped=grouped)
    order.set_epoch(1)
    assert order.global_batches() != whole  # a new order every epoch


def test_candidate_batches_keep_groups_and_mark_golds(superglue_root, tokenizer):
    examples = load_examples(TASKS["copa"], superglue_root, "val")
    batch = next(iter(make_loader(examples, tokenizer, TASKS["copa"], 64, batch_size=3)))
    assert batch["input_ids"].shape[0] == 6  # 3 questions x 2 candidates
    assert batch["group_sizes"].tolist() == [2, 2, 2]
    assert batch["gold_mask"].float().argmax(dim=1).tolist() == [examples[i].label for i in batch["index"].tolist()]


def test_a_directory_is_not_a_data_file(tmp_path, superglue_root):
    data = shutil.copytree(superglue_root / "CB", tmp_path / "CB")
    (data / "train.jsonl").unlink()
    (data / "train.jsonl").mkdir()
    with pytest.raises(FastformersError) as raised:
        load_examples(TASKS["cb"], tmp_path, "train", download=True)  # there: nothing to download
    assert str(raised.value) == f"{(data / 'train.jsonl').resolve()} is a directory, not a data file"


def test_the_fingerprint_hashes_data_files_only(tmp_path, superglue_root):
    """A directory named like a split the run does not read is no data: it neither crashes the hash nor
    changes it, and the splits the run reads still load."""
    data = shutil.copytree(superglue_root / "CB", tmp_path / "CB")
    (data / "test.jsonl").unlink()
    without_test = fingerprint(tmp_path, TASKS["cb"])
    (data / "test.jsonl").mkdir()
    assert fingerprint(tmp_path, TASKS["cb"]) == without_test
    assert load_examples(TASKS["cb"], tmp_path, "train")
    (data / "val.jsonl").write_text((data / "val.jsonl").read_text().replace('"idx": 0', '"idx": 100'))
    assert fingerprint(tmp_path, TASKS["cb"]) != without_test
