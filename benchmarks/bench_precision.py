"""Pure compute of trainA's default CNN (forward + backward + AdamW step, batch 64, random
tensors) in six precision/memory-format settings, side by side in one process: fp32, bf16 and
fp16 with its GradScaler, each contiguous and channels-last.

    python benchmarks/bench_precision.py --image_size 128 224
    python benchmarks/bench_precision.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainA  # noqa: E402

SETTINGS = {"fp32": (False, None), "fp32 channels_last": (True, None), "bf16": (False, torch.bfloat16),
            "bf16 channels_last": (True, torch.bfloat16), "fp16+scaler": (False, torch.float16),
            "fp16+scaler channels_last": (True, torch.float16)}


def images_per_s(image_size: int, channels_last: bool, dtype, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = trainA.build_model(trainA.ConfigA(image_size=image_size), 10).to(device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step(), step()  # warm-up: kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu_fp16", action="store_true",
                        help="run the fp16 settings on a CPU too (emulated there: 5 img/s against fp32's 337 at 64 px "
                        "on a 2-core Xeon with AMX-BF16, minutes per setting)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for size in args.image_size:
        results = {}
        for name, (cl, dtype) in SETTINGS.items():
            if dtype == torch.float16 and device.type == "cpu" and not args.cpu_fp16:
                print(f"{name}: not run on the CPU, where fp16 is emulated and --amp auto never picks it "
                      "(--cpu_fp16 runs it)")
                continue
            try:
                results[name] = images_per_s(size, cl, dtype, args.batch_size, args.steps, device)
            except RuntimeError as error:  # e.g. fp16 kernels a CPU build lacks
                print(f"{name}: not run ({str(error).splitlines()[0][:80]})")
        line = ", ".join(f"{name} {value:.1f}" for name, value in results.items())
        print(f"{size}px img/s: {line}; bf16+channels_last vs fp32: "
              f"bf16_cl_vs_fp32_{size}px={results['bf16 channels_last'] / results['fp32']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
