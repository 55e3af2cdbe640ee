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
source "$(dirname "$0")/lib.sh"

gpu() {
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( ${A6:-210} + 90 )) /tmp/sdlora-gpu demo-pretrain --out /tmp/base6a \
    --init assets/demo_model --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds ${A6:-210} --min-snr-gamma 5 --lr 1e-3 --texture-last --seed 3 > $W/logs/pre6a.log 2>&1
  tar -C /tmp -cf $W/base6a.tar base6a && cp $W/base6a.tar $OUT/ && touch $W/base6a.ready
  echo "6a done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
  local s=$(( $(left) - 100 ))
  RAYON_NUM_THREADS=2 pin 14,15 timeout $(( s + 90 )) /tmp/sdlora-gpu demo-pretrain --out /tmp/base6b \
    --init /tmp/base6a --vae-steps 0 --images 10000 --batch 512 --unet-steps 100000 \
    --unet-seconds $s --min-snr-gamma 5 --lr 5e-4 --texture-last --seed 4 > $W/logs/pre6b.log 2>&1
  tar -C /tmp -cf $OUT/base6b.tar base6b
  echo "6b done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
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
finish
grep -h "unet step" $W/logs/pre6*.log | tail -6
