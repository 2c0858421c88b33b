#!/bin/bash
# Decode speed beside CPU-bound loads (BENCHMARKS.md, "Sharing the CPUs with other work"):
# airlock builds and llama-bench on one file, with no load, two nice-19 loops in this session,
# and one or two nice-19 loops in another session (setsid), two rounds with the order swapped.
#
#   scripts/bench-sharing.sh [-m MODEL] [-n N_GEN] AIRLOCK [AIRLOCK ...]
#
# Each AIRLOCK is an airlock binary (e.g. two builds to compare). llama-bench comes from
# ../shared/tools/llama-cpp-anchor.sh's cache (LLAMA_BENCH overrides it); it runs in the
# no-load and same-session cases only, since another session's loop slows it to a few t/s.
# Prints one line per run: round, load, engine, t/s (mean +- sd over -r 3).
set -euo pipefail
MODEL=/tmp/airlock-bench/smollm2-q4_0.gguf
N=64
while getopts "m:n:" o; do
  case $o in
    m) MODEL=$OPTARG ;;
    n) N=$OPTARG ;;
    *) echo "usage: $0 [-m MODEL] [-n N_GEN] AIRLOCK [AIRLOCK ...]" >&2; exit 1 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-m MODEL] [-n N_GEN] AIRLOCK [AIRLOCK ...]" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "error: model $MODEL not found" >&2; exit 1; }
LB=${LLAMA_BENCH:-$HOME/.cache/llama-cpp-anchor/build/bin/llama-bench}
LOOP='while :; do :; done # airlock-bench-sharing'
trap 'pkill -f "airlock-bench-sharing" 2>/dev/null || true' EXIT
start() { # count, same|other
  for _ in $(seq "$1"); do
    if [ "$2" = same ]; then nice -n 19 sh -c "$LOOP" & else setsid nice -n 19 sh -c "$LOOP" & fi
  done
  sleep 1
}
stop() { pkill -f "airlock-bench-sharing" 2>/dev/null || true; sleep 1; }
run_airlock() { "$1" bench -m "$MODEL" -t 2 -p 0 -n "$N" -r 3 2>/dev/null | tail -1 | awk -F'|' '{print $(NF-1)}'; }
run_llama() { "$LB" -m "$MODEL" -t 2 -p 0 -n "$N" -r 3 2>/dev/null | grep tg | awk -F'|' '{print $(NF-1)}'; }
engines=("$@")
for round in 1 2; do
  order=("${engines[@]}")
  if [ $round = 2 ]; then
    order=()
    for ((i = ${#engines[@]} - 1; i >= 0; i--)); do order+=("${engines[$i]}"); done
  fi
  for load in "0 none" "2 same" "1 other" "2 other"; do
    set -- $load
    [ "$1" != 0 ] && start "$1" "$2"
    for e in "${order[@]}"; do
      echo "$round load=$1-$2 $e $(run_airlock "$e")"
    done
    if [ "$2" = none ] || [ "$2" = same ]; then
      [ -x "$LB" ] && echo "$round load=$1-$2 llama-bench $(run_llama)"
    fi
    [ "$1" != 0 ] && stop
  done
done
