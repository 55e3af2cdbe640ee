#!/usr/bin/env bash
# A whole `sdlora train` run against diffusers+peft doing the same steps on the same tiny model,
# same machine, same call: wall time, training-loop time, peak memory, ratio.
#   tools/bench/cpu_vs_peer.sh [steps] [batch] [python]
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-100}; batch=${2:-4}; py=${3:-/work/venv-fixtures/bin/python}; rank=4
bin=target/release/sdlora
work=$(mktemp -d)
$bin bench --write-model "$work/model" --size tiny --write-data "$work/data" --images 8 >/dev/null
rss() { grep "Maximum resident" "$1" | awk '{print $6}'; }
/usr/bin/time -v "$bin" train --model "$work/model" --data "$work/data" --output "$work/ours.safetensors" \
  --steps "$steps" --batch-size "$batch" --rank "$rank" --targets attn-mlp --resolution 32 --lr 1e-4 \
  --cache-dir "$work/cache" >"$work/ours.log" 2>"$work/ours.time"
ours_wall=$(grep "Elapsed (wall" "$work/ours.time" | awk '{print $NF}')
ours_loop=$(sed -n 's/.* in \([0-9.]*\) s,.*/\1/p' "$work/ours.log")
/usr/bin/time -v "$py" tools/bench/peer_cpu_train.py "$work/model" "$work/data" "$steps" "$batch" "$rank" >"$work/peer.log" 2>"$work/peer.time"
peer_wall=$(grep "Elapsed (wall" "$work/peer.time" | awk '{print $NF}')
peer_loop=$(sed -n 's/.*loop \([0-9.]*\) s.*/\1/p' "$work/peer.log")
secs() { awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }' <<<"$1"; }
ow=$(secs "$ours_wall"); pw=$(secs "$peer_wall")
echo "case: tiny SD1-shaped model, $steps steps, batch $batch, rank $rank attn-mlp, 32 px, $(nproc) cores"
printf "sdlora train : wall %6.2f s  loop %6.2f s  peak RSS %6d MiB\n" "$ow" "$ours_loop" $(( $(rss "$work/ours.time") / 1024 ))
printf "diffusers+peft: wall %6.2f s  loop %6.2f s  peak RSS %6d MiB\n" "$pw" "$peer_loop" $(( $(rss "$work/peer.time") / 1024 ))
awk -v a="$pw" -v b="$ow" -v c="$peer_loop" -v d="$ours_loop" 'BEGIN { printf "speed-up: whole run %.2fx, training loop %.2fx\n", a/b, c/d }'
rm -rf "$work"
