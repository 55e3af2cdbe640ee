#!/usr/bin/env bash
# Stage 8 in one device call, the whole call spent on what the CPU cannot do: the GPU trains the
# grown U-Net (16×16 cross-attention, `--grow-attention`) for G8 seconds, then draws demos on the
# result while time is left. The CPU cores do not repeat the committed base's demos (their figures
# are in the README); from the first checkpoint the GPU writes (--save-every) they run demos on
# it, so a read of the half-trained base comes back too. The finished base is judged afterwards
# with CPU demos on the 2-core machine, which is where the demo's figures come from.
# Run 2026-11-28 on an H200 (docs/experiments/2026-11-demo-base.md, stage 8): of the CPU demos only the
# two 400-step ones finished in the call (~335 s each on 2 of its cores), and the GPU demo that
# followed training did not finish in the 145 s left.
# Needs, carried in .devcarry/app: sdlora.gz (release, --features cuda; the CPU demos run it with
# SDLORA_DEVICE=cpu) and ../shared/cuda/device-env.sh.
#   run: bash tools/device/demo_stage8_attention.sh   (writes results.txt, logs.tgz, reports.tgz, base8.tar)
# Env: END (seconds after start by which everything stops, 580), G8 (GPU training seconds, 380),
#   SAVE (steps between checkpoints, 250); for dry runs on a CPU: DEMO (extra arguments of every
#   demo), IMAGES and BATCH (pretraining's, 10000 and 512).
set -u
source "$(dirname "$0")/lib.sh"
END=${END:-580}

gpu() {
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( $(left) - 15 )) /tmp/sdlora-gpu demo-pretrain --out /tmp/base8 \
    --init assets/demo_model --grow-attention --vae-steps 0 --images ${IMAGES:-10000} --batch ${BATCH:-512} --unet-steps 100000 \
    --unet-seconds ${G8:-380} --min-snr-gamma 5 --lr 5e-4 --texture-last --seed 5 --save-every ${SAVE:-250} \
    > $W/logs/pre8.log 2>&1
  local rc=$?
  echo "stage 8 rc $rc at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
  # a failed start ends the call at once (so it can be rerun); a late one keeps the last checkpoint
  [ $rc -ne 0 ] && [ ! -e /tmp/base8/model_index.json ] && { touch $W/failed; return; }
  tar -C /tmp -cf $OUT/base8.tar base8
  for s in 1 2 3 4 5 6; do # GPU demos on the finished base
    local t=$(left); [ $t -lt 45 ] && break
    RAYON_NUM_THREADS=2 pin 14,15 timeout $(( t - 5 )) /tmp/sdlora-gpu demo --out /tmp/g_$s --base /tmp/base8 \
      --seed $s ${DEMO:-} > $W/logs/gpu$s.log 2>&1
    echo "gpu$s [--seed $s] $(tail -1 $W/logs/gpu$s.log)" >> $W/results.txt
  done
  touch $W/gpu.done
}

early() { # slot name args...: the first checkpoint, copied once, then a CPU demo on it
  local slot=$1 name=$2; shift 2
  while [ ! -e /tmp/base8/model_index.json ] && [ ! -e $W/failed ] && [ $(left) -gt 60 ]; do sleep 2; done
  [ -e $W/failed ] && return
  (flock 9; [ -e /tmp/base8e ] || { cp -r /tmp/base8 /tmp/base8e.tmp && mv /tmp/base8e.tmp /tmp/base8e &&
    echo "checkpoint copied at $(( $(date +%s) - t0 )) s: $(grep -o 'unet step [0-9]*/[0-9]*' $W/logs/pre8.log | tail -1)" >> $W/logs/times.txt; }) 9> $W/copy.lock
  demo $slot $name /tmp/base8e "$@" ${DEMO:-}
}

gpu &
for s in 1 2 3 4 5; do early $((s - 1)) e$s --seed $s & done
early 5 e1_400 --seed 1 --steps 400 &
early 6 e2_400 --seed 2 --steps 400 &
# fail fast (so the call can be rerun at once) when the GPU run breaks
while [ ! -e $W/failed ] && [ ! -e $W/gpu.done ]; do sleep 2; done
[ -e $W/failed ] && { echo "GPU pretraining failed:"; tail -20 $W/logs/pre8.log; tail -5 $W/logs/env.log; kill $(jobs -p) 2>/dev/null; }
wait
finish
grep -h "unet step" $W/logs/pre8.log | tail -3
