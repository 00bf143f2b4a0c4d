"""The stage cache: keyed by config, atomic, and never loads a damaged entry."""

import logging
from pathlib import Path

import pytest

from fastformers.errors import FastformersError
from fastformers.run import cache as cache_module
from fastformers.run.cache import FAILED, StageCache, cache_key


def test_key_changes_with_any_config_value():
    assert cache_key({"lr": 1e-5, "task": "cb"}) == cache_key({"task": "cb", "lr": 1e-5})
    assert cache_key({"lr": 1e-5}) != cache_key({"lr": 2e-5})


def test_built_entry_is_found_again(tmp_path):
    cache = StageCache(tmp_path)
    build_entry(cache)
    manifest = cache.lookup("finetune", "k1")
    assert manifest["files"]["model.bin"]["size"] == 7
    assert (cache.entry("finetune", "k1") / "model.bin").read_bytes() == b"weights"


def build_entry(cache: StageCache, key: str = "k1", content: bytes = b"weights") -> Path:
    with cache.build("finetune", key, {}) as scratch:
        (scratch / "model.bin").write_bytes(content)
    return cache.entry("finetune", key)


def fail_build(cache: StageCache, error: type[BaseException] = RuntimeError) -> None:
    with pytest.raises(error), cache.build("finetune", "k1", {}) as scratch:
        (scratch / "checkpoints").mkdir(exist_ok=True)
        (scratch / "checkpoints" / "last.ckpt").write_text("epoch 3")
        raise error("killed")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])  # KeyboardInterrupt: Ctrl-C and SIGTERM
def test_a_failed_build_is_kept_adopted_by_the_rerun_and_removed_after_success(tmp_path, error, caplog):
    cache = StageCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastformers.run.cache"):
        fail_build(cache, error)
        fail_build(cache, error)  # a second failure: still one failed folder, the newest
    assert cache.lookup("finetune", "k1") is None
    (failed,) = (tmp_path / "finetune").iterdir()
    assert FAILED.match(failed.name) and (failed / "checkpoints" / "last.ckpt").read_text() == "epoch 3"
    assert f"the failed build's files are kept in {failed}" in caplog.text
    with cache.build("finetune", "k1", {}) as scratch:
        assert (scratch / "checkpoints" / "last.ckpt").read_text() == "epoch 3"  # the re-run resumes from it
        (scratch / "model.bin").write_bytes(b"weights")
    assert [p.name for p in (tmp_path / "finetune").iterdir()] == ["k1"]


def test_a_success_removes_the_keys_failed_folders_it_did_not_adopt(tmp_path):
    cache = StageCache(tmp_path)
    fail_build(cache)
    (tmp_path / "finetune" / ".k1.failed-20000101T000000Z-abcdef").mkdir()  # made by a process at the same time
    build_entry(cache)
    assert [p.name for p in (tmp_path / "finetune").iterdir()] == ["k1"]


@pytest.mark.parametrize(
    "damage", ["truncate", "delete_file", "delete_manifest", "corrupt_manifest", "edit_manifest", "not_a_dict"]
)
def test_proven_damage_deletes_the_entry_so_it_is_rebuilt(tmp_path, damage, caplog):
    cache = StageCache(tmp_path)
    entry = build_entry(cache)
    manifest = entry / "manifest.json"
    if damage == "truncate":
        (entry / "model.bin").write_bytes(b"wei")
    elif damage == "delete_file":
        (entry / "model.bin").unlink()
    elif damage == "delete_manifest":
        manifest.unlink()
    elif damage == "corrupt_manifest":
        manifest.write_text("{not json")
    elif damage == "edit_manifest":  # still valid JSON with the right sizes, but not what it hashed
        manifest.write_text(manifest.read_text().replace('"key": "k1"', '"key": "k2"'))
    else:
        manifest.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="fastformers.run.cache"):
        assert cache.lookup("finetune", "k1") is None
    assert not entry.exists()
    assert f"cache entry {entry} is damaged" in caplog.text


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(116, "Stale file handle")])
def test_a_read_error_is_retried_then_raised_and_the_entry_kept(tmp_path, monkeypatch, error):
    cache = StageCache(tmp_path)
    entry = build_entry(cache)
    monkeypatch.setattr(cache_module, "RETRY_WAIT", 0.0)
    reads = []
    real = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path.name == "manifest.json":
            reads.append(path)
            raise error
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(FastformersError, match=rf"cache entry {entry}: could not read it after 3 tries .*kept"):
        cache.lookup("finetune", "k1")
    assert len(reads) == cache_module.TRIES
    monkeypatch.setattr(Path, "read_bytes", real)
    assert entry.is_dir() and cache.lookup("finetune", "k1") is not None


