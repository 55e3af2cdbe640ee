#!/usr/bin/env bash
# One device call for the demo's next base (stage 8): the U-Net's full-resolution blocks gain
# cross-attention (`--grow-attention`: zero output projections, so training starts from exactly
# the committed base) and the GPU trains the whole U-Net on with it, so text can steer the 16×16
# layers where checks are drawn. Meanwhile the CPU cores run the CPU demo in 7 slots of 2 cores
# (the CI machine has 2): seeds 1–3 on the committed base first, then seeds 1–4 on the grown base
# once it exists. Needs, carried in .devcarry/app: sdlora.gz (release, --features cuda; the CPU
# demos run it with SDLORA_DEVICE=cpu) and ../shared/cuda/device-env.sh.
#   run: bash tools/device/demo_stage8_attention.sh   (writes results.txt, logs.tgz, reports.tgz,
#        base8.tar to $OUT)
# Env: END (seconds after start by which everything stops, 560), G8 (GPU seconds, 330).
set -u
source "$(dirname "$0")/lib.sh"

gpu() {
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( ${G8:-330} + 90 )) /tmp/sdlora-gpu demo --pretrain /tmp/base8 \
    --init assets/demo_model --grow-attention --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds ${G8:-330} --min-snr-gamma 5 --lr 5e-4 --texture-last --seed 5 --save-every 400 > $W/logs/pre8.log 2>&1
  tar -C /tmp -cf $OUT/base8.tar base8 && touch $W/base8.ready
  echo "stage 8 done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
}

after_base() { # slot name args...: waits for the grown base, then runs the demo on it
  local slot=$1 name=$2; shift 2
  while [ ! -e $W/base8.ready ] && [ $(left) -gt 60 ]; do sleep 3; done
  demo $slot $name /tmp/base8 "$@"
}

gpu &
demo 0 ref1 "" --seed 1 &
demo 1 ref2 "" --seed 2 &
demo 2 ref3 "" --seed 3 &
after_base 3 g1 --seed 1 &
after_base 4 g2 --seed 2 &
after_base 5 g3 --seed 3 &
after_base 6 g4 --seed 4 &
wait
finish
grep -h "unet step" $W/logs/pre8.log | tail -4
