"""What only a GPU would show, caught on the CPU: host work and syncs in the step, precision
choice and scaler state, DDP's NaN flag and per-rank randomness, device copies, feature cache."""

import pytest
import torch
from torch import nn

import trainA
import utils.runtime
from conftest import TINY_ARGS, only_dir
from data import IMAGENET_MEAN, IMAGENET_STD, NatureData, build_eval_transform
from data.cache import build_or_load, to_tensor_batch
from data.augment import BatchAugment
from data.loaders import CachedBatches, copy_to_device
from data.transforms import AugmentSpec
from data.loaders import in_order, make_loader, seed_worker_for_rank
from utils.optim import build_scheduler
from utils.checkpoint import restore_training_state
from utils.runtime import Precision
from utils.evaluation import evaluate
from utils.train import NonFiniteLoss, _check_finite

PRECISION_FREE_ARGS = [a for a in TINY_ARGS if a not in ("--amp", "off", "--channels_last", "false")]


def test_augmentation_makes_everything_on_the_input_device_with_one_transfer(monkeypatch):
    transfers = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device != self.device:
            transfers.append((self.device, out.device))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    images = torch.empty((8, 3, 40, 40), dtype=torch.uint8, device="meta")
    spec = AugmentSpec(erasing=1.0)
    out = BatchAugment(32, True, (0.5,) * 3, (0.2,) * 3, spec)(images, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (8, 3, 32, 32)
    assert transfers == [(torch.device("cpu"), torch.device("meta"))]  # the one block of random numbers


def test_augmented_batches_come_out_channels_last_when_the_model_wants_it():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    for augment in (True, False):
        out = BatchAugment(32, augment, (0.5,) * 3, (0.2,) * 3, channels_last=True)(images, torch.Generator())
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_counts_without_bincount_or_masks(monkeypatch):
    def no_bincount(*args, **kwargs):
        raise AssertionError("bincount syncs with the host on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    loader = [(torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 2, 1]))]
    stats = evaluate(model, loader, Precision(torch.device("cpu")), 3, show_progress=False)
    assert stats.per_class_total == [1, 2, 2] and stats.images == 5
    expected = (model(loader[0][0]).argmax(1) == loader[0][1]).sum().item()
    assert sum(stats.per_class_correct) == expected


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_wants_native_bf16(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    device = torch.device("cuda", 1)
    assert utils.runtime.autocast_dtype(device, "auto") == expected
    assert asked == [device]  # the chosen GPU, not the current one
    assert utils.runtime.autocast_dtype(device, "fp16") == torch.float16


def test_resume_of_a_run_without_scaler_state_into_an_fp16_run():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "none", 10, 0)
    saved_scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": saved_scaler.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": [0] * 625},
                  "epoch": 1, "best_val_accuracy": 0.5, "best_epoch": 1}
    assert checkpoint["scaler"] == {}
    import random
    checkpoint["rng"]["python"] = list(random.getstate()[1])
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = restore_training_state(checkpoint, model, optimizer, scheduler, scaler)
    assert state.epoch == 1 and scaler.is_enabled()


def test_a_nan_on_another_rank_stops_this_one_too():
    healthy = [torch.tensor(0.5), torch.tensor(0.4)]
    _check_finite(healthy, 1, 2, reduce=lambda t: t)  # nobody saw a NaN
    with pytest.raises(NonFiniteLoss):
        _check_finite(healthy, 1, 2, reduce=lambda t: t + 1)  # the sum over ranks counts one
    with pytest.raises(NonFiniteLoss):
        _check_finite([], 1, 0, reduce=lambda t: t + 1)  # no step here, still part of the vote


def test_ranks_draw_different_random_streams():
    draws = []
    for rank in (0, 1):
        torch.manual_seed(7)
        if rank:
            seed_worker_for_rank(rank, 0)
        draws.append(torch.rand(4))
    assert not torch.equal(*draws)
    # a resume without per-rank states derives a stream per rank from the saved one
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "none", 10, 0)
    import random
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": {}, "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
                  "epoch": 1, "best_val_accuracy": 0.5, "best_epoch": 1}
    after = []
    for rank in (0, 1):
        restore_training_state(checkpoint, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                               rank=rank, world=2)
        after.append(torch.rand(4))
    assert not torch.equal(*after)
    checkpoint["rng_ranks"] = [checkpoint["rng"], checkpoint["rng"]]
    for rank in (0, 1):  # saved per rank: each rank gets its own back exactly
        restore_training_state(checkpoint, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                               rank=rank, world=2)
        after.append(torch.rand(4))
    assert torch.equal(after[2], after[3])


