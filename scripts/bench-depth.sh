#!/usr/bin/env bash
# Generation deep into a context (issue 17): airlock against llama.cpp on one file, same
# threads, one run. Measures tg N @ dD with `airlock bench -d D --ceiling` (which also measures
# the read bandwidth and gives the ceiling: read bandwidth / (weights + the KV cache read per
# token at that depth)), and with llama-bench -d D without and with -fa 1. Each round runs the
# engines in a different order (rotated), because a shared host's bandwidth drifts between
# runs far more than an engine's speed: read the ratios of the means over the rounds.
#
#   scripts/bench-depth.sh [FILE]
#
# FILE defaults to the Llama-3.2-1B-shaped Q4_0 file with random weights that
# scripts/bench-vs-llamacpp.sh uses ($DIR/llama-3.2-1b-q4_0.gguf, DIR=/tmp/airlock-bench),
# made here with `airlock bench --synthetic llama-3.2-1b --type q4_0 --save` if missing.
# Settings, from the environment (defaults in brackets):
#   DEPTHS   depths to measure, space-separated [4096]; "4096 16384" adds the issue's second
#            depth (each engine fills 16k tokens once per run: expect 30 min or more)
#   THREADS  [2]   GEN  tokens generated per test [32]   REPS  repetitions per run [3]
#   ROUNDS   [2]   Q8=1 also airlock --kv-type q8_0 and llama-bench -fa 1 -ctk/-ctv q8_0
#   PP=N     also prompt processing of an N-token prompt (airlock, llama-bench -fa 0/1), once
#   AIRLOCK  a built binary (default: cargo build --release, then target/release/airlock)
#   LLAMA_BENCH  [~/.cache/llama-cpp-anchor/build/bin/llama-bench]
# With the defaults (1B file, depth 4096, 2 threads, 2 rounds) it runs about 5-7 minutes on
# the 2-vCPU VM, after the build and the file (both skipped when present). Both engines fill
# the depth once per run (llama-bench keeps the filled state across its repetitions; airlock
# cuts each repetition back to the depth), untimed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTHS=${DEPTHS:-4096}; THREADS=${THREADS:-2}; GEN=${GEN:-32}; REPS=${REPS:-3}
ROUNDS=${ROUNDS:-2}; Q8=${Q8:-0}; PP=${PP:-0}
DIR=${DIR:-/tmp/airlock-bench}
LLAMA_BENCH=${LLAMA_BENCH:-$HOME/.cache/llama-cpp-anchor/build/bin/llama-bench}
[ -x "$LLAMA_BENCH" ] || { echo "llama-bench not found: run ../shared/tools/llama-cpp-anchor.sh or set LLAMA_BENCH" >&2; exit 1; }
if [ -z "${AIRLOCK:-}" ]; then
  cargo build --release --quiet
  AIRLOCK=target/release/airlock
