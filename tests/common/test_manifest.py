"""Bundle manifests: hashing, canonical form, and refusal of malformed input."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from tether.common import errors, manifest


def _write(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _build(root: pathlib.Path) -> manifest.Manifest:
    return manifest.hash_directory(
        root, name="demo", entrypoint="task.py", engines=[manifest.EngineNeeds("mnn", "model.mnn", {"input": (1, 4)})]
    )


def test_hash_directory_lists_every_file_with_its_sha256_and_size(tmp_path):
    files = {"task.py": b"def run(ctx):\n    return {}\n", "model.mnn": b"\x00" * 1000, "lib/util.py": b"x = 1\n"}
    _write(tmp_path, files)
    m = _build(tmp_path)
    assert [f.path for f in m.files] == sorted(files)
    for f in m.files:
        assert f.sha256 == "sha256:" + hashlib.sha256(files[f.path]).hexdigest()
        assert f.size == len(files[f.path])
    assert m.total_size == sum(len(v) for v in files.values())


def test_digest_is_stable_and_content_addressed(tmp_path):
    _write(tmp_path / "a", {"task.py": b"print(1)", "model.mnn": b"m"})
    _write(tmp_path / "b", {"model.mnn": b"m", "task.py": b"print(1)"})
    assert _build(tmp_path / "a").digest == _build(tmp_path / "b").digest
    (tmp_path / "b" / "task.py").write_bytes(b"print(2)")
    assert _build(tmp_path / "a").digest != _build(tmp_path / "b").digest


def test_round_trip_through_canonical_bytes(tmp_path):
    _write(tmp_path, {"task.py": b"1", "model.mnn": b"2"})
    m = _build(tmp_path)
    again = manifest.Manifest.from_bytes(m.canonical_bytes())
    assert again == m
    assert manifest.sha256_digest(m.canonical_bytes()) == m.digest


def test_identical_files_share_one_blob(tmp_path):
    _write(tmp_path, {"task.py": b"same", "model.mnn": b"other", "copy.py": b"same"})
    m = _build(tmp_path)
    assert len(m.files) == 3
    assert len(m.blob_digests()) == 2


def test_ignored_and_symlinked_files(tmp_path):
    _write(tmp_path, {"task.py": b"1", "model.mnn": b"2", "__pycache__/task.cpython-311.pyc": b"junk"})
    assert [f.path for f in _build(tmp_path).files] == ["model.mnn", "task.py"]
    (tmp_path / "link.py").symlink_to(tmp_path / "task.py")
    with pytest.raises(errors.InvalidManifest, match="symlinks"):
        _build(tmp_path)


def _doc(**over):
    doc = {
        "schema": 1,
        "name": "demo",
        "entrypoint": "task.py",
        "files": [{"path": "task.py", "sha256": "sha256:" + "a" * 64, "size": 3}],
        "engines": [],
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"schema": 2}, "schema"),
        ({"name": "Bad Name"}, "name"),
        ({"files": []}, "files"),
        ({"files": [{"path": "../escape.py", "sha256": "sha256:" + "a" * 64, "size": 1}]}, r"files\[0\].path"),
        ({"files": [{"path": "/abs.py", "sha256": "sha256:" + "a" * 64, "size": 1}]}, r"files\[0\].path"),
        ({"files": [{"path": "task.py", "sha256": "md5:abc", "size": 1}]}, r"files\[0\].sha256"),
        ({"files": [{"path": "task.py", "sha256": "sha256:" + "a" * 64, "size": -1}]}, r"files\[0\].size"),
        ({"entrypoint": "missing.py"}, "entrypoint"),
        ({"engines": [{"engine": "tensorflow", "model": "task.py"}]}, r"engines\[0\].engine"),
        ({"engines": [{"engine": "mnn", "model": "nope.mnn"}]}, r"engines\[0\].model"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_malformed_manifests_are_refused_with_the_field_named(override, message):
    with pytest.raises(errors.InvalidManifest, match=message):
        manifest.Manifest.from_json(_doc(**override))


def test_non_canonical_bytes_are_refused():
    good = manifest.Manifest.from_json(_doc())
    pretty = json.dumps(good.to_json(), indent=2).encode()
    with pytest.raises(errors.InvalidManifest, match="canonical"):
        manifest.Manifest.from_bytes(pretty)
    with pytest.raises(errors.InvalidManifest, match="JSON"):
        manifest.Manifest.from_bytes(b"\xff{not json")


def test_oversized_manifest_is_refused_before_parsing():
    with pytest.raises(errors.InvalidManifest, match="limit"):
        manifest.Manifest.from_bytes(b" " * (manifest.MAX_MANIFEST_BYTES + 1))
