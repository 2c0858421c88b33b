#!/usr/bin/env bash
# Install what scripts/test.sh needs beyond Rust and Python: the aarch64 cross toolchain and
# qemu-user for scripts/test-aarch64.sh (Debian packages; run as root). Idempotent.
set -euo pipefail
pkgs="rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user libc6:arm64"
if dpkg -s $pkgs >/dev/null 2>&1; then
  echo "ok: test dependencies already installed"
  exit 0
fi
dpkg --add-architecture arm64
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
echo "ok: test dependencies installed"
