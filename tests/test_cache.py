"""The stage cache: keyed by config, atomic, and never loads a damaged entry."""

import pytest

from fastformers.cache import StageCache, cache_key


def test_key_changes_with_any_config_value():
    assert cache_key({"lr": 1e-5, "task": "cb"}) == cache_key({"task": "cb", "lr": 1e-5})
    assert cache_key({"lr": 1e-5}) != cache_key({"lr": 2e-5})


def test_built_entry_is_found_again(tmp_path):
    cache = StageCache(tmp_path)
    with cache.build("finetune", "k1", {"why": "test"}) as scratch:
        (scratch / "model.bin").write_bytes(b"weights")
    manifest = cache.lookup("finetune", "k1")
    assert manifest["files"]["model.bin"]["size"] == 7
    assert (cache.entry("finetune", "k1") / "model.bin").read_bytes() == b"weights"


def test_a_failed_build_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError), cache.build("finetune", "k1", {}) as scratch:
        (scratch / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed")
    assert cache.lookup("finetune", "k1") is None
    assert list((tmp_path / "finetune").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "corrupt_manifest"])
def test_damaged_entries_are_removed_not_loaded(tmp_path, damage):
    cache = StageCache(tmp_path)
    with cache.build("finetune", "k1", {}) as scratch:
        (scratch / "model.bin").write_bytes(b"weights")
    entry = cache.entry("finetune", "k1")
    if damage == "truncate":
        (entry / "model.bin").write_bytes(b"wei")
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    assert cache.lookup("finetune", "k1") is None
    assert not entry.exists()
