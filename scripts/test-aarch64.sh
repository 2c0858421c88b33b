#!/usr/bin/env bash
# Run the kernels crate's tests on aarch64 under qemu-user: cross-compiled with Debian's rustc
# (which ships an aarch64 standard library), linked with the aarch64 GNU toolchain. This is how
# the scalar twins and the NEON paths are tested on an x86 machine. qemu's default CPU has
# FEAT_DotProd, so both `neon` and `neon-dotprod` run; QEMU_CPU=cortex-a72 emulates a CPU
# without it (then only `neon`).
#
# Needs the components rustc-aarch64, gcc-aarch64, qemu-user and libc6-arm64 (Debian packages),
# declared in scripts/install-test-deps.sh, which installs them (scripts/test.sh runs it first).
# Traps seen here: adding -L /usr/aarch64-linux-gnu to the runner mixes the cross loader with
# libc6:arm64 and hangs at the first thread; doctests fail because rustdoc comes from the other
# toolchain, hence --lib --tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Missing ones stop the run here, named, with the command that installs them.
scripts/install-test-deps.sh --check rustc-aarch64 gcc-aarch64 qemu-user libc6-arm64 >/dev/null

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# Tests that re-run their own binary in a child process start it through the same emulator.
export AIRLOCK_TEST_RUNNER=qemu-aarch64
# A separate target dir: the two compilers must not share build artefacts.
export CARGO_TARGET_DIR=target/aarch64
# Leaves out the benches' dev-dependency (criterion, see kernels/Cargo.toml): no bench runs here.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="--cfg airlock_no_benches"
cargo test -p airlock-kernels --lib --tests --target aarch64-unknown-linux-gnu "$@"
