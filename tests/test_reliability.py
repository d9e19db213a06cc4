"""Reliability, round three: each class of failure fixed at its root, tried as a user would.
Round two's cases are in test_reliability_round2.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainA
import trainB
from conftest import TINY_ARGS, assert_one_line_error, make_dataset, run_main


def break_split(root: Path, split: str) -> int:
    """Turn every image of a split folder into a git-lfs pointer file; returns how many."""
    files = [f for f in (root / split).rglob("*.jpg")]
    for f in files:
        f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1234\n")
    return len(files)


@pytest.mark.parametrize("script", ["trainA.py", "trainB.py"])
@pytest.mark.parametrize("cache", ["auto", "off"])
@pytest.mark.parametrize("folder,split", [("val", "test"), ("train", "train")])
def test_a_split_left_empty_by_unreadable_files_is_refused_before_anything_is_written(tmp_path, script, cache,
                                                                                      folder, split):
    data = make_dataset(tmp_path / "data")
    count = break_split(data, folder)
    out = tmp_path / "runs"
    args = [a for a in TINY_ARGS if script == "trainA.py" or a not in ("-nf", "4", "-fo", "same", "-dn", "16")]
    extra = ["--arch", "resnet18", "--weights", "none"] if script == "trainB.py" else []
    result = run_main(script, "--data_dir", str(data), "--output_dir", str(out), "--cache", cache,
                      "--cache_dir", str(tmp_path / "cache"), *args, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    if split == "train":  # the val split, carved from train/ and first to be read in the cached path, or train
        assert "split in" in last and "unreadable" in last, last
    else:
        assert f"every one of the {count} files of the test split" in last, last
    assert "git-lfs" in last and "Traceback" not in result.stderr
    assert not out.exists()
