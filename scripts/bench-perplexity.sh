#!/usr/bin/env bash
# airlock perplexity against llama-perplexity on the same files and text, in rounds that
# alternate which engine goes first; prints each run's wall time (whole command: load,
# tokenize, passes) and PPL, and tokens/s as 19 chunks x 512 tokens / wall time.
#
#   scripts/bench-perplexity.sh [-r ROUNDS] [-t THREADS] FILE...
#   LLAMA_BIN=~/.cache/llama-cpp-anchor/build/bin (default) AIRLOCK=target/release/airlock
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=2 threads=2
while getopts r:t: o; do case $o in r) rounds=$OPTARG ;; t) threads=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
llama=${LLAMA_BIN:-$HOME/.cache/llama-cpp-anchor/build/bin}/llama-perplexity
airlock=${AIRLOCK:-target/release/airlock}
text=tests/fixtures/text/eval.txt
run() { # engine file -> "seconds ppl"
  local t0 t1 out
  t0=$(date +%s.%N)
  if [ "$1" = llama.cpp ]; then
    out=$("$llama" -m "$2" -f "$text" -c 512 -t "$threads" 2>&1 | grep -o 'PPL = [0-9.]*')
  else
    out=$("$airlock" perplexity -m "$2" -f "$text" -c 512 -t "$threads" 2>/dev/null | grep -o 'PPL = [0-9.]*')
  fi
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) ${out#PPL = }"
}
echo "| file | engine | round | wall s | tokens/s | PPL |"
echo "|---|---|---:|---:|---:|---:|"
for f in "$@"; do
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="llama.cpp airlock"; else order="airlock llama.cpp"; fi
    for e in $order; do
      read -r s p < <(run "$e" "$f")
      echo "| $(basename "$f") | $e | $r | $s | $(echo "scale=1; 9728 / $s" | bc) | $p |"
    done
  done
done
