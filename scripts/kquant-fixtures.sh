#!/usr/bin/env bash
# Regenerates tests/fixtures/kquants/ (a development tool; CI only reads the files). The
# references come from tools other than airlock:
# - quantized bytes: llama.cpp's own `quantize_row_*_ref` (ggml/src/ggml-quants.c of the
#   llama.cpp vendored in the PyPI sdist of llama-cpp-python 0.3.36, commit 0c1e57098),
#   compiled here with -ffp-contract=off (no fused multiply-adds; llama-quantize's bytes come
#   from these functions when no importance matrix is given);
# - dequantized values: gguf-py 0.19.0's numpy dequantizers (the venv that
#   scripts/install-test-deps.sh keeps in target/compat-venv).
# Usage: scripts/kquant-fixtures.sh [LLAMA_CPP_SRC]  (default: the anchor's unpacked sdist)
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-$HOME/.cache/llama-cpp-anchor/llama_cpp_python-0.3.36/vendor/llama.cpp}"
ggml="$src/ggml"
[ -f "$ggml/src/ggml-quants.c" ] || { echo "no ggml-quants.c under $src" >&2; exit 1; }
py="${AIRLOCK_COMPAT_VENV:-target/compat-venv}/bin/python"
out=tests/fixtures/kquants
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/ref.c" <<'C'
// Reads N f32 from stdin, writes quantize_row_<TYPE>_ref's bytes to stdout.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-quants.h"
int main(int argc, char **argv) {
    const char *t = argv[1]; long n = atol(argv[2]);
    float *x = malloc(n * sizeof(float));
    if (fread(x, sizeof(float), n, stdin) != (size_t)n) return 1;
    unsigned char *y = calloc(n * 2, 1);
    size_t b = 0;
    if (!strcmp(t, "q2_K")) { quantize_row_q2_K_ref(x, (void*)y, n); b = n/256*84; }
    else if (!strcmp(t, "q3_K")) { quantize_row_q3_K_ref(x, (void*)y, n); b = n/256*110; }
    else if (!strcmp(t, "q4_K")) { quantize_row_q4_K_ref(x, (void*)y, n); b = n/256*144; }
    else if (!strcmp(t, "q5_K")) { quantize_row_q5_K_ref(x, (void*)y, n); b = n/256*176; }
    else if (!strcmp(t, "q6_K")) { quantize_row_q6_K_ref(x, (void*)y, n); b = n/256*210; }
    else if (!strcmp(t, "q8_K")) { quantize_row_q8_K_ref(x, (void*)y, n); b = n/256*292; }
    else if (!strcmp(t, "q5_0")) { quantize_row_q5_0_ref(x, (void*)y, n); b = n/32*22; }
    else if (!strcmp(t, "q5_1")) { quantize_row_q5_1_ref(x, (void*)y, n); b = n/32*24; }
    else return 2;
    fwrite(y, 1, b, stdout);
    return 0;
}
C
cat > "$work/stubs.c" <<'C'
#include <stdlib.h>
#include <stddef.h>
// Link-time stubs for ggml functions ggml-quants.c references outside the reference quantizers.
void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int t, long n) { abort(); }
size_t ggml_type_size(int t) { abort(); }
long ggml_blck_size(int t) { abort(); }
const char *ggml_type_name(int t) { abort(); }
void ggml_log_internal(int level, const char *fmt, ...) {}
C
flags="-O2 -ffp-contract=off -DNDEBUG -I$ggml/include -I$ggml/src"
gcc $flags -c "$ggml/src/ggml-quants.c" -o "$work/quants.o"
gcc $flags "$work/ref.c" "$work/stubs.c" "$work/quants.o" -o "$work/ref" -lm

"$py" - "$work" "$out" <<'PY'
import subprocess, sys
import numpy as np
from gguf import quants, GGMLQuantizationType as T

work, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(20261206)
sb = []  # 256-value super-blocks, each a case the quantizers branch on
g = lambda s=1.0: rng.standard_normal(256).astype(np.float32) * np.float32(s)
sb.append(g())                                             # 0 gaussian
sb.append(rng.uniform(-0.02, 0.02, 256).astype(np.float32))  # 1 typical weight scale
sb.append(rng.uniform(0.5, 1.5, 256).astype(np.float32))    # 2 all positive (min > 0)
sb.append(-rng.uniform(0.5, 1.5, 256).astype(np.float32))   # 3 all negative
x = g(); x[rng.integers(0, 256, 5)] *= 100; sb.append(x)   # 4 outliers
x = g(); x.reshape(16, 16)[::2] = 0; sb.append(x)          # 5 every other 16 zero
sb.append(np.zeros(256, np.float32))                       # 6 zeros
sb.append(np.full(256, 0.25, np.float32))                  # 7 constant
sb.append(g(1e-20))                                        # 8 below GROUP_MAX_EPS
x = g(1e-15); sb.append(x)                                 # 9 around it
sb.append(g(1e4))                                          # 10 large
sb.append(rng.integers(-8, 8, 256).astype(np.float32))     # 11 integers (ties)
sb.append((rng.integers(-40, 40, 256) + 0.5).astype(np.float32) / 8)  # 12 half steps
x = np.zeros(256, np.float32); x[96:128] = g()[:32]; sb.append(x)    # 13 one sub-block
sb.append(g(1e-4))                                         # 14 small
x = g(); x *= np.repeat(10.0 ** rng.uniform(-3, 3, 16), 16).astype(np.float32); sb.append(x)  # 15 mixed scales
x = g(3e6); sb.append(x)                                   # 16 f16 scale overflow
x = g(); x[7] = -0.0; x[100] = np.float32(1e-40); sb.append(x)  # 17 -0, subnormal
xs = np.concatenate(sb).astype('<f4')
xs.tofile(f"{out}/input.f32")
n = xs.size
for t in ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "q5_0", "q5_1"]:
    b = subprocess.run([f"{work}/ref", t, str(n)], input=xs.tobytes(), capture_output=True, check=True).stdout
    open(f"{out}/{t}.bin", "wb").write(b)

# Dequantization: gguf-py on llama.cpp's quantized bytes of the input, and on random block
# bytes whose f16 scales are set to random finite values.
sizes = {"Q2_K": (84, [(80, 2), (82, 2)]), "Q3_K": (110, [(108, 2)]),
         "Q4_K": (144, [(0, 2), (2, 2)]), "Q5_K": (176, [(0, 2), (2, 2)]),
         "Q6_K": (210, [(208, 2)]), "Q5_0": (22, [(0, 2)]), "Q5_1": (24, [(0, 2), (2, 2)])}
for name, (size, halves) in sizes.items():
    nblk = 4 if name.endswith("_K") else 32
    raw = rng.integers(0, 256, (nblk, size), dtype=np.uint8)
    for off, _ in halves:
        h = rng.uniform(-2.0, 2.0, nblk).astype(np.float16)
        h[rng.integers(0, nblk)] = np.float16(0)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(nblk, 2)
    known = open(f"{out}/{name[:2].lower() + name[2:]}.bin", "rb").read()
    blocks = np.concatenate([np.frombuffer(known, np.uint8), raw.reshape(-1)])
    blocks.tofile(f"{out}/dq-{name}.bin")
    vals = quants.dequantize(blocks, T[name]).astype('<f4')
    vals.tofile(f"{out}/dq-{name}.f32")
print("wrote", out)
PY
ls -l "$out"
