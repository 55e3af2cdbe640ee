#!/usr/bin/env bash
# One device call: the GPU trains the demo's base on (stage 6a, then 6b: textures named last in
# every other caption, `--texture-last`), while the machine's CPU cores run the CPU demo in 7
# slots of 2 cores each (the CI machine has 2): first 7 settings on the committed base, then 7 on
# stage 6a as soon as it exists. Needs, carried in .devcarry/app: sdlora.gz (release, --features
# cuda; the CPU demos run it with SDLORA_DEVICE=cpu) and ../shared/cuda/device-env.sh.
#   run: bash tools/device/demo_stage6_sweep.sh    (writes results.txt, logs.tgz, reports.tgz,
#        base6a.tar, base6b.tar to $OUT)
# Env: END (seconds after start by which everything stops, 560), A6 / B6 (GPU seconds of 6a / 6b).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
APP=${APP:-.devcarry/app}
W=/tmp/w; mkdir -p $W/logs $W/reports
source $APP/device-env.sh > $W/logs/env.log 2>&1
gzip -dc $APP/sdlora.gz > /tmp/sdlora-gpu && chmod +x /tmp/sdlora-gpu
{ nproc; lscpu | grep -E "Model name|MHz|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $W/logs/machine.txt 2>&1
t0=$(date +%s); END=${END:-560}
# pin to cores where the machine has them (16 on the device), so slots don't share caches
pin() { local cores=$1; shift; if [ "$(nproc)" -ge 16 ]; then taskset -c $cores "$@"; else "$@"; fi; }
left() { echo $(( END - ($(date +%s) - t0) )); }

gpu() {
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( ${A6:-210} + 90 )) /tmp/sdlora-gpu demo --pretrain /tmp/base6a \
    --init assets/demo_model --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds ${A6:-210} --min-snr-gamma 5 --lr 1e-3 --texture-last --seed 3 > $W/logs/pre6a.log 2>&1
  tar -C /tmp -cf $W/base6a.tar base6a && cp $W/base6a.tar $OUT/ && touch $W/base6a.ready
  echo "6a done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
  local s=$(( $(left) - 100 ))
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( s + 90 )) /tmp/sdlora-gpu demo --pretrain /tmp/base6b \
    --init /tmp/base6a --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds $s --min-snr-gamma 5 --lr 5e-4 --texture-last --seed 4 > $W/logs/pre6b.log 2>&1
  tar -C /tmp -cf $OUT/base6b.tar base6b
  echo "6b done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
}

demo() { # slot name base args...
  local slot=$1 name=$2 base=$3; shift 3
  local t=$(left); [ $t -lt 60 ] && { echo "$name: no time" >> $W/results.txt; return; }
  SDLORA_DEVICE=cpu RAYON_NUM_THREADS=2 pin $((2*slot)),$((2*slot+1)) timeout $t /tmp/sdlora-gpu demo --out /tmp/d_$name \
    ${base:+--base $base} "$@" > $W/logs/$name.log 2>&1
  echo "$name [$*] $(grep -h "base on control" $W/logs/$name.log | cut -c1-80) | $(tail -1 $W/logs/$name.log)" >> $W/results.txt
  cp /tmp/d_$name/report.html $W/reports/$name.html 2>/dev/null
}

slot() { # slot "A args" "B args"
  local slot=$1 a=$2 b=$3
  demo $slot A$slot "" $a
  while [ ! -e $W/base6a.ready ] && [ $(left) -gt 60 ]; do sleep 3; done
  demo $slot B$slot /tmp/base6a $b
}

gpu &
slot 0 "" "" &
slot 1 "--seed 2" "--seed 2" &
slot 2 "--min-snr-gamma 0" "--min-snr-gamma 0" &
slot 3 "--steps 700" "--steps 700" &
slot 4 "--lora-lr 1e-3" "--lora-lr 1e-3" &
slot 5 "--reg 0" "--text-encoder-lr 0" &
slot 6 "--lora-batch 8" "--seed 3" &
wait
echo "all done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
cp $W/results.txt $OUT/
tar -C $W -czf $OUT/logs.tgz logs
tar -C $W -czf $OUT/reports.tgz reports
cat $W/results.txt $W/logs/times.txt
grep -h "unet step" $W/logs/pre6*.log | tail -6
