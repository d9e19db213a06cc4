"""Screen training recipes side by side on one GPU: every recipe x seed is its own trainA.py
process, all at once (a small CNN leaves an H200 mostly idle, so N runs together take far less
than N runs in a row). Prints, and writes to --table, one row per run and the mean of the seeds
per recipe, ranked by best val_accuracy; the table is rewritten as the runs go, so a run cut off
by a time limit still shows how far it got.

    python benchmarks/screen_recipes.py -p DATA -o RUNS --recipes benchmarks/recipes_128.txt \
        --seeds 0 1 --limit_s 420 --table OUT.md -- -is 128 -e 30

A recipe file holds one recipe per line: `name | flags`; '#' starts a comment. The flags after
`--` are given to every run. Epoch times in the table are under contention: not a speed figure.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def read_recipes(path: Path) -> list[tuple[str, str]]:
    recipes = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, flags = line.partition("|")
            recipes.append((name.strip(), flags.strip()))
    return recipes


def run_row(run_dir: Path) -> dict | None:
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        return None
    rows = list(csv.DictReader(metrics.open()))
    if not rows:
        return None
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    test_path = run_dir / "test_metrics.json"
    test = json.loads(test_path.read_text())["test_accuracy"] if test_path.exists() else None
    return dict(epochs=len(rows), best_val=float(best["val_accuracy"]), best_epoch=int(best["epoch"]),
                train_acc=float(rows[-1]["train_accuracy"]), test=test,
                minutes=sum(float(r["epoch_time_s"]) for r in rows) / 60)


def table(runs: list[tuple[str, str, int, Path]], common: str) -> str:
    lines = [f"common flags: `{common}`", "",
             "| recipe | flags | seed | epochs done | best val (epoch) | last train acc | test | min |",
             "|---|---|---|---|---|---|---|---|"]
    per_recipe: dict[str, list[float]] = {}
    rows = []
    for name, flags, seed, run_dir in runs:
        row = run_row(run_dir)
        if row is None:
            rows.append((-1.0, f"| {name} | `{flags}` | {seed} | 0 | - | - | - | - |"))
            continue
        per_recipe.setdefault(name, []).append(row["best_val"])
        test = f"{row['test']:.4f}" if row["test"] is not None else "-"
        rows.append((row["best_val"], f"| {name} | `{flags}` | {seed} | {row['epochs']} | {row['best_val']:.4f} "
                     f"({row['best_epoch']}) | {row['train_acc']:.3f} | {test} | {row['minutes']:.1f} |"))
    lines += [r for _, r in sorted(rows, key=lambda r: -r[0])]
    lines += ["", "| recipe | mean best val | seeds |", "|---|---|---|"]
    for name, vals in sorted(per_recipe.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        lines.append(f"| {name} | {sum(vals) / len(vals):.4f} | {len(vals)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--data_dir", required=True)
    parser.add_argument("-o", "--output_dir", required=True)
    parser.add_argument("--recipes", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit_s", type=float, default=0, help="stop every run after this many seconds (0: none)")
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args(own)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, procs = [], []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled")
    for name, flags in read_recipes(args.recipes):
        for seed in args.seeds:
            run_name = f"{name}_s{seed}"
            cmd = [sys.executable, "trainA.py", "-p", args.data_dir, "--output_dir", str(out), "--run_name", run_name,
                   "--seed", str(seed), "--no_pictures", "--wandb_mode", "disabled", *common, *shlex.split(flags)]
            log = (out / f"{run_name}.log").open("w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            runs.append((name, flags, seed, out / run_name))
    started = time.monotonic()
    common_text = " ".join(common)
    while any(p.poll() is None for p in procs):
        if args.limit_s and time.monotonic() - started > args.limit_s:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            break
        if args.table:
            args.table.write_text(table(runs, common_text))
        time.sleep(10)
    text = table(runs, common_text)
    text += f"\nwall time {time.monotonic() - started:.0f} s for {len(runs)} runs; exit codes {[p.returncode for p in procs]}\n"
    if args.table:
        args.table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
