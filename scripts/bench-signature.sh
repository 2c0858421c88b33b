#!/usr/bin/env bash
# Manifest verification speed for BENCHMARKS.md: `airlock verify` on a signed model with the file
# in the page cache (warm) and after dropping the page cache (cold, root only), beside the time
# `cat` takes to read the file once cold, and the CPU time of each run.
#
#   scripts/bench-signature.sh MODEL.gguf KEY.pub [ROUNDS]
#
# Make the model and its signature first, for instance (the 8B Q4_0 shape, about 4.8 GB):
#   airlock bench --synthetic llama-3.1-8b --type q4_0 --save /tmp/8b.gguf -p 8 -n 1 -r 1
#   airlock keygen -o /tmp/bench --no-password && airlock sign /tmp/8b.gguf --key /tmp/bench.key
# Other processes on the machine change the wall times: the script prints the load average.
set -euo pipefail
model=${1:?usage: $0 MODEL.gguf KEY.pub [ROUNDS]}
key=${2:?usage: $0 MODEL.gguf KEY.pub [ROUNDS]}
rounds=${3:-3}
airlock=${AIRLOCK:-target/release/airlock}
[ -x "$airlock" ] || { echo "error: $airlock missing (cargo build --release, or set AIRLOCK)" >&2; exit 1; }

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs"
echo "file: $model ($(stat -c %s "$model") bytes)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

run() { # label, then the command
  local label=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o /tmp/bench-signature.$$ "$@" >/tmp/bench-signature.out.$$
  t1=$(date +%s.%N)
  read -r user sys </tmp/bench-signature.$$
  local hashed
  hashed=$(grep -o 'hashed in [0-9.]* s ([0-9.]* GB/s)' /tmp/bench-signature.out.$$ || true)
  printf '%-12s wall %6.2f s  user %6.2f s  sys %5.2f s  %s\n' "$label" \
    "$(awk "BEGIN { print $t1 - $t0 }")" "$user" "$sys" "$hashed"
}
trap 'rm -f /tmp/bench-signature.$$ /tmp/bench-signature.out.$$' EXIT

cat "$model" >/dev/null
for _ in $(seq "$rounds"); do run "warm" "$airlock" verify "$model" --pubkey "$key"; done
if [ "$(id -u)" = 0 ]; then
  for _ in $(seq "$rounds"); do
    sync; echo 3 >/proc/sys/vm/drop_caches
    run "cat, cold" sh -c 'cat "$1" >/dev/null' _ "$model"
    sync; echo 3 >/proc/sys/vm/drop_caches
    run "cold" "$airlock" verify "$model" --pubkey "$key"
  done
else
  echo "(cold runs skipped: dropping the page cache needs root)"
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
