#!/usr/bin/env bash
# airlock perplexity against llama-perplexity on the same files and text (-c 512, -t 2 by
# default), in rounds that alternate which engine goes first. For each run: the whole command's
# wall time, the computing time (airlock: its "N tokens in S s" line; llama-perplexity: its log
# timestamps from "calculating perplexity" to "Final estimate", so both leave out loading and
# tokenizing), tokens/s over that time (chunks x n_ctx tokens) and the PPL. Then, per file, the
# mean tokens/s of each engine and their ratio (airlock / llama.cpp). Run it on a quiet machine.
#
#   scripts/bench-perplexity.sh [-r ROUNDS] [-t THREADS] [-c N_CTX] [-f TEXT] FILE...
#   LLAMA_BIN=~/.cache/llama-cpp-anchor/build/bin (default) AIRLOCK=target/release/airlock (default)
#
# Build airlock first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=2 threads=2 ctx=512 text=tests/fixtures/text/eval.txt
while getopts r:t:c:f: o; do
  case $o in
    r) rounds=$OPTARG ;; t) threads=$OPTARG ;; c) ctx=$OPTARG ;; f) text=$OPTARG ;;
    *) echo "usage: $0 [-r ROUNDS] [-t THREADS] [-c N_CTX] [-f TEXT] FILE..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-r ROUNDS] [-t THREADS] [-c N_CTX] [-f TEXT] FILE..." >&2; exit 2; }
llama=${LLAMA_BIN:-$HOME/.cache/llama-cpp-anchor/build/bin}/llama-perplexity
airlock=${AIRLOCK:-target/release/airlock}
for b in "$llama" "$airlock"; do [ -x "$b" ] || { echo "$b: not found or not executable" >&2; exit 1; }; done
log=$(mktemp) && trap 'rm -f "$log"' EXIT

# llama.cpp's log timestamp M.SS.mmm.uuu -> seconds.
stamp() { awk -F. '{ printf "%.6f", $1 * 60 + $2 + $3 / 1e3 + $4 / 1e6 }' <<<"$1"; }

run() { # engine file -> "wall compute tokens ppl"
  local t0 t1 wall compute tokens ppl
  t0=$(date +%s.%N)
  if [ "$1" = llama.cpp ]; then
    "$llama" -m "$2" -f "$text" -c "$ctx" -t "$threads" >"$log" 2>&1
  else
    "$airlock" perplexity -m "$2" -f "$text" -c "$ctx" -t "$threads" >"$log" 2>&1
  fi
  t1=$(date +%s.%N)
  wall=$(echo "$t1 - $t0" | bc -l)
  ppl=$(grep -ao 'Final estimate: PPL = [0-9.]*' "$log" | awk '{ print $NF }')
  if [ "$1" = llama.cpp ]; then
    local a b chunks
    a=$(grep -a 'calculating perplexity over' "$log" | awk '{ print $1 }')
    b=$(grep -a 'Final estimate' "$log" | awk '{ print $1 }')
    chunks=$(grep -ao 'perplexity over [0-9]* chunks' "$log" | awk '{ print $3 }')
    compute=$(echo "$(stamp "$b") - $(stamp "$a")" | bc -l)
    tokens=$((chunks * ctx))
  else
    read -r tokens compute < <(grep -a ' tokens in .* s (' "$log" | awk '{ print $1, $4 }')
  fi
  echo "$wall $compute $tokens $ppl"
}

echo "| file | engine | round | wall s | compute s | tokens | tokens/s | PPL |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
summary=()
for f in "$@"; do
  sum_a=0 sum_l=0
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="llama.cpp airlock"; else order="airlock llama.cpp"; fi
    for e in $order; do
      read -r wall compute tokens ppl < <(run "$e" "$f")
      tps=$(echo "scale=1; $tokens / $compute" | bc -l)
      printf '| %s | %s | %d | %.2f | %.2f | %d | %s | %s |\n' \
        "$(basename "$f")" "$e" "$r" "$wall" "$compute" "$tokens" "$tps" "$ppl"
      if [ "$e" = airlock ]; then sum_a=$(echo "$sum_a + $tps" | bc -l); else sum_l=$(echo "$sum_l + $tps" | bc -l); fi
    done
  done
  summary+=("$(basename "$f") airlock $(echo "scale=1; $sum_a / $rounds" | bc -l) t/s, llama-perplexity $(echo "scale=1; $sum_l / $rounds" | bc -l) t/s, ratio $(echo "scale=2; $sum_a / $sum_l" | bc -l)x")
done
echo
echo "Mean over $rounds rounds (-c $ctx -t $threads, $(basename "$text")):"
printf '  %s\n' "${summary[@]}"
