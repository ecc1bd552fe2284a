#!/usr/bin/env bash
# The one prepared GPU session: CUDA training with AMP and channels-last (softmax, cosface and arcface heads,
# each with the default λ·center loss), DDP through torchrun on every GPU,
# the center-loss op benchmark on CUDA, the serving inference ceiling on the GPU (torch fp32/bf16/fp16 and
# ONNX Runtime's CUDA provider when installed: bench.gpu_infer), then the MNIST replication on all of MNIST. Everything it writes
# lands in one tarball, $OUT/gpu-check.tar.gz (logs, bench/results JSON, plots, the run's metrics).
#
# Here (once):        make gpu-carry      # .gpu/: MNIST idx files gzipped + the ORL export (~17 MB)
# There (device tool): run  command="bash scripts/gpu-check.sh"  carry=[".gpu"]  timeout_s=590
# Rehearsal on CPU:   DEVICE=cpu REHEARSAL=1 OUT=/tmp/gpu-out bash scripts/gpu-check.sh
#
# Budget: a device session has ~15 min in all, so the steps are ordered cheapest-first and the MNIST step,
# the longest, runs under its own time limit (MNIST_SECONDS) so the rest always comes back.
set -uo pipefail

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-out}
CARRY=${CARRY:-.gpu}
MNIST_EPOCHS=${MNIST_EPOCHS:-8}  # the CPU run's schedule, so the two cross-check; 20 = the --full preset
MNIST_SECONDS=${MNIST_SECONDS:-240}
PY=${PY:-python3}
WORK=$(mktemp -d)
LOG="$OUT/gpu-check.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CENTERID_MNIST_DIR="$CARRY/mnist"

if [[ ${REHEARSAL:-0} == 1 ]]; then  # same commands, sizes that finish in minutes on 2 CPU cores
    ORL_EPOCHS=2 MNIST_ARGS=(--quick) OP_ARGS=(--quick) INFER_ARGS=(--batches 32 --seconds 0.3 --rounds 2)
else
    ORL_EPOCHS=20 MNIST_ARGS=(--full --epochs "$MNIST_EPOCHS" --batch-size 64) OP_ARGS=()
    INFER_ARGS=(--batches 32 256 1024 --seconds 1 --rounds 3)
fi
AMP_FLAGS=(--amp --channels-last)
[[ $DEVICE == cpu ]] && AMP_FLAGS=(--amp)  # channels-last convolutions crashed once in torch's CPU kernels

step() {  # step NAME COMMAND...: run, time and log one step; a failure is logged and the next step runs
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*" | tee -a "$LOG"
    "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

{
    date -u +"%F %T UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"
} | tee -a "$LOG"

GPUS=$($PY -c "import torch; print(max(torch.cuda.device_count(), 1) if '$DEVICE' != 'cpu' else 2)")
ORL=(--data "$CARRY/orl" --holdout-identities 10 --epochs "$ORL_EPOCHS" --device "$DEVICE")

step "train AMP (1 process)" $PY -m training "${ORL[@]}" "${AMP_FLAGS[@]}" --output "$WORK/orl-amp"
for head in cosface arcface; do  # the margin heads at the papers' s and m, fp32 logits inside bf16 autocast
    step "train AMP $head head (1 process)" $PY -m training "${ORL[@]}" "${AMP_FLAGS[@]}" --head "$head" \
        --output "$WORK/orl-amp-$head"
done
step "train DDP ($GPUS processes)" $PY -m torch.distributed.run --standalone --nproc_per_node="$GPUS" \
    -m training "${ORL[@]}" "${AMP_FLAGS[@]}" --output "$WORK/orl-ddp"
step "train fp32 baseline" $PY -m training "${ORL[@]}" --output "$WORK/orl-fp32"
step "center-loss op benchmark" $PY -m bench.center_loss_op --device "$DEVICE" "${OP_ARGS[@]}" \
    --markdown "$WORK/center_loss_op_$DEVICE.md"
step "inference ceiling (serving path)" $PY -m bench.gpu_infer --bundle "$WORK/orl-fp32" --device "$DEVICE" \
    "${INFER_ARGS[@]}" --cache "$WORK/onnx-cache" --json "$WORK/gpu_infer_$DEVICE.json"
step "MNIST replication" timeout "$MNIST_SECONDS" $PY -m bench.paper_mnist "${MNIST_ARGS[@]}" --device "$DEVICE"

# the evidence of each training run, without the weights
for run in orl-amp orl-amp-cosface orl-amp-arcface orl-ddp orl-fp32; do
    mkdir -p "$WORK/keep/$run"
    cp "$WORK/$run"/{bundle.json,metrics.jsonl} "$WORK/keep/$run/" 2>/dev/null
done
cp "$WORK"/center_loss_op_*.md "$WORK"/gpu_infer_*.json "$WORK/keep/" 2>/dev/null
tar -czf "$OUT/gpu-check.tar.gz" --exclude='*.safetensors' --exclude='*.pt' -C "$WORK" keep \
    -C "$PWD" bench/results docs/img .cache/bench/runs/paper_mnist 2>>"$LOG"
echo "== wrote $OUT/gpu-check.tar.gz" | tee -a "$LOG"
