# Shared by the device scripts that train on the GPU while the CPU cores run demos: sourced after
# the caller's header. Unpacks the carried binary, records the machine, and defines
#   pin CORES CMD…        run pinned where the machine has 16 cores
#   left                  seconds left before END
#   demo SLOT NAME BASE ARGS…   one CPU demo on 2 cores (BASE empty: the embedded base)
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

demo() { # slot name base args...
  local slot=$1 name=$2 base=$3; shift 3
  local t=$(left); [ $t -lt 60 ] && { echo "$name: no time" >> $W/results.txt; return; }
  SDLORA_DEVICE=cpu RAYON_NUM_THREADS=2 pin $((2*slot)),$((2*slot+1)) timeout $t /tmp/sdlora-gpu demo --out /tmp/d_$name \
    ${base:+--base $base} "$@" > $W/logs/$name.log 2>&1
  echo "$name [$*] $(grep -h "base on control" $W/logs/$name.log | cut -c1-80) | $(tail -1 $W/logs/$name.log)" >> $W/results.txt
  cp /tmp/d_$name/report.html $W/reports/$name.html 2>/dev/null
}

# results and logs to $OUT, then the summary on stdout
finish() {
  echo "all done at $(( $(date +%s) - t0 )) s" >> $W/logs/times.txt
  cp $W/results.txt $OUT/
  tar -C $W -czf $OUT/logs.tgz logs
  tar -C $W -czf $OUT/reports.tgz reports
  cat $W/results.txt $W/logs/times.txt
}
