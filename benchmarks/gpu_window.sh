#!/usr/bin/env bash
# Everything a short GPU window must answer, most important first, each step time-boxed, one line
# per figure ("name value") printed and appended to one results file. Within 8 minutes on one
# H200 with the machine already started (the step limits below add up to 470 s).
#
#   bash benchmarks/gpu_window.sh                        # on the GPU machine: results in gpu_window_results.txt
#   bash benchmarks/gpu_window.sh --device cpu           # dry run of every step at toy sizes; CUDA-only: "skip"
#   RESULTS=$OUT/window.txt IMAGENETTE=/data/imagenette bash benchmarks/gpu_window.sh
#
# A step that fails or runs out of time records "<step> FAIL" or "<step> TIMEOUT" and the next one
# starts; the exit code is 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE="${2:-cuda}"
PY=${PYTHON:-python}
RESULTS=${RESULTS:-gpu_window_results.txt}
WORK=$(mktemp -d /tmp/gpu_window.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export WANDB_MODE=disabled WANDB_SILENT=true XDG_CACHE_HOME="$WORK/xdg"
CUDA=0
[ "$DEVICE" != "cpu" ] && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && CUDA=1
if [ "$DEVICE" != "cpu" ] && [ $CUDA = 0 ]; then
  echo "gpu_window: --device $DEVICE but torch sees no CUDA GPU; use --device cpu for the dry run"; exit 2
fi
BIG=$CUDA  # sizes: the real ones on a GPU, toy ones on the CPU dry run
pick() { if [ $BIG = 1 ]; then echo "$1"; else echo "$2"; fi; }
SCALE=$(pick 1 3)  # the CPU dry run is slower per step at toy sizes: its time boxes are wider
FAILED=0

record() { echo "$1 $2" | tee -a "$RESULTS"; }
figures() {  # every key=value token of the step's output (last 40 lines) becomes a figure line
  tail -n 40 "$WORK/log" | grep -oE '[A-Za-z_][A-Za-z0-9_]*=[-0-9.eE+naif]+' | while IFS== read -r key value; do
    record "$1.$key" "$value"
  done
}
box() {  # box SECONDS NAME COMMAND...: run it time-boxed, record its outcome, time and figures
  local limit=$(( $1 * SCALE )) name=$2; shift 2
  local started=$SECONDS code=0
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$WORK/log" 2>&1 || code=$?
  if [ $code = 0 ]; then record "$name.status" ok
  elif [ $code = 124 ] || [ $code = 137 ]; then record "$name.status" TIMEOUT; FAILED=$((FAILED + 1))
  else record "$name.status" "FAIL(exit $code)"; FAILED=$((FAILED + 1)); tail -n 8 "$WORK/log" | sed 's/^/    /'; fi
  record "$name.seconds" $((SECONDS - started))
  figures "$name"
}
cuda_box() { if [ $CUDA = 1 ]; then box "$@"; else record "$2.status" "skip(CUDA only)"; fi; }

: > "$RESULTS"
record date "$(date -u +%Y-%m-%dT%H:%MZ)"
record device "$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' | tr ' ' '_')"
record torch "$($PY -c 'import torch; print(torch.__version__)')"
$PY benchmarks/make_fake_inat.py "$WORK/data" --train_per_class "$(pick 24 6)" --val_per_class 4 > /dev/null

# 1. the whole smoke, every path once, in one process (CUDA starts once)
box 150 smoke $PY benchmarks/smoke.py "$WORK/data" --device "$DEVICE" --work "$WORK/smoke"
# 2. host-device syncs per training step, both cached paths (goal: 0 besides the logging interval)
cuda_box 40 syncs $PY benchmarks/count_syncs.py "$WORK/data"
# 3. the epoch benchmarks: ours against the plain pipeline (goal >= 20x on the GPU), the freeze paths, precision
$PY benchmarks/make_fake_inat.py "$WORK/bench" --train_per_class "$(pick 200 6)" --val_per_class 2 > /dev/null
box 60 bench_epoch $PY benchmarks/bench_epoch.py "$WORK/bench" --device "$DEVICE" --image_size "$(pick 224 64)" \
  --epochs "$(pick 2 1)"
box 40 bench_freeze $PY benchmarks/bench_freeze.py "$WORK/bench" --device "$DEVICE" --arch resnet50 \
  --image_size "$(pick 224 64)" --max_images "$(pick 512 16)" --head_epochs "$(pick 3 1)"
box 30 bench_freeze_timm $PY benchmarks/bench_freeze.py "$WORK/bench" --device "$DEVICE" --arch tf_efficientnet_lite0 \
  --image_size "$(pick 224 64)" --max_images "$(pick 512 16)" --head_epochs "$(pick 3 1)"
box 30 bench_precision $PY benchmarks/bench_precision.py --device "$DEVICE" --image_size $(pick "128 224" 64) \
  --steps "$(pick 30 2)"
# 4. auto-augment, one batch of 64 at 128 px: batched against torchvision image by image
box 20 autoaugment $PY benchmarks/bench_autoaugment.py --device "$DEVICE" --repeats "$(pick 20 3)"
# 5. a whole run timed: 10 epochs of 10,000 JPEGs at 224 px, decode included (goal <= 20 s on an H200)
$PY benchmarks/make_fake_inat.py "$WORK/run" --train_per_class "$(pick 1250 6)" --val_per_class 2 > /dev/null
box 60 whole_run $PY benchmarks/timed_run.py "$WORK/run" --device "$DEVICE" --image_size "$(pick 224 64)" \
  --epochs "$(pick 10 1)"
# 6. --compile on against off, same run
cuda_box 40 compile $PY benchmarks/timed_run.py "$WORK/bench" --device "$DEVICE" --image_size "$(pick 224 64)" \
  --epochs "$(pick 3 1)" --compare_compile
# 7. what the CPU cannot afford: trainA's defaults at 224 px, 30 epochs of imagenette, two seeds side by side
if [ -n "${IMAGENETTE:-}" ] && [ -d "${IMAGENETTE:-}/train" ] && [ $CUDA = 1 ]; then
  box 240 imagenette_224 $PY benchmarks/timed_run.py "$IMAGENETTE" --device "$DEVICE" --image_size 224 --epochs 30 \
    --seeds 0 1
else
  record imagenette_224.status "skip(no IMAGENETTE folder on this machine, or no GPU)"
fi
echo "gpu_window: $FAILED step(s) failed; figures in $RESULTS"
[ $FAILED = 0 ]
