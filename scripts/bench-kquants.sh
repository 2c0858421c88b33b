#!/usr/bin/env bash
# K-quant speed for BENCHMARKS.md (issue 13): airlock bench against llama-bench on the same
# files, same threads, in rounds that alternate which engine goes first (a shared host's memory
# bandwidth drifts between runs more than the engines differ; the ratio of the means over the
# rounds is the figure to read).
#   - SmolLM2-135M Q4_K_M and Q6_K made by llama.cpp's own llama-quantize --allow-requantize from
#     the Q4_1 demo model (pp512 / tg128);
#   - the Llama-3.2-1B (pp128 / tg32) and, with --8b, Llama-3.1-8B (pp64 / tg16) shapes in
#     Q4_K_M, random weights written by `airlock bench --synthetic --type q4_k_m --save`.
#   - with --more, the other files people download: SmolLM2 Q5_K_M and Q3_K_M (llama-quantize;
#     mostly Q5_1 and Q4_0/Q4_K, llama.cpp's fallbacks for 576-wide rows) and the Llama-3.2-1B
#     shape in Q5_K_M, Q3_K_M and Q2_K.
# airlock runs with --ceiling, so each tg row also gives its share of the read-bandwidth ceiling.
#
#   [AIRLOCK=PATH] scripts/bench-kquants.sh [--8b] [--more] [--tg-only] [--no-smollm2] [-t THREADS] [-r REPS] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2; reps=3; big=0; rounds=2; tg_only=0; smol=1; more=0
while [ $# -gt 0 ]; do
  case "$1" in
    --8b) big=1 ;;
    --more) more=1 ;;
    --tg-only) tg_only=1 ;;
    --no-smollm2) smol=0 ;;
    -t) threads=$2; shift ;;
    -r) reps=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    *) echo "usage: $0 [--8b] [--more] [--tg-only] [--no-smollm2] [-t THREADS] [-r REPS] [--rounds R]" >&2; exit 2 ;;
  esac
  shift
done
DIR=${DIR:-/tmp/airlock-bench}
mkdir -p "$DIR"
BIN=${LLAMA_BIN:-$HOME/.cache/llama-cpp-anchor/build/bin}
[ -x "$BIN/llama-bench" ] || { echo "llama-bench not found in $BIN: run ../shared/tools/llama-cpp-anchor.sh or set LLAMA_BIN" >&2; exit 1; }
# AIRLOCK=PATH runs another build (an earlier commit's, for a before/after table).
if [ -n "${AIRLOCK:-}" ]; then A=$AIRLOCK; else cargo build --release --quiet; A=target/release/airlock; fi
scripts/fetch-models.sh >/dev/null
Q41=models/SmolLM2-135M-Instruct.Q4_1.gguf
smol_types="Q4_K_M Q6_K"
[ "$more" = 1 ] && smol_types="$smol_types Q5_K_M Q3_K_M"
for t in $smol_types; do
  f="$DIR/smollm2-llamacpp-${t,,}.gguf"
  [ -f "$f" ] || "$BIN/llama-quantize" --allow-requantize "$Q41" "$f" "$t" >/dev/null 2>&1
done
[ -f "$DIR/llama-3.2-1b-q4_k_m.gguf" ] ||
  $A bench --synthetic llama-3.2-1b --type q4_k_m --save "$DIR/llama-3.2-1b-q4_k_m.gguf" -p 1 -n 0 -r 1 >/dev/null
if [ "$more" = 1 ]; then
  for t in q5_k_m q3_k_m q2_k; do
    [ -f "$DIR/llama-3.2-1b-$t.gguf" ] ||
      $A bench --synthetic llama-3.2-1b --type $t --save "$DIR/llama-3.2-1b-$t.gguf" -p 1 -n 0 -r 1 >/dev/null
  done
fi
if [ "$big" = 1 ] && [ ! -f "$DIR/llama-3.1-8b-q4_k_m.gguf" ]; then
  $A bench --synthetic llama-3.1-8b --type q4_k_m --save "$DIR/llama-3.1-8b-q4_k_m.gguf" -p 1 -n 0 -r 1 >/dev/null
fi

cases=()
[ "$smol" = 1 ] && cases+=("$DIR/smollm2-llamacpp-q4_k_m.gguf 512 128" "$DIR/smollm2-llamacpp-q6_k.gguf 512 128")
[ "$smol" = 1 ] && [ "$more" = 1 ] &&
  cases+=("$DIR/smollm2-llamacpp-q5_k_m.gguf 512 128" "$DIR/smollm2-llamacpp-q3_k_m.gguf 512 128")
cases+=("$DIR/llama-3.2-1b-q4_k_m.gguf 128 32")
[ "$more" = 1 ] && for t in q5_k_m q3_k_m q2_k; do cases+=("$DIR/llama-3.2-1b-$t.gguf 128 32"); done
[ "$big" = 1 ] && cases+=("$DIR/llama-3.1-8b-q4_k_m.gguf 64 16")

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs"
echo "threads $threads, repetitions $reps per run, $rounds alternating rounds; $($A --version)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| file | test | llama.cpp t/s per round | airlock t/s per round | airlock / llama.cpp (means) | airlock of ceiling (mean) |"
echo "| --- | --- | --- | --- | ---: | ---: |"
for c in "${cases[@]}"; do
  set -- $c
  f=$1; p=$2; n=$3; ljs=(); ajs=()
  [ "$tg_only" = 1 ] && p=0
  run_llama() { ljs+=("$("$BIN/llama-bench" -m "$f" -t "$threads" -p "$p" -n "$n" -r "$reps" -o json 2>/dev/null)"); }
  run_airlock() { ajs+=("$($A bench -m "$f" -t "$threads" -p "$p" -n "$n" -r "$reps" --json --ceiling 2>/dev/null)"); }
  for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then run_llama; run_airlock; else run_airlock; run_llama; fi
  done
  python3 - "$f" "${#ljs[@]}" "${ljs[@]}" "${ajs[@]}" <<'PY'
import json, os, sys
f, k = sys.argv[1], int(sys.argv[2])
def rows(js):
    return {("pp%d" % r["n_prompt"]) if r["n_prompt"] else ("tg%d" % r["n_gen"]): r
            for r in json.loads(js) if r["n_prompt"] or r["n_gen"]}
l = [rows(j) for j in sys.argv[3:3 + k]]
a = [rows(j) for j in sys.argv[3 + k:3 + 2 * k]]
fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)
for test in sorted(l[0], key=lambda t: t[:2] != "pp"):
    lt = [r[test]["avg_ts"] for r in l]
    at = [r[test]["avg_ts"] for r in a]
    share = ""
    if test.startswith("tg") and "ceiling_ts" in a[0][test]:
        s = [r[test]["avg_ts"] / r[test]["ceiling_ts"] for r in a]
        share = f"{100 * sum(s) / k:.0f}%"
    print(f"| {os.path.basename(f)} | {test} | {fmt(lt)} | {fmt(at)} | {sum(at) / sum(lt):.2f}x | {share} |")
PY
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
