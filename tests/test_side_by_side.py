"""Runs side by side (issue 40, item 4): a sweep's agents start together on one machine, with the
same names and the same cache folder. Processes, because that is the subject."""

import json
import subprocess
import sys

from conftest import ROOT, TINY_ARGS, make_dataset


def test_two_runs_started_together_with_one_name_and_one_cache_both_finish_apart(tmp_path):
    """Same --run_name, --output_dir and --cache_dir, started at the same moment: each run gets its
    own folder (name, name-2), the decoded-image cache is built by one and read by the other (a
    file lock; whichever order the two reach it in, the outcome must be this), nothing half-written
    is left, and each run's files are its own."""
    data = make_dataset(tmp_path / "data", train_per_class=6, test_per_class=2)
    out, cache = tmp_path / "runs", tmp_path / "cache"
    argv = [sys.executable, str(ROOT / "trainA.py"), "--data_dir", str(data), "-e", "1", *TINY_ARGS,
            "--output_dir", str(out), "--cache_dir", str(cache), "--run_name", "agent"]
    # Two agents' settings: the same data and seed (so the same split), another learning rate.
    processes = [subprocess.Popen([*argv, "-lr", lr], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True) for lr in ("0.001", "0.002")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    for code, _, err in results:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["agent", "agent-2"]
    rates = sorted(json.loads((out / name / "config.json").read_text())["lr"] for name in ("agent", "agent-2"))
    assert rates == [0.001, 0.002]  # each folder holds the run that made it, not a mix
    for name in ("agent", "agent-2"):
        assert json.loads((out / name / "state.json").read_text())["state"] == "finished"
    leftovers = [p.name for p in cache.rglob("*") if "tmp" in p.name or p.name.startswith(".")]
    assert not leftovers
    arrays = sorted(p.name for p in cache.rglob("*.npy"))
    assert len(arrays) == len(set(arrays)) == 3  # train, val, test: once each
