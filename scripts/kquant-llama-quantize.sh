#!/usr/bin/env bash
# Regenerates tests/fixtures/kquants/llama-quantize-sha256.txt (a development tool; CI only
# reads the file): the small F32 Llama model of engine/tests/kquant_llama_quantize.rs, written
# by that test, quantized by llama.cpp's `llama-quantize --pure` from the -ffp-contract=off
# build (FP_CONTRACT_OFF=1 ../shared/tools/llama-cpp-anchor.sh) to each type, and the sha256 of
# every tensor it wrote, with the type it chose, read by gguf-py.
# Usage: scripts/kquant-llama-quantize.sh [LLAMA_QUANTIZE]
set -euo pipefail
cd "$(dirname "$0")/.."
lq="${1:-$HOME/.cache/llama-cpp-anchor/build-nofma/bin/llama-quantize}"
[ -x "$lq" ] || { echo "no llama-quantize at $lq (build it with FP_CONTRACT_OFF=1 ../shared/tools/llama-cpp-anchor.sh)" >&2; exit 1; }
py="${AIRLOCK_COMPAT_VENV:-target/compat-venv}/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
AIRLOCK_KQ_F32="$work/f32.gguf" cargo test -q -p airlock-engine --test kquant_llama_quantize \
  -- --ignored write_the_f32_model >/dev/null
out=tests/fixtures/kquants/llama-quantize-sha256.txt
{
  echo "# <type asked> <tensor> <type written> <sha256 of its bytes>: llama-quantize --pure, $(basename "$(dirname "$(dirname "$lq")")"),"
  echo "# llama.cpp 0c1e57098 (llama-cpp-python 0.3.36 sdist), on engine/tests/kquant_llama_quantize.rs's F32 model."
  for t in Q2_K Q3_K Q4_K Q5_K Q6_K Q5_0 Q5_1 Q8_0 Q4_0 Q4_1; do
    "$lq" --pure "$work/f32.gguf" "$work/$t.gguf" "$t" 1 >"$work/$t.log" 2>&1 || { cat "$work/$t.log" >&2; exit 1; }
    "$py" - "$work/$t.gguf" "$t" <<'PY'
import hashlib, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
for t in r.tensors:
    if len(t.shape) == 2 or t.tensor_type.name not in ("F32",):
        if t.tensor_type.name == "F32":
            continue
        print(sys.argv[2], t.name, t.tensor_type.name, hashlib.sha256(bytes(t.data.tobytes())).hexdigest())
PY
  done
} > "$out"
wc -l "$out"
