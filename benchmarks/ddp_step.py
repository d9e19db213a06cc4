"""Run under torchrun (world size 1 is enough): NCCL process group, the DDP wrap trainA uses with
SyncBatchNorm, and one bf16 training step on the GPU.

    torchrun --standalone --nproc_per_node=1 benchmarks/ddp_step.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainA  # noqa: E402
from utils import distributed  # noqa: E402


def main() -> None:
    info, device_name = distributed.setup("cuda")
    if not torch.distributed.is_initialized():  # world size 1: torchrun still sets the variables
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", 0))
    device = torch.device(device_name if device_name.startswith("cuda:") else "cuda:0")
    cfg = trainA.ConfigA(image_size=64, sync_bn=True)
    model = trainA.build_model(cfg, 10).to(device)
    wrapped = distributed.wrap_ddp(model, cfg.sync_bn, False, device)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    x = torch.randn(8, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(wrapped(x).float(), torch.randint(0, 10, (8,), device=device))
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    print(f"DDP + SyncBatchNorm step on {device} over {torch.distributed.get_backend()}: loss {loss.item():.3f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
