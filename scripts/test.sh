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
echo "== kernels on aarch64 under qemu-user (scalar twins, NEON and NEON dotprod)"
scripts/test-aarch64.sh --quiet
echo "== GGUF compatibility: llama.cpp's reader (PyPI gguf) on airlock's output (tests/compat)"
# Python is required, not optional: a missing python3 fails the run.
command -v python3 >/dev/null || { echo "error: python3 is required for tests/compat" >&2; exit 1; }
venv="${AIRLOCK_COMPAT_VENV:-target/compat-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "gguf==0.19.0" numpy pytest
# target/debug/airlock is the binary `cargo test` just built for the integration tests.
# --basetemp: pytest empties it at each start, where /tmp/pytest-of-$USER would keep three runs.
AIRLOCK_BIN="$PWD/target/debug/airlock" "$venv/bin/python" -m pytest -q \
  --basetemp="$PWD/target/pytest-tmp" tests/compat