def test_a_read_error_that_passes_is_not_reported(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    build_entry(cache)
    monkeypatch.setattr(cache_module, "RETRY_WAIT", 0.0)
    real, failures = Path.read_bytes, [OSError(5, "Input/output error")]

    def once(path: Path) -> bytes:
        if path.name == "manifest.json" and failures:
            raise failures.pop()
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", once)
    assert cache.lookup("finetune", "k1") is not None and not failures


def test_full_verification_finds_a_same_size_change_the_default_does_not_hash(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    entry = build_entry(cache)
    (entry / "model.bin").write_bytes(b"WEIGHTS")  # same size, other content
    hashed = []
    monkeypatch.setattr(cache_module, "_sha256", lambda path: hashed.append(path) or "x")
    assert cache.lookup("finetune", "k1") is not None  # sizes only: cheap, nothing hashed
    assert hashed == []
    monkeypatch.undo()
    monkeypatch.setenv(cache_module.VERIFY_ENV, "full")
    assert cache.lookup("finetune", "k1") is None and not entry.exists()


def test_an_unknown_verify_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_module.VERIFY_ENV, "paranoid")
    with pytest.raises(FastformersError, match=r"FASTFORMERS_CACHE_VERIFY='paranoid': expected 'sizes'"):
        StageCache(tmp_path).lookup("finetune", "k1")


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
    monkeypatch.setattr(cache_module, "PACKAGE_ROOT", root)
    cache_module._code_of.cache_clear()
    cache_module._imported_modules.cache_clear()
    return cache_module.code_fingerprint("fastformers.stages.demo")


def test_the_code_key_follows_imported_code_not_its_docstrings_or_comments(tmp_path, monkeypatch):
    fake_package(tmp_path / "a", "return 2 * x")
    fake_package(tmp_path / "b", "return 2 * x", helper_doc="Reworded: doubles its argument.")
    fake_package(tmp_path / "c", "return x + x  # same result, other code")
    a, b, c = (fingerprint_of(tmp_path / name, monkeypatch) for name in "abc")
    assert a == b  # a docstring or a comment changes nothing a stage writes
    assert a != c  # a code change in a module the stage imports rebuilds its entries


def edited(monkeypatch, module: str) -> None:
    """As if `module`'s code had changed (the key machinery reads code through `_code_of`)."""
    original = cache_module._code_of
    monkeypatch.setattr(cache_module, "_code_of", lambda name: original(name) + ("#edited" if name == module else ""))


@pytest.mark.parametrize("stage", ["finetune", "distill", "prune", "teacher"])
def test_a_trained_models_key_follows_training_code_not_mlflow_or_engine_code(stage, monkeypatch):
    """Changing how runs are tracked (the Lightning logger comes from the pipeline's StageContext) or an engine
    (a type hint only, for training) must not retrain a model; changing the training code must."""
    module = f"fastformers.stages.{stage}"
    before = cache_module.code_fingerprint(module)
    for unrelated in ("fastformers.tracking.runs", "fastformers.tracking.server", "fastformers.engines"):
        with monkeypatch.context() as patch:
            edited(patch, unrelated)
            assert cache_module.code_fingerprint(module) == before, unrelated
    edited(monkeypatch, "fastformers.training.fit")
    assert cache_module.code_fingerprint(module) != before
