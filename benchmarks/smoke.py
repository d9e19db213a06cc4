"""Every code path of both scripts once, in ONE process (CUDA starts once: on an H200 a fresh
process per step cost 10-17 s, nearly all start-up), then the steps that need processes of their
own (torchrun) side by side. Used by gpu_window.sh; runs on a CPU too (CUDA-only steps: skip).

    python benchmarks/smoke.py DATA_DIR --device cuda [--work DIR]

One line per step, "ok NAME (Ns)", "FAIL NAME: reason" or "skip NAME (why)", then
"smoke_ok=N smoke_failed=N smoke_skipped=N smoke_seconds=N".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import trainA  # noqa: E402
import trainB  # noqa: E402
from utils.cli import run_cli  # noqa: E402


class Smoke:
    def __init__(self, cuda: bool):
        self.cuda, self.counts, self.started = cuda, {"ok": 0, "failed": 0, "skipped": 0}, time.perf_counter()

    def step(self, name: str, script, argv: list[str], expect: int = 0, cuda_only: bool = False) -> None:
        if cuda_only and not self.cuda:
            self.counts["skipped"] += 1
            print(f"skip {name} (CUDA only)", flush=True)
            return
        started, out = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = run_cli(script.main, argv, prog=script.__name__ + ".py")
            reason = "" if code == expect else f"exit {code}, expected {expect}: {out.getvalue()[-600:]}"
        except Exception as error:  # noqa: BLE001 - a smoke test reports every failure and goes on
            reason = f"{type(error).__name__}: {error}"
        self.report(name, reason, started)

    def process(self, name: str, command: list[str], cuda_only: bool = False, timeout: int = 180,
                env: dict | None = None) -> None:
        if cuda_only and not self.cuda:
            self.counts["skipped"] += 1
            print(f"skip {name} (CUDA only)", flush=True)
            return
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), stdin=subprocess.DEVNULL)
            reason = "" if result.returncode == 0 else f"exit {result.returncode}: {result.stderr[-600:]}"
        except subprocess.TimeoutExpired:
            reason = f"no end within {timeout}s"
        self.report(name, reason, started)

    def report(self, name: str, reason: str, started: float) -> None:
        if reason:
            self.counts["failed"] += 1
            print(f"FAIL {name}: {' '.join(reason.split())}", flush=True)
        else:
            self.counts["ok"] += 1
            print(f"ok   {name} ({time.perf_counter() - started:.1f}s)", flush=True)

    def summary(self) -> str:
        return (f"smoke_ok={self.counts['ok']} smoke_failed={self.counts['failed']} "
                f"smoke_skipped={self.counts['skipped']} smoke_seconds={time.perf_counter() - self.started:.0f}")


def last_run(folder: Path) -> Path:
    return max(folder.iterdir(), key=lambda p: p.stat().st_mtime)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(args.work or tempfile.mkdtemp(prefix="smoke-"))
    cuda = args.device != "cpu" and torch.cuda.is_available()
    smoke = Smoke(cuda)
    common = ["-p", args.data_dir, "-is", "64", "-b", "32", "--device", args.device, "--no_pictures",
              "--num_workers", "2", "--wandb_mode", "disabled", "--cache_dir", str(work / "cache")]
    b_common = [*common, "--arch", "resnet18", "--weights", "none"]
    runs = work / "runs"
    for amp in ("bf16", "fp16"):
        smoke.step(f"trainA --amp {amp} (2 epochs)", trainA, [*common, "-e", "2", "--amp", amp, "--output_dir",
                                                               str(runs / amp)], cuda_only=amp == "fp16")
        if amp == "bf16" or cuda:
            smoke.step(f"trainA --amp {amp} --resume (3 epochs)", trainA,
                       ["--resume", str(last_run(runs / amp) / "last.pt"), "-e", "3", "--device", args.device])
    smoke.step("decoded images in GPU memory", trainA, [*common, "-e", "1", "--data_on_device", "true",
                                                        "--output_dir", str(runs / "ondev")], cuda_only=True)
    smoke.step("streaming (--cache off)", trainA, [*common, "-e", "1", "--cache", "off", "--output_dir",
                                                   str(runs / "stream")])
    smoke.step("recipe tools (mixup, cutmix, ema, trivialwide, randaugment, tta)", trainA,
               [*common, "-e", "1", "--mixup_alpha", "0.2", "--cutmix_alpha", "1", "--ema_decay", "0.99",
                "--auto_augment", "trivialwide", "--tta", "flip", "--output_dir", str(runs / "tools")])
    smoke.step("randaugment", trainA, [*common, "-e", "1", "--auto_augment", "randaugment", "--output_dir",
                                       str(runs / "randaugment")])
    smoke.step("trainB freeze_all (probe + feature cache)", trainB,
               [*b_common, "-e", "2", "--strategy", "freeze_all", "--probe_epochs", "3", "--output_dir",
                str(runs / "b_freeze")])
    smoke.step("trainB full (LP-FT defaults)", trainB, [*b_common, "-e", "2", "--probe_epochs", "3",
                                                        "--output_dir", str(runs / "b_full")])
    smoke.step("trainB gradual, a timm model", trainB,
               [*common, "--arch", "test_efficientnet", "--weights", "none", "-e", "2", "--strategy", "gradual",
                "--head_epochs", "1", "--output_dir", str(runs / "b_timm")])
    best = str(last_run(runs / "bf16") / "best.pt")
    smoke.step("--predict", trainA, ["--predict", str(Path(args.data_dir) / "val"), "--checkpoint", best,
                                     "--device", args.device])
    smoke.step("--test_only", trainA, ["--test_only", "--checkpoint", best, "--device", args.device])
    smoke.step("--lr_find", trainA, [*common, "--lr_find", "--lr_find_steps", "10", "--output_dir",
                                     str(runs / "lr_find")])
    smoke.step("a bad --device cuda:99 is one line, exit 2", trainA,
               [*common, "-e", "1", "--device", "cuda:99", "--dry_run"], expect=2, cuda_only=True)
    # torch.compile on a CPU costs minutes of compiling: a GPU-window question
    smoke.step("--compile (2 epochs)", trainA, [*common, "-e", "2", "--compile", "--output_dir",
                                                 str(runs / "compile")], cuda_only=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "trainA.py"), *common, "-e", "1", "--num_workers", "0"]
    smoke.process("two ranks over gloo (torchrun)", [*launcher, "--output_dir", str(runs / "gloo")],
                  env={"INAT_DIST_BACKEND": "gloo"} if cuda else None)
    smoke.process("NCCL at world size 1: DDP wrap with SyncBatchNorm, one step",
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   str(ROOT / "benchmarks" / "ddp_step.py")], cuda_only=True)
    print(smoke.summary(), flush=True)
    return 1 if smoke.counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
