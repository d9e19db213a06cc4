"""Faults and bad input, through the real scripts' entry point (in-process via run_main, or a
subprocess where the process is the subject: signals, kills, imports): every error is one line
on stderr naming the thing and the fix, with no traceback, and nothing a user trained is lost."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_ARGS, assert_one_line_error, interactive_signals, make_dataset, run_main, write_image


def train(script_args, tmp_path, script="trainA.py"):
    return run_main(script, *script_args, "--output_dir", str(tmp_path / "runs"), "--cache_dir",
                    str(tmp_path / "cache"), *TINY_ARGS)


def run_dirs(tmp_path):
    root = tmp_path / "runs"
    return [p for p in root.iterdir()] if root.exists() else []


# ---------------------------------------------------------------- data
@pytest.mark.parametrize("layout,needles", [
    ("missing", ["does not exist", "--data_dir"]),
    ("empty", ["has no train/ folder"]),
    ("no_test", ["no test folder; add val/ or test/"]),
    ("empty_class", ["holds no images", "add images or remove the folder"]),
    ("mismatch", ["do not match train/", "missing fungi", "extra zzz"]),
    ("single_image_class", ["class 'fungi' has only 1 image", "add images to"]),
    ("file_not_dir", ["is not a folder"]),
])
def test_bad_data_folders(tmp_path, layout, needles):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "file_not_dir":
        root.write_text("x")
    elif layout != "missing":
        make_dataset(root, train_per_class=3, test_per_class=1)
        if layout == "no_test":
            import shutil
            shutil.rmtree(root / "val")
        elif layout == "empty_class":
            (root / "train" / "zzz").mkdir()
            (root / "val" / "zzz").mkdir()
        elif layout == "mismatch":
            (root / "val" / "fungi").rename(root / "val" / "zzz")
        elif layout == "single_image_class":
            for p in list((root / "train" / "fungi").iterdir())[1:]:
                p.unlink()
    result = train(["--data_dir", str(root), "-e", "1"], tmp_path)
    assert_one_line_error(result, *needles)
    assert not run_dirs(tmp_path)  # nothing created that a later run could trust


def test_messy_but_usable_folder_trains_and_names_every_bad_file(tmp_path):
    root = make_dataset(tmp_path / "data", train_per_class=6, test_per_class=2)
    cls = root / "train" / "fungi"
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "truncated.jpg").write_bytes((cls / "fungi_000.jpg").read_bytes()[:60])
    (cls / "text.jpg").write_text("hello")
    (cls / "dir.jpg").mkdir()
    (cls / ".DS_Store").write_bytes(b"\0")
    (cls / "Thumbs.db").write_bytes(b"\0")
    write_image(cls / "gray.jpg", (40, 180, 60), mode="L")
    write_image(cls / "cmyk.jpg", (40, 180, 60), mode="CMYK", fmt="JPEG")
    write_image(cls / "rgba.png", (40, 180, 60), mode="RGBA", fmt="PNG")
    write_image(cls / "palette.png", (40, 180, 60), mode="P", fmt="PNG")
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(cls / "deep.png")
    write_image(cls / "with spaces and ünïcode.jpg", (40, 180, 60))
    with open(os.path.join(os.fsencode(cls), b"latin1 \xe9.jpg"), "wb") as f:
        f.write((cls / "fungi_001.jpg").read_bytes())
    os.symlink(root / "train" / "insecta", root / "train" / "linked_insecta")
    os.symlink(root / "val" / "insecta", root / "val" / "linked_insecta")
    for cache in ("auto", "off"):
        result = train(["--data_dir", str(root), "-e", "1", "--cache", cache], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        for name in ("zero.jpg", "truncated.jpg", "text.jpg"):
            assert f"skipping unreadable image '{cls / name}'" in result.stderr, (cache, name)
        assert "4 classes" in result.stdout  # the symlinked class folder counts


def test_decompression_bomb_sizes_are_handled(tmp_path, monkeypatch):
    from data import load_rgb, NatureData, build_eval_transform

    path = write_image(tmp_path / "big.png", (10, 20, 30), (400, 300), fmt="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120k pixels: warning range
    assert load_rgb(str(path)).size == (400, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # over twice the limit: PIL refuses
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(str(path))
    root = make_dataset(tmp_path / "d", train_per_class=2, test_per_class=1)
    write_image(root / "val" / "fungi" / "huge.png", (10, 20, 30), (400, 300), fmt="PNG")
    data = NatureData(root, "test", build_eval_transform(32), image_size=32)
    items = [data[i] for i in range(len(data))]
    assert sum(item is None for item in items) == 1  # skipped with a warning, not a crash


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("argv,needle", [
    (["-e", "0"], "--epochs: 0 must be >= 1"), (["-e", "-3"], "--epochs: -3 must be >= 1"),
    (["-e", "1e9"], None), (["-b", "0"], "--batch_size: 0 must be >= 1"),
    (["-lr", "0"], "--learning_rate: 0 must be > 0"), (["-lr", "inf"], "not a finite number"),
    (["-d", "1"], "--dropout: 1 must be < 1"), (["-d", "-0.1"], "--dropout: -0.1 must be >= 0"),
    (["-nf", "0"], "num_filters=0 must be >= 1"), (["-nf", "-4"], "num_filters=-4 must be >= 1"),
    (["-nf", "100000"], "> 4096"), (["-dn", "0"], "--dense_neurons: 0 must be >= 1"),
    (["-dn", "10000000"], "must be <= 65536"), (["-is", "0"], "--image_size: 0 must be >= 1"),
    (["-is", "8"], "image_size=8 is too small"), (["-is", "100000"], "larger than this CNN can use"),
    (["-fs", "0"], "must be between 1 and 31"), (["-fs", "99"], "must be between 1 and 31"),
    (["--warmup_epochs", "-1"], "must be >= 0"), (["--patience", "-1"], "must be >= 0"),
    (["--num_workers", "-2"], "must be >= -1"), (["-ls", "1"], "must be < 1"),
    (["--val_fraction", "-0.1"], "must be >= 0"), (["--num_blocks", "0"], "must be >= 1"),
    (["--amp", "fp8"], "not one of auto, bf16, fp16, off"), (["--wandb_mode", "sometimes"], "not one of auto"),
    (["-o", "rmsprop"], "not one of adamw, adam, sgd"), (["--scheduler", "step"], "not one of cosine"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_numeric_and_choice_flags(argv, needle, tmp_path):
    result = run_main("trainA.py", "--dry_run", *argv)
    if needle is None:  # absurd but valid: accepted
        assert result.returncode == 0, result.stderr
        return
    assert_one_line_error(result, *split_needle(needle))


def split_needle(needle: str) -> list[str]:
    """'--flag: message' -> ['--flag', 'message'] (argparse lists every alias between them)."""
    return needle.split(": ", 1) if needle.startswith("--") and ": " in needle else [needle]


@pytest.mark.parametrize("argv,needle", [
    (["--head_hidden", "0"], "--head_hidden: 0 must be >= 1"), (["--backbone_lr", "0"], "must be > 0"),
    (["--lr_decay", "0"], "must be > 0"), (["--lr_decay", "2"], "must be <= 1"),
    (["--arch", "lenet"], "unknown --arch 'lenet'"), (["--head", "conv"], "not one of linear, mlp"),
    (["--strategy", "gradual", "--head_epochs", "10", "-e", "5"], "leaves no epoch"),
])
def test_bad_part_b_flags(argv, needle):
    assert_one_line_error(run_main("trainB.py", "--dry_run", *argv), *split_needle(needle))


def test_batch_size_larger_than_the_data_set_still_trains(tmp_path, tiny_data):
    result = train(["--data_dir", str(tiny_data), "-e", "1", "-b", "4096"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_unwritable_output_dir_fails_before_training(tmp_path, tiny_data):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(blocker / "runs"),
                        "--cache_dir", str(tmp_path / "cache"), *TINY_ARGS)
    assert_one_line_error(result, f"cannot write to --output_dir '{blocker / 'runs'}'", "writable folder")
    assert "epoch 1" not in result.stdout


# ---------------------------------------------------------------- process
def test_sigint_mid_epoch_saves_a_valid_last_pt(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=30, test_per_class=2)
    args = [sys.executable, str(ROOT / "trainA.py"), "--data_dir", str(data), "-e", "200", "--output_dir",
            str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), *TINY_ARGS, "-b", "2", "--patience", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=interactive_signals)
    for line in proc.stdout:
        if line.startswith("epoch 1/200"):  # inside fit(), which --patience 0 keeps from ending early
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted during epoch" in lines[0] and "--resume" in lines[0]
    (run_dir,) = run_dirs(tmp_path)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["interrupted"] is True and last["epoch"] >= 1
    assert not list(run_dir.glob(".*.tmp-*"))


@pytest.mark.parametrize("where", ["half of the bytes written", "written, before fsync and rename"])
def test_sigkill_during_checkpoint_writes_leaves_the_previous_one_loadable(tmp_path, where):
    """The child stops at a chosen point inside the second write and says so; the kill lands
    there, not where a sleep happens to end."""
    pause = ("import io, os\n"
             "real_save, real_fsync = torch.save, os.fsync\n"
             "def half(obj, f):\n"
             "    buffer = io.BytesIO(); real_save(obj, buffer); data = buffer.getvalue()\n"
             "    f.write(data[:len(data) // 2]); f.flush(); print('paused', flush=True); sys.stdin.readline()\n"
             "def before_rename(fd):\n"
             "    real_fsync(fd); print('paused', flush=True); sys.stdin.readline()\n")
    patch = "torch.save = half\n" if where.startswith("half") else "os.fsync = before_rename\n"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from utils.checkpoint import atomic_torch_save\n"
            "big = {'model': {'w': torch.zeros(2_000_000)}, 'config': {}}\n"
            "atomic_torch_save(big, sys.argv[2]); print('first', flush=True)\n"
            f"{pause}{patch}big['model']['w'] += 1; atomic_torch_save(big, sys.argv[2])\n")
    target = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(target)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    assert proc.stdout.readline().strip() == "paused"
    proc.kill()
    proc.wait()
    payload = torch.load(target, weights_only=True)  # the first version, whole
    assert payload["model"]["w"].shape == (2_000_000,) and float(payload["model"]["w"].max()) == 0.0


def test_nan_from_a_huge_learning_rate_stops_cleanly(tmp_path, tiny_data):
    result = train(["--data_dir", str(tiny_data), "-e", "3", "-lr", "1e12", "-o", "sgd", "-bn", "false",
                    "--warmup_epochs", "0"], tmp_path)
    assert_one_line_error(result, "loss became NaN/inf at epoch 1, step", "lower --lr", code=1)


# ---------------------------------------------------------------- security
def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Evil(), "config": {}}, tmp_path / "evil.pt")
    for flags in (["--test_only", "--checkpoint"], ["--resume"], ["--predict", str(tmp_path), "--checkpoint"]):
        result = run_main("trainA.py", *flags, str(tmp_path / "evil.pt"))
        assert_one_line_error(result, "refused", "could run code")
    assert not marker.exists()


def test_truncated_checkpoint_is_one_line(tmp_path):
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04garbage")
    assert_one_line_error(run_main("trainA.py", "--test_only", "--checkpoint", str(tmp_path / "cut.pt")),
                          "truncated or not a PyTorch file")


# ---------------------------------------------------------------- wandb
def test_online_without_credentials_falls_back_to_offline_with_a_note(tmp_path, tiny_data):
    args = [a if a != "disabled" else "online" for a in TINY_ARGS]
    result = run_main("trainA.py", "--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(tmp_path / "runs"),
                        "--cache_dir", str(tmp_path / "cache"), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: wandb is not logged in; logging offline" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert list(run_dir.glob("wandb/offline-run-*"))


def test_disabled_wandb_imports_nothing_of_wandb(tmp_path, tiny_data):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import trainA; "
            "code = trainA.main(sys.argv[2:]); "
            "print('WANDB_MODULES', sorted(m for m in sys.modules if m == 'wandb' or m.startswith('wandb.'))); "
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), "--data_dir", str(tiny_data), "-e", "1",
                             "--output_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"),
                             *TINY_ARGS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WANDB_MODULES []" in result.stdout