def test_device_copy_goes_in_chunks_and_equals_the_plain_copy(tiny_data, tmp_path):
    samples = NatureData(tiny_data, "train", val_fraction=0).samples
    split = build_or_load(samples, 37, 37, 32, tmp_path / "cache")
    indices = torch.arange(len(samples))
    images, labels = copy_to_device(split, indices, torch.device("cpu"), chunk=7)
    expected_images, expected_labels = to_tensor_batch(split, indices)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_pixels_on_the_device_give_the_same_batches_as_the_host_gather(tiny_data, tmp_path):
    """--data_on_device gathers each batch from the copy already on the device; the batches,
    augmentation included, are those of the host path (on a CPU the 'device' is the host)."""
    samples = NatureData(tiny_data, "train", val_fraction=0).samples
    split = build_or_load(samples, 37, 37, 32, tmp_path / "cache")
    augment = BatchAugment(32, True, IMAGENET_MEAN, IMAGENET_STD)
    cpu = torch.device("cpu")
    batches = [list(CachedBatches(split, 5, True, augment, cpu, seed=3, on_device=on)) for on in (False, True)]
    assert len(batches[0]) == len(batches[1]) > 1
    for (host_x, host_y), (dev_x, dev_y) in zip(*batches):
        assert torch.equal(host_y, dev_y) and torch.allclose(host_x, dev_x)


@pytest.mark.parametrize("kind", ["cached", "streaming"])
def test_in_order_loader_visits_every_train_image_once(tiny_data, tmp_path, kind):
    train = NatureData(tiny_data, "train", build_eval_transform(32), val_fraction=0)
    assert len(train) % 7  # a last partial batch exists
    if kind == "cached":
        split = build_or_load(train.samples, 37, 37, 32, tmp_path / "cache")
        loader = CachedBatches(split, 7, True, BatchAugment(32, False, (0,) * 3, (1,) * 3), torch.device("cpu"))
    else:
        loader = make_loader(train, 7, True, torch.device("cpu"), 0, 0)
    assert sum(len(labels) for _, labels in loader) < len(train)  # training drops the last partial batch
    labels = torch.cat([labels for _, labels in in_order(loader)])
    assert labels.tolist() == [s.label for s in train.samples]


def test_default_precision_path_runs_end_to_end_and_resumes(tiny_data, tmp_path, capsys):
    """No --amp/--channels_last flags: whatever this CPU's default is (bf16 with bf16 units, else
    fp32; channels-last on every CPU) trains, tests and resumes."""
    out = tmp_path / "runs"
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *PRECISION_FREE_ARGS, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = "bf16, channels_last" if utils.runtime.cpu_has_bf16() else "(fp32, channels_last)"
    assert expected in printed
    run_dir = only_dir(out)
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "-e", "2", "--num_workers", "0"]) == 0


def test_fp16_with_an_enabled_scaler_saves_and_resumes_its_state(tiny_data, tmp_path):
    out = tmp_path / "runs"
    args = [a for a in TINY_ARGS if a not in ("--amp", "off")] + ["--amp", "fp16"]
    assert trainA.main(["--data_dir", str(tiny_data), "-e", "1", *args, "--output_dir", str(out)]) == 0
    run_dir = only_dir(out)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["scaler"] and last["scaler"]["scale"] > 0
    assert trainA.main(["--resume", str(run_dir / "last.pt"), "-e", "2", "--num_workers", "0"]) == 0


@pytest.mark.parametrize("cap,bf16", [("", True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                      ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_an_instruction_set_cap_below_bf16_reads_as_a_cpu_without_bf16_units(monkeypatch, cap, bf16):
    """ONEDNN_MAX_CPU_ISA=AVX2 (how benchmarks/README.md stands in for an AVX2-only CPU) leaves bf16
    emulated: --amp auto must then pick fp32, and the benchmark header say so. Channels-last stays
    on for every CPU."""
    monkeypatch.setattr(utils.runtime, "_cpuinfo", lambda: "model name\t: Some Xeon\nflags\t\t: avx2 avx512_bf16 amx_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu = torch.device("cpu")
    assert utils.runtime.cpu_has_bf16() is bf16
    assert utils.runtime.autocast_dtype(cpu, "auto") == (torch.bfloat16 if bf16 else None)
    assert utils.runtime.use_channels_last(cpu, "auto")
    assert ("runs as without bf16 units" in utils.runtime.cpu_description()) is (not bf16)
