"""A data source's fingerprint notices a changed file, and only a changed file."""
import os

from launcher.data.fingerprint import changed, file_fingerprint


def test_same_content_is_unchanged_even_when_touched(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n')
    before = file_fingerprint(path)
    os.utime(path, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    assert changed(before, file_fingerprint(path)) is None


def test_replaced_file_of_the_same_size_is_a_change(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n')
    before = file_fingerprint(path)
    path.write_text('{"a": 2}\n')
    assert changed(before, file_fingerprint(path)) == "content differs (same size, different sha256)"
    path.write_text('{"a": 22}\n')
    assert changed(before, file_fingerprint(path)).startswith("size 9 -> 10")


def test_folder_names_the_file_that_changed(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.parquet").write_bytes(b"x" * 10)
    before = file_fingerprint(tmp_path / "d")
    (tmp_path / "d" / "part-1.parquet").write_bytes(b"y")
    assert "added ['part-1.parquet']" in changed(before, file_fingerprint(tmp_path / "d"))
