#!/usr/bin/env bash
# Everything the project checks, in one command (the README's test command; .ci/run calls it).
# Tests build with opt-level 3 ([profile.test] in Cargo.toml) so model tests stay fast.
set -euo pipefail
cd "$(dirname "$0")/.."

# Set-up first, in seconds: every tool, package and file the steps below need is checked (and,
# where this run can, installed) before anything long starts. Without root, a missing Debian
# package stops the run here, naming the command that installs it.
echo "== test dependencies (scripts/install-test-deps.sh)"
scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --quiet
echo "== kernels on aarch64 under qemu-user (scalar twins, NEON and NEON dotprod)"
scripts/test-aarch64.sh --quiet
echo "== GGUF compatibility: llama.cpp's reader (PyPI gguf) on airlock's output (tests/compat)"
# The venv is the one scripts/install-test-deps.sh keeps (its pip lines); nothing is installed here.
venv="${AIRLOCK_COMPAT_VENV:-target/compat-venv}"
# target/debug/airlock is the binary `cargo test` just built for the integration tests.
# --basetemp: pytest empties it at each start, where /tmp/pytest-of-$USER would keep three runs.
AIRLOCK_BIN="$PWD/target/debug/airlock" "$venv/bin/python" -m pytest -q \
  --basetemp="$PWD/target/pytest-tmp" tests/compat
