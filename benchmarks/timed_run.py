"""A whole trainA run, timed from the command to the finished test (decode, cache, epochs, test),
in this process. For gpu_window.sh; prints key=value figures.

    python benchmarks/timed_run.py DATA_DIR --device cuda --image_size 224 --epochs 10
    python benchmarks/timed_run.py DATA_DIR --compare_compile         # the same run with --compile off, then on
    python benchmarks/timed_run.py DATA_DIR --epochs 30 --seeds 0 1     # seeds side by side (processes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_once(argv: list[str], out: Path) -> tuple[float, list[dict], dict]:
    import trainA

    started = time.perf_counter()
    code = trainA.main([*argv, "--output_dir", str(out)])
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"trainA exited {code}")
    (run_dir,) = out.iterdir()
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return wall, rows, json.loads((run_dir / "test_metrics.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--compare_compile", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="timed-run-"))
    base = ["-p", args.data_dir, "-is", str(args.image_size), "-e", str(args.epochs), "--device", args.device,
            "--no_pictures", "--wandb_mode", "disabled", "--cache_dir", str(work / "cache"), "--patience", "0"]
    if args.seeds:  # side by side on one device, one process each
        procs = {seed: subprocess.Popen([sys.executable, __file__, args.data_dir, "--device", args.device,
                                         "--image_size", str(args.image_size), "--epochs", str(args.epochs),
                                         "--seeds"], env=dict(os.environ, TIMED_RUN_SEED=str(seed)),
                                        stdout=subprocess.PIPE, text=True) for seed in args.seeds}
        for seed, proc in procs.items():
            out, _ = proc.communicate()
            print("\n".join(line.replace("=", f"_seed{seed}=", 1) for line in out.splitlines() if "=" in line))
        return
    if "TIMED_RUN_SEED" in os.environ:
        base += ["--seed", os.environ["TIMED_RUN_SEED"]]
    variants = [("off", []), ("on", ["--compile"])] if args.compare_compile else [("", [])]
    epoch_s = {}
    for name, extra in variants:
        wall, rows, test = run_once([*base, *extra], work / f"runs-{name or 'one'}")
        images = sum(float(r["train_images_per_s"]) * float(r["epoch_time_s"]) for r in rows)
        epoch_s[name] = float(rows[-1]["epoch_time_s"])
        suffix = f"_compile_{name}" if name else ""
        print(f"wall_s{suffix}={wall:.1f} train_img_per_s{suffix}={images / sum(float(r['epoch_time_s']) for r in rows):.0f} "
              f"last_epoch_s{suffix}={epoch_s[name]:.2f} best_val_accuracy{suffix}={test['best_val_accuracy']:.4f} "
              f"test_accuracy{suffix}={test['test_accuracy']:.4f}", flush=True)
    if args.compare_compile:
        print(f"compile_speedup_last_epoch={epoch_s['off'] / epoch_s['on']:.2f}")


if __name__ == "__main__":
    main()
