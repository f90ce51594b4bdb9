"""perl.fileio: the one temp-file-and-rename write every writer of a run folder uses."""

from __future__ import annotations

import os

import pytest

from perl.fileio import atomic_path, atomic_write_bytes, atomic_write_text, is_temp_of, temp_path


def test_writes_and_replaces_leaving_only_the_target(tmp_path):
    target = tmp_path / "summary.json"
    assert atomic_write_text(target, "first") == target and target.read_text() == "first"
    atomic_write_bytes(target, b"\x00second", fsync=True)
    assert target.read_bytes() == b"\x00second"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.yaml"]


def test_temporary_names_are_recognised_for_any_process():
    tmp = temp_path("/x/manifest.json")
    assert tmp.parent.as_posix() == "/x" and is_temp_of(tmp.name, "manifest.json")
    assert is_temp_of(".manifest.json.12345.tmp", "manifest.json")
    assert not is_temp_of("manifest.json", "manifest.json") and not is_temp_of(".other.json.1.tmp", "manifest.json")


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "summary.nc"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        assert target.read_text() == "old"  # a reader still sees the old file while the new one is written
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.nc"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["summary.nc"]
