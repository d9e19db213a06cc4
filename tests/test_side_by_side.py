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


def test_predict_while_a_run_writes_best_pt_reads_the_whole_old_file(tmp_path, tiny_data, monkeypatch, capsys):
    """--predict started while training replaces best.pt: the new file is written beside it and
    renamed over it in one step, so --predict reads the old best.pt whole, never half of the new one.
    The moment is made, not hoped for: --predict runs inside the writer, just before the rename."""
    import os

    import torch

    import trainA
    import utils.checkpoint
    from conftest import only_dir

    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *TINY_ARGS, "--output_dir", str(out)]) == 0
    best = only_dir(out) / "best.pt"
    images = str(tiny_data / "val" / "fungi")
    capsys.readouterr()
    assert trainA.main(["--predict", images, "--checkpoint", str(best)]) == 0
    before = capsys.readouterr().out
    newer = torch.load(best, weights_only=True)
    newer["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in newer["model"].items()}
    real_replace, seen = os.replace, []

    def replace_after_a_predict(src, dst):
        if str(dst) == str(best):
            assert trainA.main(["--predict", images, "--checkpoint", str(best)]) == 0
            seen.append(capsys.readouterr().out)
        real_replace(src, dst)

    monkeypatch.setattr(utils.checkpoint.os, "replace", replace_after_a_predict)
    utils.checkpoint.atomic_torch_save(newer, best)
    assert seen == [before]  # the old file, whole: the same predictions
    monkeypatch.setattr(utils.checkpoint.os, "replace", real_replace)
    assert trainA.main(["--predict", images, "--checkpoint", str(best)]) == 0  # and the new one loads
    assert not [p for p in best.parent.iterdir() if ".tmp" in p.name]
