"""Split shares, dynamic padding and candidate groups in batches."""

import shutil

import pytest

from fastformers.data import fingerprint, load_examples, make_loader, parse_split
from fastformers.errors import FastformersError
from fastformers.models import train_tokenizer
from fastformers.tasks import TASKS


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
    lengths = [batch["input_ids"].shape[1] for batch in loader]
    assert lengths[0] == 64  # truncated at max_seq_length
    assert max(lengths[1:]) < 40  # other batches are not padded to the long one
    first = next(iter(loader))
    assert first["labels"].tolist() == [e.label for e in examples[:4]]


def test_candidate_batches_keep_groups_and_mark_golds(superglue_root, tokenizer):
    examples = load_examples(TASKS["copa"], superglue_root, "val")
    batch = next(iter(make_loader(examples, tokenizer, TASKS["copa"], 64, batch_size=3)))
    assert batch["input_ids"].shape[0] == 6  # 3 questions x 2 candidates
    assert batch["group_sizes"].tolist() == [2, 2, 2]
    assert batch["gold_mask"].float().argmax(dim=1).tolist() == [e.label for e in examples[:3]]


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
