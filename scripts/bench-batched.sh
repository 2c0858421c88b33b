#!/usr/bin/env bash
# Many sequences decoded together: airlock batched-bench against llama.cpp's llama-batched-bench
# on the same GGUF, same threads, same PP/TG/B, in rounds that alternate which engine goes first
# (a shared host's speed drifts between runs more than the engines differ). Prints each round's
# S_TG (generation tokens/s over all B sequences) and S_PP, then the ratio of the means per B,
# and airlock's S_TG at each B over its own at B = 1 (what batching buys).
#
#   scripts/bench-batched.sh MODEL.gguf [-t THREADS] [--npp 128] [--ntg 32] [--npl 1,2,4,8] [--rounds 3]
#
# llama-batched-bench comes from ../shared/tools/llama-cpp-anchor.sh (or LLAMA_BATCHED_BENCH=path).
# A Llama-3.2-1B-shaped file: target/release/airlock bench --synthetic llama-3.2-1b --type q4_0
#   --save /tmp/llama-3.2-1b-q4_0.gguf -p 1 -n 0 -r 1
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,12p "$0" >&2; exit 2; }
model=$1; shift
threads=$(nproc); npp=128; ntg=32; npl=1,2,4,8; rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    -t) threads=$2; shift ;;
    --npp) npp=$2; shift ;;
    --ntg) ntg=$2; shift ;;
    --npl) npl=$2; shift ;;
    --rounds) rounds=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
LBB=${LLAMA_BATCHED_BENCH:-$HOME/.cache/llama-cpp-anchor/build/bin/llama-batched-bench}
[ -x "$LBB" ] || { echo "llama-batched-bench not found: run ../shared/tools/llama-cpp-anchor.sh or set LLAMA_BATCHED_BENCH" >&2; exit 1; }
cargo build --release --quiet
A=target/release/airlock
max_b=$(tr ',' '\n' <<<"$npl" | sort -n | tail -1)
# llama.cpp's -c is the KV cache of all sequences together.
ctx=$(( max_b * (npp + ntg) ))

# The table rows of either tool: "PP TG B N_KV T_PP S_PP T_TG S_TG T S".
rows() { grep -E '^\|[[:space:]]*[0-9]' | tr -d '|' ; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
run_llama() { "$LBB" -m "$model" -t "$threads" -c "$ctx" -b 2048 -ub 512 -npp "$npp" -ntg "$ntg" -npl "$npl" 2>&1 | rows >"$out/l$1"; }
run_airlock() { $A batched-bench -m "$model" -t "$threads" --npp "$npp" --ntg "$ntg" --npl "$npl" 2>&1 | rows >"$out/a$1"; }

echo "model $model, $threads threads, PP $npp, TG $ntg, B $npl, $rounds rounds; $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'); $(date -u '+%Y-%m-%d %H:%M UTC')"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run_llama "$r"; run_airlock "$r"; else run_airlock "$r"; run_llama "$r"; fi
done

echo
echo "| B | llama.cpp S_TG per round | airlock S_TG per round | airlock / llama.cpp (means) | airlock S_TG / its B=1 | llama.cpp S_PP (mean) | airlock S_PP (mean) |"
echo "| ---: | --- | --- | ---: | ---: | ---: | ---: |"
python3 - "$out" "$rounds" <<'PY'
import sys, statistics as st
out, rounds = sys.argv[1], int(sys.argv[2])
def load(prefix):
    by_b = {}
    for r in range(1, rounds + 1):
        for line in open(f"{out}/{prefix}{r}"):
            f = line.split()
            b, s_pp, s_tg = int(f[2]), float(f[5]), float(f[7])
            by_b.setdefault(b, []).append((s_pp, s_tg))
    return by_b
l, a = load("l"), load("a")
a1 = st.mean(t for _, t in a[min(a)])
for b in sorted(a):
    lt = [t for _, t in l.get(b, [])]
    at = [t for _, t in a[b]]
    ratio = st.mean(at) / st.mean(lt) if lt else float("nan")
    lpp = st.mean(p for p, _ in l[b]) if b in l else float("nan")
    app = st.mean(p for p, _ in a[b])
    print(f"| {b} | {', '.join(f'{x:.1f}' for x in lt)} | {', '.join(f'{x:.1f}' for x in at)} | "
          f"{ratio:.2f}x | {st.mean(at) / a1:.2f}x | {lpp:.1f} | {app:.1f} |")
PY
