#!/usr/bin/env bash
# airlock vs llama.cpp on the same GGUF files, same threads, one run: the figures in
# BENCHMARKS.md. llama.cpp's llama-bench comes from ../shared/tools/llama-cpp-anchor.sh (or
# LLAMA_BENCH=path). Files are made once in $DIR (default /tmp/airlock-bench, ~6 GB with --8b):
#   SmolLM2-135M Q4_0 / Q8_0 (airlock quantize --allow-requantize of the Q4_1 demo model) and the
#   Q4_1 original; Llama-3.2-1B-shaped Q4_0 / Q8_0 and (with --8b) Llama-3.1-8B-shaped Q4_0 with
#   random weights (airlock bench --synthetic).
#
# --rounds R then measures generation on the 1B (and 8B) files R more times, alternating
# llama-bench and airlock (with --ceiling; each goes first in every other round), because a shared host's memory bandwidth drifts
# between runs far more than either engine differs: the ratio of the means over the rounds
# is the figure to read, with airlock's share of the read-bandwidth ceiling.
#
#   scripts/bench-vs-llamacpp.sh [--8b] [-t THREADS] [-r REPS] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$(nproc); reps=3; big=0; rounds=0
while [ $# -gt 0 ]; do
  case "$1" in
    --8b) big=1 ;;
    -t) threads=$2; shift ;;
    -r) reps=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    *) echo "usage: $0 [--8b] [-t THREADS] [-r REPS] [--rounds R]" >&2; exit 2 ;;
  esac
  shift
done
DIR=${DIR:-/tmp/airlock-bench}
mkdir -p "$DIR"
LLAMA_BENCH=${LLAMA_BENCH:-$HOME/.cache/llama-cpp-anchor/build/bin/llama-bench}
[ -x "$LLAMA_BENCH" ] || { echo "llama-bench not found: run ../shared/tools/llama-cpp-anchor.sh or set LLAMA_BENCH" >&2; exit 1; }
cargo build --release --quiet
A=target/release/airlock
scripts/fetch-models.sh >/dev/null
Q41=models/SmolLM2-135M-Instruct.Q4_1.gguf
for t in q4_0 q8_0; do
  [ -f "$DIR/smollm2-$t.gguf" ] || $A quantize "$Q41" -o "$DIR/smollm2-$t.gguf" --type "$t" --allow-requantize -q
  [ -f "$DIR/llama-3.2-1b-$t.gguf" ] || $A bench --synthetic llama-3.2-1b --type "$t" --save "$DIR/llama-3.2-1b-$t.gguf" -p 1 -n 0 -r 1 >/dev/null
done
if [ "$big" = 1 ] && [ ! -f "$DIR/llama-3.1-8b-q4_0.gguf" ]; then
  $A bench --synthetic llama-3.1-8b --type q4_0 --save "$DIR/llama-3.1-8b-q4_0.gguf" -p 1 -n 0 -r 1 >/dev/null
fi

# file, prompt length, generation length (the settings of the llama.cpp figures in the fixtures)
cases=(
  "$DIR/smollm2-q4_0.gguf 512 128"
  "$DIR/smollm2-q8_0.gguf 512 128"
  "$Q41 512 128"
  "$DIR/llama-3.2-1b-q4_0.gguf 128 32"
  "$DIR/llama-3.2-1b-q8_0.gguf 128 32"
)
[ "$big" = 1 ] && cases+=("$DIR/llama-3.1-8b-q4_0.gguf 64 16")

echo "| file | test | llama.cpp t/s | airlock t/s | airlock / llama.cpp |"
echo "| --- | --- | ---: | ---: | ---: |"
for c in "${cases[@]}"; do
  set -- $c
  f=$1; p=$2; n=$3
  lj=$("$LLAMA_BENCH" -m "$f" -t "$threads" -p "$p" -n "$n" -r "$reps" -o json 2>/dev/null)
  aj=$($A bench -m "$f" -t "$threads" -p "$p" -n "$n" -r "$reps" --json 2>/dev/null)
  python3 - "$f" "$lj" "$aj" <<'PY'
import json, os, sys
f, lj, aj = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def rows(js):
    return {("pp%d" % r["n_prompt"]) if r["n_prompt"] else ("tg%d" % r["n_gen"]): r for r in js}
l, a = rows(lj), rows(aj)
for test in sorted(l, key=lambda t: t[:2] != "pp"):
    lr, ar = l[test], a[test]
    print(f"| {os.path.basename(f)} | {test} | {lr['avg_ts']:.1f} ± {lr['stddev_ts']:.1f} | "
          f"{ar['avg_ts']:.1f} ± {ar['stddev_ts']:.1f} | {ar['avg_ts'] / lr['avg_ts']:.2f}x |")
PY
done
echo
echo "threads $threads, repetitions $reps, kernels: $($A --version)"

[ "$rounds" -gt 0 ] || exit 0
echo
echo "Generation, $rounds alternating rounds (llama-bench and airlock bench --ceiling, each first in every other round; -p 0 -r $reps each):"
echo
echo "| file | test | llama.cpp t/s per round | airlock t/s per round | airlock / llama.cpp (means) | airlock of ceiling (mean) |"
echo "| --- | --- | --- | --- | ---: | ---: |"
gen_cases=("$DIR/llama-3.2-1b-q4_0.gguf 32" "$DIR/llama-3.2-1b-q8_0.gguf 32")
[ "$big" = 1 ] && gen_cases+=("$DIR/llama-3.1-8b-q4_0.gguf 16")
for c in "${gen_cases[@]}"; do
  set -- $c
  f=$1; n=$2; ljs=(); ajs=()
  run_llama() { ljs+=("$("$LLAMA_BENCH" -m "$f" -t "$threads" -p 0 -n "$n" -r "$reps" -o json 2>/dev/null)"); }
  run_airlock() { ajs+=("$($A bench -m "$f" -t "$threads" -p 0 -n "$n" -r "$reps" --json --ceiling 2>/dev/null)"); }
  for r in $(seq "$rounds"); do
    # Odd rounds run llama-bench first, even rounds airlock first: in a fixed order the
    # second slot sometimes measured faster here (same binary, same settings), which
    # would favour one engine.
    if [ $((r % 2)) = 1 ]; then run_llama; run_airlock; else run_airlock; run_llama; fi
  done
  python3 - "$f" "$n" "${#ljs[@]}" "${ljs[@]}" "${ajs[@]}" <<'PY'
import json, os, sys
f, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
l = [json.loads(j)[0] for j in sys.argv[4:4 + k]]
a = [json.loads(j)[0] for j in sys.argv[4 + k:4 + 2 * k]]
lt, at = [r["avg_ts"] for r in l], [r["avg_ts"] for r in a]
share = [r["avg_ts"] / r["ceiling_ts"] for r in a]
fmt = lambda v: ", ".join(f"{x:.1f}" for x in v)
print(f"| {os.path.basename(f)} | tg{n} | {fmt(lt)} | {fmt(at)} | {sum(at) / sum(lt):.2f}x | "
      f"{100 * sum(share) / k:.0f}% (read {min(r['read_bytes_per_s'] for r in a) / 1e9:.1f}-"
      f"{max(r['read_bytes_per_s'] for r in a) / 1e9:.1f} GB/s) |")
PY
done
