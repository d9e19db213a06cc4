"""--export: a checkpoint as a torch.export file (.pt2) plain PyTorch loads without this repository, with
its class names and preprocessing beside it, ranking classes as --predict does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import trainA
import trainB
from conftest import TINY_ARGS, only_dir, run_main

# Run in a fresh interpreter whose path holds none of this repository: only torch, torchvision, PIL.
OUTSIDE = r"""
import json, sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p) / "trainA.py").exists() and p not in ("", ".")]
import torch
from PIL import Image
from torchvision.transforms import v2
cut = sys.argv.index("--")
images, exports = sys.argv[1:cut], sys.argv[cut + 1:]
for program, meta_path in zip(exports[::2], exports[1::2]):
    model, meta = torch.export.load(program).module(), json.load(open(meta_path))
    prep = v2.Compose([v2.ToImage(), v2.Resize(meta["resize"], antialias=True), v2.CenterCrop(meta["image_size"]),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])])
    batch = torch.stack([prep(Image.open(path).convert("RGB")) for path in images])  # any batch size
    with torch.no_grad():
        top1 = model(batch).argmax(1).tolist()
    for path, k in zip(images, top1):
        print(path, meta["class_names"][k])
assert "utils" not in sys.modules and "trainA" not in sys.modules
"""


def top1_of_predict(script: str, checkpoint, images) -> dict[str, str]:
    result = run_main(script, "--predict", *map(str, images), "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    return {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(" ")[0] for line in result.stdout.splitlines()
            if ": " in line}


B_COMMON = ["-is", "32", "-b", "8", "--num_workers", "0", "--wandb_mode", "disabled", "--amp", "off",
            "--channels_last", "false", "--no_pictures", "--refit", "false"]
RUNS = {  # trainA's CNN, a torchvision model, a timm model
    "cnn": (trainA, [*TINY_ARGS]),
    "torchvision": (trainB, ["--arch", "mobilenet_v3_small", "--weights", "none", "--strategy", "freeze_all",
                             "--probe_epochs", "2", *B_COMMON]),
    "timm": (trainB, ["--arch", "test_efficientnet", "--weights", "none", "--strategy", "full", "--probe_epochs", "0",
                      *B_COMMON]),
}


def test_exports_load_without_the_repository_and_agree_with_predict(tiny_data, tmp_path):
    pytest.importorskip("timm")
    images = sorted((tiny_data / "val").rglob("*.jpg"))[:6]
    outside_args, expected = [], {}
    for name, (module, extra) in RUNS.items():
        out = tmp_path / name
        assert module.main(["--data_dir", str(tiny_data), "-e", "1", "--output_dir", str(out), *extra]) == 0
        best = only_dir(out) / "best.pt"
        script = f"{module.__name__}.py"
        assert run_main(script, "--export", "--checkpoint", str(best)).returncode == 0
        meta = json.loads(best.with_suffix(".json").read_text())
        assert meta["image_size"] == 32 and len(meta["class_names"]) == 3 and meta["tta"] == "flip"
        outside_args += [str(best.with_suffix(".pt2")), str(best.with_suffix(".json"))]
        expected[name] = top1_of_predict(script, best, images)
    # one fresh interpreter for the three (its start is the slow part)
    out = subprocess.run([sys.executable, "-c", OUTSIDE, *map(str, images), "--", *outside_args],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    for k, name in enumerate(RUNS):
        got = dict(line.rsplit(" ", 1) for line in lines[k * len(images):(k + 1) * len(images)])
        assert got == expected[name], name


def test_export_without_a_checkpoint_is_one_line():
    from conftest import assert_one_line_error

    assert_one_line_error(run_main("trainA.py", "--export"), "--export needs --checkpoint")
