#!/usr/bin/env bash
# Everything the project checks, in one command (the README's test command; .ci/run calls it).
# Tests build with opt-level 3 ([profile.test] in Cargo.toml) so model tests stay fast.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  echo "note: the real model is missing; tests that need it will fail. Run scripts/fetch-models.sh" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --quiet
