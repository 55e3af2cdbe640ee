#!/usr/bin/env bash
# One device call: a sweep of `sdlora demo` settings on the committed base, each over seeds 1-3.
# GPU workers (several demo processes share the GPU: the tiny model leaves it idle between kernels)
# take runs from one queue, seed by seed; CPU slots of 2 cores each (the CI machine has 2) run a
# few of the same runs on the CPU, to tie the GPU's scores to the CPU's. Needs, carried in
# .devcarry/app: sdlora.gz (release, --features cuda; CPU runs use SDLORA_DEVICE=cpu) and
# ../shared/cuda/device-env.sh.
#   run: bash tools/device/demo_sweep.sh   (writes results.txt, logs.tgz, reports_{a,b}.tgz, loras_{a,b}.tar to $OUT)
# Env: END (seconds after start by which everything stops, 540), GPU_WORKERS (4), CPU_SLOTS (4),
#      BIN (a binary to use instead of the carried one, for a dry run).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
APP=${APP:-.devcarry/app}
W=/tmp/sweep; rm -rf $W; mkdir -p $W/logs $W/reports $W/loras $W/queue
t0=$(date +%s); END=${END:-540}
if [ -z "${BIN:-}" ]; then
  source $APP/device-env.sh > $W/logs/env.log 2>&1
  gzip -dc $APP/sdlora.gz > /tmp/sdlora-gpu && chmod +x /tmp/sdlora-gpu
  BIN=/tmp/sdlora-gpu
fi
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $W/logs/machine.txt 2>&1
pin() { local cores=$1; shift; if [ "$(nproc)" -ge 16 ]; then taskset -c $cores "$@"; else "$@"; fi; }
left() { echo $(( END - ($(date +%s) - t0) )); }

# name|args: the settings swept (each at seeds 1, 2, 3)
CONFIGS=(
  "base|"
  "lr1e-3|--lora-lr 1e-3"
  "rank16|--rank 16"
  "snr0|--min-snr-gamma 0"
  "steps1000|--steps 1000"
  "te0|--text-encoder-lr 0"
  "te5e-3|--text-encoder-lr 5e-3"
  "batch8|--lora-batch 8"
  "lr1e-3steps1000|--lora-lr 1e-3 --steps 1000"
  "reg40|--reg 40"
)
n=0
for seed in 1 2 3; do
  for c in "${CONFIGS[@]}"; do
    printf '%s|%s\n' "${c%%|*}-s$seed" "${c#*|} --seed $seed" > $W/queue/$(printf %03d $n); n=$((n+1))
  done
done

run() { # device cores name args...
  local device=$1 cores=$2 name=$3; shift 3
  local t=$(left); [ $t -lt 40 ] && { echo "$name: no time" >> $W/results.txt; return 1; }
  local env=(); [ $device = cpu ] && env=(SDLORA_DEVICE=cpu)
  local s=$(date +%s)
  pin $cores env "${env[@]}" RAYON_NUM_THREADS=2 timeout $t $BIN demo --out /tmp/d_$name "$@" \
    > $W/logs/$name.log 2>&1
  echo "$name $device [$*] $(( $(date +%s) - s )) s | $(tail -1 $W/logs/$name.log)" >> $W/results.txt
  cp /tmp/d_$name/report.html $W/reports/$name.html 2>/dev/null
  cp /tmp/d_$name/demo_lora.safetensors $W/loras/$name.safetensors 2>/dev/null
  return 0
}

gpu_worker() { # cores
  while [ $(left) -gt 40 ]; do
    local job; job=$(ls $W/queue 2>/dev/null | head -1); [ -z "$job" ] && return
    mv $W/queue/$job $W/taken.$job.$1 2>/dev/null || continue # another worker took it
    local line; line=$(cat $W/taken.$job.$1)
    # shellcheck disable=SC2086
    run gpu $1 "${line%%|*}" ${line#*|} || return
  done
}

# CPU slots: seed 1 of the first settings (the same runs the GPU does first)
for i in $(seq 0 $(( ${CPU_SLOTS:-4} - 1 ))); do
  c=${CONFIGS[$i]}
  # shellcheck disable=SC2086
  run cpu $((2*i)),$((2*i+1)) "cpu-${c%%|*}-s1" ${c#*|} --seed 1 &
done
for i in $(seq 0 $(( ${GPU_WORKERS:-4} - 1 ))); do
  gpu_worker $((8+2*i)),$((9+2*i)) &
done
wait
echo "all done at $(( $(date +%s) - t0 )) s" >> $W/results.txt
cp $W/results.txt $OUT/
tar -C $W -czf $OUT/logs.tgz logs
ls $W/reports/*.html 2>/dev/null | sort | awk 'NR%2' | xargs -r tar -czf $OUT/reports_a.tgz
ls $W/reports/*.html 2>/dev/null | sort | awk '!(NR%2)' | xargs -r tar -czf $OUT/reports_b.tgz
ls $W/loras/*.safetensors 2>/dev/null | sort | awk 'NR%2' | xargs -r tar -cf $OUT/loras_a.tar
ls $W/loras/*.safetensors 2>/dev/null | sort | awk '!(NR%2)' | xargs -r tar -cf $OUT/loras_b.tar
sort $W/results.txt
