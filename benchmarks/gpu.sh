#!/bin/sh
# The GPU figures of BENCHMARKS.md in one command, on a machine with jax[cuda], torch, timm and flax/optax/orbax
# (the device image has them all; it lacks ml_collections, dall_e and taming, pure-Python wheels that
# `make gpu-wheels` downloads into .whl/ on a machine with the package index).
#
#   sh benchmarks/gpu.sh [OUTDIR]            # everything below, ~10 minutes on one H100
#   PARTS="steps memory" sh benchmarks/gpu.sh  # a subset: cudnn steps cudnn_steps memory
set -eu
OUT=${1:-${OUT:-/tmp/beit_jax_gpu}}
PARTS=${PARTS:-"cudnn steps cudnn_steps memory"}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/beit_site .whl/*.whl
  PYTHONPATH=/tmp/beit_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for part in $PARTS; do
  case $part in
    # cuDNN attention with the relative position bias: outputs and all gradients vs XLA (JAX #27184, #30593).
    cudnn) python3 benchmarks/cudnn_attention.py 2>&1 | tee "$OUT/cudnn_attention.txt" || true ;;
    # The three train steps, ours vs the PyTorch peers (bf16, torch.compile, SDPA), batches of DEFAULT_BATCH.
    steps) python3 benchmarks/train_step.py --json "$OUT/steps.json" 2>&1 | tee "$OUT/steps.txt" ;;
    # Ours with cuDNN's fused attention (use it only where the cudnn part passed).
    cudnn_steps) python3 benchmarks/train_step.py --steps=pretrain,finetune --frameworks=jax --attention=cudnn \
                   --json "$OUT/cudnn_steps.json" 2>&1 | tee "$OUT/cudnn_steps.txt" ;;
    # BEiT-L/16 pre-training at batch 128 per device: device peak memory per remat policy.
    memory) for remat in none dots full; do
              python3 benchmarks/train_step.py --steps=pretrain --frameworks=jax --model=beit_large_patch16_224 \
                --batch=128 --remat=$remat --timed=3 --warmup=1 --json "$OUT/large_$remat.json" 2>&1 \
                | tee "$OUT/large_$remat.txt" || true
            done ;;
    *) echo "unknown part $part (cudnn steps cudnn_steps memory)"; exit 2 ;;
  esac
done
