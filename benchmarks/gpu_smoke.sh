#!/usr/bin/env bash
# The first minutes on a GPU machine: every CUDA branch once, the host-device syncs of one training
# epoch, then the three benchmarks with --device cuda. Over 4 minutes on one H200 (its first 12 steps took 230 s).
#
#   bash benchmarks/gpu_smoke.sh                 # on a machine with a CUDA GPU
#   bash benchmarks/gpu_smoke.sh --device cpu    # dry check of this script's plumbing on a CPU:
#                                                # the CUDA-only steps are skipped with a line saying so
#   SMOKE_LOG=smoke.log bash benchmarks/gpu_smoke.sh   # also keep every step's whole output there
#
# Each step prints "ok <step>", "FAIL <step>" (with the command's last lines) or "skip <step> (why)";
# the last line is "gpu_smoke: N ok, N failed, N skipped", and the exit code is 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE="${2:-cuda}"
PY=${PYTHON:-python}
WORK=$(mktemp -d /tmp/gpu_smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export WANDB_MODE=disabled WANDB_SILENT=true XDG_CACHE_HOME="$WORK/xdg"
OK=0; FAILED=0; SKIPPED=0
CUDA=0
[ "$DEVICE" != "cpu" ] && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CUDA=1
if [ "$DEVICE" != "cpu" ] && [ $CUDA = 0 ]; then
  echo "gpu_smoke: --device $DEVICE but torch sees no CUDA GPU; run with --device cpu for the dry check"; exit 2
fi

step() {  # step NAME COMMAND...
  local name=$1; shift
  local started=$SECONDS
  local code=0
  "$@" > "$WORK/log" 2>&1 || code=$?
  [ -n "${SMOKE_LOG:-}" ] && { echo "=== $name (exit $code)"; cat "$WORK/log"; } >> "$SMOKE_LOG"
  if [ $code = 0 ]; then
    OK=$((OK + 1)); echo "ok   $name ($((SECONDS - started))s)"
  else
    FAILED=$((FAILED + 1)); echo "FAIL $name (exit $code)"; tail -n 15 "$WORK/log" | sed 's/^/     /'
  fi
}
cuda_step() {  # like step, skipped on the CPU
  if [ $CUDA = 1 ]; then step "$@"; else SKIPPED=$((SKIPPED + 1)); echo "skip $1 (CUDA only)"; fi
}
expect_code() {  # expect_code CODE COMMAND...: passes when the command exits with CODE
  local code=$1; shift
  "$@"; [ $? = "$code" ]
}
last_run() { ls -td "$WORK/runs/$1"/*/ | head -n 1; }

echo "gpu_smoke on $DEVICE: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"
$PY benchmarks/make_fake_inat.py "$WORK/data" --train_per_class 24 --val_per_class 4 > /dev/null
A=(trainA.py -p "$WORK/data" -is 64 -b 32 --device "$DEVICE" --no_pictures --num_workers 2)
B=(trainB.py -p "$WORK/data" -is 64 -b 32 --device "$DEVICE" --no_pictures --num_workers 2 --arch resnet18 --weights none)

# precision: bf16 and fp16 with its scaler, each resumed from its last.pt
for amp in bf16 fp16; do
  if [ $CUDA = 0 ] && [ $amp = fp16 ]; then SKIPPED=$((SKIPPED + 2)); echo "skip fp16+scaler run and resume (CUDA only)"; continue; fi
  step "trainA --amp $amp (2 epochs)" $PY "${A[@]}" -e 2 --amp $amp --output_dir "$WORK/runs/$amp"
  step "trainA --amp $amp --resume (to 3 epochs)" $PY trainA.py --resume "$(last_run $amp)last.pt" -e 3 --device "$DEVICE"
done
cuda_step "resume an fp32 last.pt into an fp16 run" $PY - "$WORK" <<'PY'
import sys, torch
sys.path.insert(0, "."); work = sys.argv[1]
from utils.checkpoint import restore_training_state
from torch import nn
m = nn.Linear(3, 2).cuda(); o = torch.optim.SGD(m.parameters(), lr=0.1)
s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0)
import random
ck = {"model": m.state_dict(), "optimizer": o.state_dict(), "scheduler": s.state_dict(), "scaler": {},
      "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}, "epoch": 1,
      "best_val_accuracy": 0.1, "best_epoch": 1}
restore_training_state(ck, m, o, s, torch.amp.GradScaler("cuda", enabled=True))
PY
cuda_step "decoded images in GPU memory (--data_on_device true)" $PY "${A[@]}" -e 1 --data_on_device true --output_dir "$WORK/runs/ondev"
step "streaming (--cache off)" $PY "${A[@]}" -e 1 --cache off --output_dir "$WORK/runs/stream"
step "--compile" $PY "${A[@]}" -e 2 --compile --output_dir "$WORK/runs/compile"
step "recipe tools (mixup, cutmix, ema, trivialwide, tta)" $PY "${A[@]}" -e 1 --mixup_alpha 0.2 --cutmix_alpha 1 \
  --ema_decay 0.99 --auto_augment trivialwide --tta flip --output_dir "$WORK/runs/tools"
step "trainB freeze_all with the feature cache" $PY "${B[@]}" -e 2 --strategy freeze_all --feature_cache true --output_dir "$WORK/runs/b_freeze"
step "trainB gradual" $PY "${B[@]}" -e 2 --strategy gradual --head_epochs 1 --output_dir "$WORK/runs/b_gradual"
step "--predict" $PY trainA.py --predict "$WORK/data/val" --checkpoint "$(last_run bf16)best.pt" --device "$DEVICE"
step "--test_only" $PY trainA.py --test_only --checkpoint "$(last_run bf16)best.pt" --device "$DEVICE"
step "--lr_find" $PY "${A[@]}" --lr_find --lr_find_steps 10 --output_dir "$WORK/runs/lr_find"
cuda_step "a bad --device cuda:99 is one line, exit 2" expect_code 2 $PY "${A[@]}" -e 1 --device cuda:99 --dry_run
if [ $CUDA = 1 ]; then
  step "two ranks on one GPU over gloo (torchrun)" env INAT_DIST_BACKEND=gloo $PY -m torch.distributed.run --standalone \
    --nproc_per_node=2 "${A[@]}" -e 1 --output_dir "$WORK/runs/gloo2"
else
  step "two ranks on the CPU over gloo (torchrun)" $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
    "${A[@]}" -e 1 --num_workers 0 --output_dir "$WORK/runs/gloo2"
fi
cuda_step "NCCL at world size 1: DDP wrap with SyncBatchNorm, one step" $PY -m torch.distributed.run --standalone \
  --nproc_per_node=1 benchmarks/ddp_step.py
cuda_step "host-device syncs in one training epoch" $PY benchmarks/count_syncs.py "$WORK/data"
[ $CUDA = 1 ] && cat "$WORK/log" | tail -n 3

# the benchmarks, last lines only
BENCH=$( [ $CUDA = 1 ] && echo cuda || echo cpu )
STEPS=$( [ $CUDA = 1 ] && echo 30 || echo 2 )
$PY benchmarks/make_fake_inat.py "$WORK/bench" --train_per_class $( [ $CUDA = 1 ] && echo 200 || echo 8 ) --val_per_class 2 > /dev/null
step "bench_precision" $PY benchmarks/bench_precision.py --device $BENCH --image_size $( [ $CUDA = 1 ] && echo 128 224 || echo 64 ) --steps $STEPS
tail -n 1 "$WORK/log"
step "bench_epoch" $PY benchmarks/bench_epoch.py "$WORK/bench" --device $BENCH --image_size $( [ $CUDA = 1 ] && echo 224 || echo 64 )
tail -n 1 "$WORK/log"
step "bench_freeze" $PY benchmarks/bench_freeze.py "$WORK/bench" --device $BENCH --arch resnet50 \
  --image_size $( [ $CUDA = 1 ] && echo 224 || echo 64 ) --max_images $( [ $CUDA = 1 ] && echo 512 || echo 32 )
tail -n 1 "$WORK/log"
echo "gpu_smoke: $OK ok, $FAILED failed, $SKIPPED skipped"
[ $FAILED = 0 ]