fi
A=$AIRLOCK
if [ $# -ge 1 ]; then
  file=$1
else
  mkdir -p "$DIR"
  file=$DIR/llama-3.2-1b-q4_0.gguf
  [ -f "$file" ] || $A bench --synthetic llama-3.2-1b --type q4_0 --save "$file" -p 1 -n 0 -r 1 >/dev/null
fi
[ -f "$file" ] || { echo "no such file: $file" >&2; exit 1; }
out=$(mktemp -d /tmp/bench-depth.XXXXXX)
echo "# $(date -u +%FT%TZ) cpu:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) file $file"
echo "# threads $THREADS, depths $DEPTHS, tg$GEN, -r $REPS, $ROUNDS rounds; $($A --version); raw JSON in $out"

# name|command (JSON on stdout). The name keys the summary.
runs_for_depth() {
  local d=$1
  echo "airlock f16|$A bench -m $file -p 0 -n $GEN -d $d -t $THREADS -r $REPS --ceiling --json"
  [ "$Q8" = 1 ] && echo "airlock q8_0|$A bench -m $file -p 0 -n $GEN -d $d -t $THREADS -r $REPS --ceiling --kv-type q8_0 --json"
  echo "llama-bench -fa 0|$LLAMA_BENCH -m $file -p 0 -n $GEN -d $d -t $THREADS -r $REPS -fa 0 -o json"
  echo "llama-bench -fa 1|$LLAMA_BENCH -m $file -p 0 -n $GEN -d $d -t $THREADS -r $REPS -fa 1 -o json"
  [ "$Q8" = 1 ] && echo "llama-bench -fa 1 q8_0|$LLAMA_BENCH -m $file -p 0 -n $GEN -d $d -t $THREADS -r $REPS -fa 1 -ctk q8_0 -ctv q8_0 -o json"
  return 0
}

for d in $DEPTHS; do
  mapfile -t runs < <(runs_for_depth "$d")
  n=${#runs[@]}
  for ((round = 0; round < ROUNDS; round++)); do
    for ((i = 0; i < n; i++)); do
      # Round r starts at run r: each engine takes every slot in turn.
      k=$(((i + round) % n))
      name=${runs[$k]%%|*}; cmd=${runs[$k]#*|}
      echo "## d$d round $((round + 1)): $name (load:$(uptime | sed 's/.*load average: *//'))" >&2
      t0=$(date +%s)
      if $cmd > "$out/d$d-r$round-$k.json" 2> "$out/d$d-r$round-$k.err"; then
        echo "   $(($(date +%s) - t0)) s" >&2
      else
        echo "   FAILED (see $out/d$d-r$round-$k.err)" >&2
        rm -f "$out/d$d-r$round-$k.json"
      fi
    done
  done
  printf '%s\n' "${runs[@]}" > "$out/d$d-names"
done

python3 - "$out" "$ROUNDS" "$GEN" $DEPTHS <<'PY'
import json, os, sys
out, rounds, gen, depths = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
for d in depths:
    names = [l.split("|", 1)[0] for l in open(os.path.join(out, f"d{d}-names")).read().splitlines()]
    ts = {name: [] for name in names}
    ceil = []
    for r in range(rounds):
        for k, name in enumerate(names):
            p = os.path.join(out, f"d{d}-r{r}-{k}.json")
            if not os.path.exists(p):
                ts[name].append(None)
                continue
            row = [x for x in json.load(open(p)) if x.get("n_gen", 0) > 0][0]
            assert row.get("n_depth") == int(d), (p, row.get("n_depth"))
            ts[name].append(row["avg_ts"])
            if name == "airlock f16" and "ceiling_ts" in row:
                ceil.append((row["avg_ts"], row["ceiling_ts"], row["read_bytes_per_s"],
                             row["weight_bytes_per_token"], row["kv_bytes_per_token"]))
    mean = lambda v: sum(x for x in v if x is not None) / max(1, sum(x is not None for x in v))
    print(f"\n### tg{gen} @ d{d}\n")
    print("| run | t/s per round | mean t/s | airlock f16 / this |")
    print("| --- | --- | ---: | ---: |")
    base = mean(ts["airlock f16"])
    for name in names:
        m = mean(ts[name])
        per = ", ".join("-" if x is None else f"{x:.2f}" for x in ts[name])
        print(f"| {name} | {per} | {m:.2f} | {base / m:.2f}x |" if m else f"| {name} | {per} | - | - |")
    if ceil:
        share = [a / c for a, c, *_ in ceil]
        _, c, read, w, kv = ceil[-1]
        print(f"\nairlock f16 of its read-bandwidth ceiling: "
              + ", ".join(f"{100 * s:.0f}%" for s in share)
              + f" (mean {100 * sum(share) / len(share):.0f}%; ceiling "
              + ", ".join(f"{x[1]:.2f}" for x in ceil) + " t/s; read "
              + ", ".join(f"{x[2] / 1e9:.1f}" for x in ceil) + " GB/s; "
              + f"per token {w / 1e9:.3f} GB of weights + {kv / 1e9:.3f} GB of KV at this depth)")
PY

if [ "$PP" -gt 0 ]; then
  echo
  echo "### pp$PP (one run each)"
  for cmd in "$A bench -m $file -p $PP -n 0 -t $THREADS -r 1 -b 512" \
             "$LLAMA_BENCH -m $file -p $PP -n 0 -t $THREADS -r 1 -fa 0" \
             "$LLAMA_BENCH -m $file -p $PP -n 0 -t $THREADS -r 1 -fa 1"; do
    echo "## $cmd"
    $cmd 2>/dev/null | grep -E '^\| .*pp[0-9]' || echo "(failed)"
  done
fi
