#!/usr/bin/env bash
# Remake tests/fixtures/llamacpp/kquant-*.json: llama.cpp's llama-quantize (the no-FMA build of
# ../shared/tools/llama-cpp-anchor.sh, so K-quant bytes do not depend on the C compiler fusing
# multiply-adds) run on the input models tests/kquant_mix.rs writes, for every --type airlock
# offers (f16/bf16/f32 aside). Records, per shape and type, each tensor's type, the sha256 of its
# bytes and general.file_type (for llama-3.1-8b, whose 16 GB input is a sparse file of zeros,
# `--dry-run` gives the types only). The tests then check airlock against these without llama.cpp.
# Not part of the test run: rerun only when the input generator in tests/kquant_mix.rs changes.
#
#   scripts/make-kquant-fixtures.sh    (LLAMA_CPP_BIN=DIR to use another build's bin/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${LLAMA_CPP_BIN:-$HOME/.cache/llama-cpp-anchor/build-nofma/bin}
py=${AIRLOCK_COMPAT_VENV:-$root/target/compat-venv}/bin/python
[ -x "$bin/llama-quantize" ] || { echo "no $bin/llama-quantize: run FP_CONTRACT_OFF=1 ../shared/tools/llama-cpp-anchor.sh" >&2; exit 1; }
"$py" -c 'import gguf' || { echo "no gguf-py in $py: run scripts/install-test-deps.sh" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/kquant-fixtures.XXXXXX")
trap 'rm -rf "$work"' EXIT

cd "$root"
AIRLOCK_KQUANT_INPUTS="$work" cargo test --quiet --test kquant_mix write_reference_inputs -- --ignored --exact
presets="q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 q4_k_m q4_k_s q4_1 q4_0 q3_k_l q3_k_m q3_k_s q2_k"
for shape in llama-3.1-8b kq-256 kq-fallback; do
  for p in $presets; do
    P=$(echo "$p" | tr a-z A-Z)
    if [ "$shape" = llama-3.1-8b ]; then
      "$bin/llama-quantize" --dry-run "$work/$shape.gguf" "$P" 2 >"$work/$shape.$p.log" 2>&1
    else
      "$bin/llama-quantize" "$work/$shape.gguf" "$work/$shape.$p.gguf" "$P" 2 >"$work/$shape.$p.log" 2>&1
    fi
  done
done

version=$(grep -m 1 '^version:' "$work/kq-256.q8_0.log" || true)
"$py" - "$work" "$root/tests/fixtures/llamacpp" "$presets" "$version" <<'PY'
import hashlib, json, re, sys
import gguf

work, dest, presets, build = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4]
inputs = json.load(open(f"{work}/inputs.json"))

def tname(t):
    return gguf.GGMLQuantizationType(int(t.tensor_type)).name

line = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s*(\w+), size = .*$")

for shape, info in inputs.items():
    r = gguf.GGUFReader(f"{work}/{shape}.gguf")
    inp = {t.name: t for t in r.tensors}
    doc = {
        "made_by": "llama.cpp llama-quantize (commit 0c1e57098 as vendored in llama-cpp-python "
                   "0.3.36, built with -ffp-contract=off; it prints " + repr(build) + ") on the input "
                   "tests/kquant_mix.rs writes; scripts/make-kquant-fixtures.sh",
        "model": info["model"],
        "input_data_sha256": info["input_data_sha256"],
        "tensors": None,
        "presets": {},
    }
    for p in presets:
        log = open(f"{work}/{shape}.{p}.log").read().splitlines()
        entry = {}
        if info["sparse"]:
            names, types = [], []
            for l in log:
                m = line.match(l)
                if not m:
                    continue
                names.append(m.group(1))
                paren = re.search(r"->.*\((\w+)\)\s*$", l)
                types.append((paren.group(1) if paren else m.group(2)).upper())
            assert len(names) == len(inp), (shape, p, len(names))
        else:
            out = gguf.GGUFReader(f"{work}/{shape}.{p}.gguf")
            names = [t.name for t in out.tensors]
            types = [tname(t) for t in out.tensors]
            raw = open(f"{work}/{shape}.{p}.gguf", "rb").read()
            entry["file_type"] = int(out.fields["general.file_type"].contents())
            entry["sha256"] = [
                hashlib.sha256(raw[t.data_offset:t.data_offset + int(t.n_bytes)]).hexdigest()
                for t in out.tensors
            ]
        entry["types"] = types
        if doc["tensors"] is None:
            doc["tensors"] = [
                {"name": n, "shape": [int(d) for d in inp[n].shape], "type": tname(inp[n])}
                for n in names
            ]
        assert [t["name"] for t in doc["tensors"]] == names, (shape, p)
        doc["presets"][p] = entry
    if doc["input_data_sha256"] is None:
        del doc["input_data_sha256"]
    # One tensor per line, one type list per line, one hash per line: small diffs, short file.
    d = json.dumps
    out = ["{", f' "made_by": {d(doc["made_by"])},', f' "model": {d(doc["model"], sort_keys=True)},']
    if "input_data_sha256" in doc:
        out.append(f' "input_data_sha256": {d(doc["input_data_sha256"])},')
    out.append(' "tensors": [')
    out.append(",\n".join("  " + d(t) for t in doc["tensors"]))
    out.append(" ],")
    out.append(' "presets": {')
    entries = []
    for p, e in doc["presets"].items():
        lines = [f'  {d(p)}: {{']
        fields = []
        if "file_type" in e:
            fields.append(f'   "file_type": {e["file_type"]}')
        fields.append(f'   "types": {d(e["types"])}')
        if "sha256" in e:
            fields.append('   "sha256": [\n' + ",\n".join("    " + d(h) for h in e["sha256"]) + "\n   ]")
        lines.append(",\n".join(fields))
        lines.append("  }")
        entries.append("\n".join(lines))
    out.append(",\n".join(entries))
    out.append(" }")
    out.append("}")
    text = "\n".join(out) + "\n"
    assert json.loads(text) == doc
    with open(f"{dest}/kquant-{shape}.json", "w") as f:
        f.write(text)
    print(f"wrote {dest}/kquant-{shape}.json")
PY
