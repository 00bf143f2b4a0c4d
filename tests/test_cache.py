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


def fake_package(root, helper_code: str, helper_doc: str = "What the helper does.") -> None:
    """A `fastformers` tree with one stage that imports one helper module."""
    (root / "stages").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "demo.py").write_text(
        "from fastformers.helper import double\n\n\ndef run():\n    return double(2)\n"
    )
    (root / "helper.py").write_text(f'"""{helper_doc}"""\n\n\ndef double(x):\n    # a comment\n    {helper_code}\n')


def fingerprint_of(root, monkeypatch) -> str:
    from fastformers import cache

    monkeypatch.setattr(cache, "PACKAGE_ROOT", root)
    cache._code_of.cache_clear()
    cache._imported_modules.cache_clear()
    return cache.code_fingerprint("fastformers.stages.demo")


def test_the_code_key_follows_imported_code_not_its_docstrings_or_comments(tmp_path, monkeypatch):
    fake_package(tmp_path / "a", "return 2 * x")
    fake_package(tmp_path / "b", "return 2 * x", helper_doc="Reworded: doubles its argument.")
    fake_package(tmp_path / "c", "return x + x  # same result, other code")
    a, b, c = (fingerprint_of(tmp_path / name, monkeypatch) for name in "abc")
    assert a == b  # a docstring or a comment changes nothing a stage writes
    assert a != c  # a code change in a module the stage imports rebuilds its entries
