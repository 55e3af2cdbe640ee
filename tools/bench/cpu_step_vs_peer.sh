#!/usr/bin/env bash
# Full-size U-Net on the CPU, sdlora against diffusers+peft on the same random SD 1.5 folder, each
# case in one call: median step time (steps 2..N), peak RSS, ratio.
#   tools/bench/cpu_step_vs_peer.sh [python] [cases]
# cases: space-separated case:resolution:batch:steps, default
#   "step:256:1:4 step:512:1:3 forward:512:1:3"
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-/tmp/venv/bin/python}
cases=${2:-"step:256:1:4 step:512:1:3 forward:512:1:3"}
bin=target/release/sdlora
model=${SDLORA_BENCH_MODEL:-$(mktemp -d)/sd15}
[ -d "$model/unet" ] || $bin bench --write-model "$model" --size sd15 >/dev/null
field() { sed -n "s/^$1: median \([0-9.]*\) s, peak RSS \([0-9]*\) MiB.*/\\$2/p"; }
printf "%-22s %-26s %-26s %s\n" "case" "PyTorch (median, RSS)" "sdlora (median, RSS)" "speed ratio"
for c in $cases; do
  IFS=: read -r kind res batch steps <<<"$c"
  ours=$($bin bench --case "$kind" --model "$model" --resolution "$res" --batch-size "$batch" --steps "$steps" | tail -1)
  peer=$("$py" tools/bench/peer_cpu_step.py "$model" "$kind" "$res" "$batch" "$steps" 4 | tail -1)
  os=$(field sdlora 1 <<<"$ours"); om=$(field sdlora 2 <<<"$ours")
  ps=$(field peer 1 <<<"$peer"); pm=$(field peer 2 <<<"$peer")
  ratio=$(awk -v p="$ps" -v o="$os" 'BEGIN { printf "%.2fx", p/o }')
  printf "%-22s %-26s %-26s %s\n" "$kind ${res}px b$batch" "$ps s, $pm MiB" "$os s, $om MiB" "$ratio"
done
