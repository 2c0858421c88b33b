#!/usr/bin/env bash
# Scale proof for `airlock convert`: writes a Llama-3.1-8B-shaped (Foundation-sec-8b's shape)
# sharded bf16 checkpoint with random weights (config.json with Llama 3.1 rope scaling, the Llama 3
# tokenizer from the shared fixtures), converts it to q4_0 and q8_0, and reports for each the wall
# time, input GB/s and peak RssAnon of the airlock process (sampled from /proc/PID/status every
# 50 ms). Needs ~16 GB for the checkpoint and ~14 GB for the two outputs.
#
#   scripts/synthetic-8b-checkpoint.sh [WORK_DIR]   (default target/scale-8b; reused if present)
#   AIRLOCK_LLAMA3_TOKENIZER=dir  tokenizer.json + tokenizer_config.json (default ../shared/fixtures/llama3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$root/target/scale-8b}
tok=${AIRLOCK_LLAMA3_TOKENIZER:-$root/../shared/fixtures/llama3}
ckpt=$work/ckpt
mkdir -p "$work"

cd "$root"
cargo build --release --quiet -p airlock-convert --example synthetic_checkpoint
cargo build --release --quiet --bin airlock
bin=$work/airlock
cp target/release/airlock "$bin"   # a stable copy while others rebuild target/

if [ ! -f "$ckpt/model.safetensors.index.json" ]; then
  avail=$(df --output=avail -k "$work" | tail -1)
  if [ "$avail" -lt $((32 * 1024 * 1024)) ]; then
    echo "error: need ~32 GB free in $work (have $((avail / 1024 / 1024)) GB)" >&2
    exit 1
  fi
  t0=$(date +%s.%N)
  target/release/examples/synthetic_checkpoint "$ckpt" --shape llama-3.1-8b --tokenizer-dir "$tok"
  echo "checkpoint written in $(echo "$(date +%s.%N) - $t0" | bc) s"
fi
in_bytes=$(du -cb "$ckpt"/*.safetensors | tail -1 | cut -f1)

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GB RAM"
for ty in q4_0 q8_0; do
  out=$work/synthetic-8b.$ty.gguf
  rm -f "$out"
  t0=$(date +%s.%N)
  "$bin" convert "$ckpt" -o "$out" --type "$ty" --quiet 2> "$work/convert-$ty.log" &
  pid=$!
  peak=0
  while kill -0 "$pid" 2>/dev/null; do
    v=$(awk '/^RssAnon:/{print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$v" ] && [ "$v" -gt "$peak" ] && peak=$v
    sleep 0.05
  done
  wait "$pid"
  t1=$(date +%s.%N)
  secs=$(echo "$t1 - $t0" | bc)
  gbps=$(echo "scale=3; $in_bytes / 1000000000 / $secs" | bc)
  echo "$ty: $(du -b "$out" | cut -f1) bytes out, ${secs} s, ${gbps} GB/s of input ($in_bytes bytes), peak RssAnon $((peak / 1024)) MiB"
  tail -1 "$work/convert-$ty.log"
done
