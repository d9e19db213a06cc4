"""torchrun support: process group, per-rank device, sharded batches, all-reduced counts.

Every global batch of --batch_size images is split between the ranks as batch[rank::world],
so together the ranks see exactly the batches one process would, and the gradient DDP averages
is the one-process gradient. Eval batches are split the same way without padding, so every
val/test image is counted once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def reduce(self):
        """All-reduce sum of count tensors over the ranks; None for one process (nothing to add)."""
        return all_reduce_sum if self.enabled else None

    def wait_for_all(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, value) -> list | None:
        """Every rank's value, in rank order, on every rank; None for one process."""
        return all_gather_object(value) if self.enabled else None


def setup(device_name: str) -> tuple[DistInfo, str]:
    """Join torchrun's process group if launched by torchrun; returns (info, device name)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device_name
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    # INAT_DIST_BACKEND=gloo: CUDA tensors over gloo, ranks sharing GPUs (for checking the DDP
    # code paths with one GPU; NCCL refuses two ranks on one device).
    backend = os.environ.get("INAT_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        if backend == "gloo":
            info_device = info.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(info_device)
            device_name = f"cuda:{info_device}"
        elif info.local_rank >= torch.cuda.device_count():
            raise UsageError(f"torchrun started {world} processes on this node but only {torch.cuda.device_count()} "
                             "GPU(s) are visible; lower --nproc_per_node")
        else:
            torch.cuda.set_device(info.local_rank)
            device_name = f"cuda:{info.local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        if backend == "nccl":  # device_id binds NCCL's communicator to this rank's GPU up front
            dist.init_process_group("nccl", device_id=torch.device(device_name))
        else:
            dist.init_process_group(backend)
    return info, device_name


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(value) -> list:
    """Every rank's value, in rank order, on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value, src: int = 0):
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise UsageError(f"--batch_size {batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}")


def wrap_ddp(model: torch.nn.Module, sync_bn: bool, unfreezes_later: bool, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around model, optionally with synchronised BatchNorm.

    unfreezes_later: the strategy (trainB's gradual) unfreezes parameters mid-run, so DDP must
    know them from the start and skip them while they get no gradient (find_unused_parameters,
    which costs a graph walk each step; every other run leaves it off).
    """
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        if device.type != "cuda":
            raise UsageError("--sync_bn works only on CUDA GPUs (PyTorch's SyncBatchNorm); drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    find_unused = bool(frozen) and unfreezes_later
    if find_unused:
        for p in frozen:
            p.requires_grad_(True)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=find_unused)
    for p in frozen:
        p.requires_grad_(False)
    return wrapped
