#!/usr/bin/env bash
# One device call (see ../../BENCHMARKS.md and issue notes): the bf16 SD1.5 U-Net check, then the
# demo's base model pretrained on the GPU, then the demo on that base. Needs, carried in
# .devcarry/app: sdlora.gz (release build with --features cuda) and ../shared/cuda/device-env.sh.
#   run: bash tools/device/demo_base_and_bf16.sh     (writes logs, base.tar, report.html to $OUT)
# Env: VAE_S, UNET_S, PRE_S (time budgets), BATCH (U-Net batch, 128), SKIP_CHECK, SKIP_DEMO,
#   INIT=assets/demo_model to continue the committed base (VAE kept, U-Net trains on),
#   GAMMA (min-SNR-γ of the U-Net loss), IMAGES (10000), APP (.devcarry/app).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
APP=${APP:-.devcarry/app}
source $APP/device-env.sh > "$OUT/env.log" 2>&1
gzip -dc $APP/sdlora.gz > /tmp/sdlora && chmod +x /tmp/sdlora
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
export RUST_BACKTRACE=1
t0=$(date +%s)
[ -z "${SKIP_CHECK:-}" ] && echo "== bf16 check" && timeout 75 /tmp/sdlora bench --check-bf16 2>&1 | tee "$OUT/check_bf16.log"
echo "== pretrain ($(( $(date +%s) - t0 )) s)"
timeout ${PRE_S:-330} /tmp/sdlora demo-pretrain --out /tmp/base --images ${IMAGES:-10000} --batch ${BATCH:-128} --vae-batch 32 \
  ${INIT:+--init $INIT} --vae-steps $([ -n "${INIT:-}" ] && echo 0 || echo 20000) \
  --unet-steps 100000 --vae-seconds ${VAE_S:-60} --unet-seconds ${UNET_S:-210} --save-every 500 ${GAMMA:+--min-snr-gamma $GAMMA} 2>&1 \
  | tee "$OUT/pretrain.log" | grep -v "^ " | tail -40
tar -C /tmp -cf "$OUT/base.tar" base
[ -n "${SKIP_DEMO:-}" ] && exit 0
echo "== demo ($(( $(date +%s) - t0 )) s)"
timeout 100 /tmp/sdlora demo --base /tmp/base --out /tmp/demo 2>&1 | tee "$OUT/demo.log" | tail -15
cp /tmp/demo/report.html "$OUT/" 2>/dev/null
echo "== done ($(( $(date +%s) - t0 )) s)"
