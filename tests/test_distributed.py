"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, interactive_signals, make_dataset, only_dir, read_metrics
from data.loaders import ShardedBatchSampler

COMMON = ["-e", "2", "-is", "32", "-nf", "4", "-fo", "same", "-dn", "16", "-b", "8", "--device", "cpu",
          "--wandb_mode", "disabled", "--amp", "off", "--channels_last", "false", "--no_pictures",
          "--num_workers", "0"]
# Without BN, dropout and augmentation the two runs do the same arithmetic up to summation order.
EXACT = ["-bn", "false", "-da", "false", "-d", "0"]


def run(argv, nproc: int, env_extra=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([*launcher, str(ROOT / "trainA.py"), *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def metrics(out):
    run_dir = only_dir(out)
    return run_dir, read_metrics(run_dir)


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_two_processes_match_one_process(tmp_path, cache):
    data = make_dataset(tmp_path / "data", train_per_class=12, test_per_class=5)
    args = ["--data_dir", str(data), *COMMON, *EXACT, "--cache", cache, "--cache_dir", str(tmp_path / "cache")]
    two = run([*args, "--output_dir", str(tmp_path / "two")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([*args, "--output_dir", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    run_dir, rows_two = metrics(tmp_path / "two")
    _, rows_one = metrics(tmp_path / "one")
    assert len(rows_two) == 2  # one run directory, one metrics.csv, one row per epoch
    for a, b in zip(rows_two, rows_one):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key
    results = json.loads((run_dir / "test_metrics.json").read_text())
    assert results["test_images"] == 15  # all-reduced eval counts cover the test set exactly once
    assert torch.load(run_dir / "best.pt", weights_only=True)["model"]  # written once, loadable


def test_two_processes_with_batch_norm_and_augmentation_finish(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=12, test_per_class=5)
    result = run(["--data_dir", str(data), *COMMON, "--output_dir", str(tmp_path / "out"),
                  "--cache_dir", str(tmp_path / "cache")], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, rows = metrics(tmp_path / "out")
    assert len(rows) == 2 and (run_dir / "last.pt").is_file()


def no_traceback_from_our_code(stderr: str) -> bool:
    # torchrun reports a failed child with a traceback of its own (torch/distributed/...);
    # none may point into this project's code. Only the project's own files count: a virtualenv
    # created inside the clone (.venv/) holds torch's frames under ROOT too.
    ours = re.compile(r'File "' + re.escape(str(ROOT)) + r'/(trainA\.py|trainB\.py|data/|models/|utils/)')
    return not ours.search(stderr)


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=4, test_per_class=2)
    result = run(["--data_dir", str(data), *COMMON, "--sync_bn", "--output_dir", str(tmp_path / "out"),
                  "--cache_dir", str(tmp_path / "cache")], 2)
    assert result.returncode != 0 and "--sync_bn works only on CUDA GPUs" in result.stderr
    assert no_traceback_from_our_code(result.stderr)


def test_batch_size_must_split_evenly(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=4, test_per_class=2)
    result = run(["--data_dir", str(data), *COMMON, "-b", "7", "--output_dir", str(tmp_path / "out")], 2)
    assert result.returncode != 0
    assert "--batch_size 7 does not split evenly over 2 processes" in result.stderr
    assert no_traceback_from_our_code(result.stderr)


@pytest.mark.parametrize("train", [True, False])
def test_sharded_batches_together_are_the_single_process_batches(train):
    def batches(rank, world):
        generator = torch.Generator().manual_seed(3)
        return list(ShardedBatchSampler(21, 6, train, generator, rank, world))

    single = batches(0, 1)
    parts = [batches(r, 2) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    for whole, a, b in zip(single, *parts):
        assert sorted(a + b) == sorted(whole)
    seen = [i for batch in single for i in batch]
    assert len(seen) == len(set(seen)) and len(seen) == (18 if train else 21)


def test_resume_under_torchrun_continues_the_run(tmp_path):
    data = make_dataset(tmp_path / "data", train_per_class=12, test_per_class=5)
    args = ["--data_dir", str(data), *COMMON, "--cache_dir", str(tmp_path / "cache")]
    first = run([*args, "-e", "1", "--output_dir", str(tmp_path / "out")], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir, rows = metrics(tmp_path / "out")
    resumed = run(["--resume", str(run_dir / "last.pt"), "-e", "2", "--num_workers", "0"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, rows = metrics(tmp_path / "out")
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_ctrl_c_on_the_launcher_leaves_a_valid_last_pt(tmp_path):
    import signal

    data = make_dataset(tmp_path / "data", train_per_class=30, test_per_class=2)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "trainA.py"), "--data_dir", str(data), *COMMON, "-e", "200", "-b", "2", "--patience", "0",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            preexec_fn=interactive_signals)
    for line in proc.stdout:
        if line.startswith("epoch 1/200"):  # fit() is running (--patience 0: it cannot end early)
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    run_dir = only_dir(tmp_path / "out")
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] >= 1 and last["model"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_localhost_match_one_process(tmp_path):
    """Two launchers, as on two machines (--nnodes=2, c10d rendezvous on 127.0.0.1), each with its
    own cache and output folder: one run directory appears (on the node holding rank 0) and its
    metrics equal a one-process run's."""
    data = make_dataset(tmp_path / "data", train_per_class=12, test_per_class=5)
    port = free_port()
    launchers = []
    for node in (0, 1):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-node-test",
                str(ROOT / "trainA.py"), "--data_dir", str(data), *COMMON, *EXACT,
                "--cache_dir", str(tmp_path / f"cache{node}"), "--output_dir", str(tmp_path / f"out{node}")]
        launchers.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                          env=dict(os.environ, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL))
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    written = [tmp_path / f"out{node}" for node in (0, 1) if (tmp_path / f"out{node}").exists()
               and any((tmp_path / f"out{node}").iterdir())]
    assert len(written) == 1  # rank 0's node alone writes the run directory
    one = run(["--data_dir", str(data), *COMMON, *EXACT, "--cache_dir", str(tmp_path / "cache1p"),
               "--output_dir", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    _, rows_two = metrics(written[0])
    _, rows_one = metrics(tmp_path / "one")
    assert len(rows_two) == len(rows_one) == 2
    for a, b in zip(rows_two, rows_one):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key
