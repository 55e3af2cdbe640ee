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
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
APP=${APP:-.devcarry/app}
W=/tmp/w; mkdir -p $W/logs $W/reports
source $APP/device-env.sh > $W/logs/env.log 2>&1
gzip -dc $APP/sdlora.gz > /tmp/sdlora-gpu && chmod +x /tmp/sdlora-gpu
{ nproc; lscpu | grep -E "Model name|MHz|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $W/logs/machine.txt 2>&1
t0=$(date +%s); END=${END:-560}
pin() { local cores=$1; shift; if [ "$(nproc)" -ge 16 ]; then taskset -c $cores "$@"; else "$@"; fi; }
left() { echo $(( END - ($(date +%s) - t0) )); }

gpu() {
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( ${G8:-330} + 90 )) /tmp/sdlora-gpu demo --pretrain /tmp/base8 \
    --init assets/demo_model --grow-attention --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds ${G8:-330} --min-snr-gamma 5 --lr 5e-4 --texture-last --seed 5 --save-every 400 > $W/logs/pre8.log 2>&1
  tar -C /tmp -cf $OUT/base8.tar base8 && touch $W/base8.ready
  echo "stage 8 done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
}

demo() { # slot name base args...
  local slot=$1 name=$2 base=$3; shift 3
  local t=$(left); [ $t -lt 60 ] && { echo "$name: no time" >> $W/results.txt; return; }
  SDLORA_DEVICE=cpu RAYON_NUM_THREADS=2 pin $((2*slot)),$((2*slot+1)) timeout $t /tmp/sdlora-gpu demo --out /tmp/d_$name \
    ${base:+--base $base} "$@" > $W/logs/$name.log 2>&1
  echo "$name [$*] $(grep -h "base on control" $W/logs/$name.log | cut -c1-80) | $(tail -1 $W/logs/$name.log)" >> $W/results.txt
  cp /tmp/d_$name/report.html $W/reports/$name.html 2>/dev/null
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
echo "all done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
cp $W/results.txt $OUT/
tar -C $W -czf $OUT/logs.tgz logs
tar -C $W -czf $OUT/reports.tgz reports
cat $W/results.txt $W/logs/times.txt
grep -h "unet step" $W/logs/pre8.log | tail -4
