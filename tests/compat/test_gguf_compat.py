"""airlock's GGUF output read by llama.cpp's own Python reader (PyPI `gguf`, GGUFReader).

A random-weight Llama checkpoint is written here with numpy, converted by the airlock binary
(AIRLOCK_BIN) to every type, and each output is checked key by key and tensor by tensor: value
types, shapes, ggml types under airlock's policy, and data: quantized blocks byte-identical to
gguf-py's reference quantizers (`gguf.quants.quantize`), Q/K rows permuted as llama.cpp's converter
permutes them, rope_freqs as llama.cpp computes them. `airlock quantize` is checked the same way.
"""

import json
import math
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType as VT
from gguf import quants

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("AIRLOCK_BIN", str(ROOT / "target" / "debug" / "airlock"))
TOKENIZER = ROOT / "tests" / "fixtures" / "smollm2" / "hf" / "tokenizer.json"

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 80, 49152
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 500000.0
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def airlock(*args):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def write_safetensors(path, tensors):
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def permute(w, n_head):
    # llama.cpp's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors():
    # llama.cpp's generate_extra_tensors for rope_type llama3, in float32
    freqs = 1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / np.float32(HEAD_DIM)))
    factor, lf, hf, orig = 8.0, 1.0, 4.0, 8192
    out = []
    for f in freqs.astype(np.float32):
        wavelen = np.float32(2 * math.pi) / f
        if wavelen < orig / hf:
            out.append(1.0)
        elif wavelen > orig / lf:
            out.append(factor)
        else:
            s = (np.float32(orig) / wavelen - np.float32(lf)) / np.float32(hf - lf)
            out.append(np.float32(1) / ((np.float32(1) - s) / np.float32(factor) + s))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(7)
    w = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float32)
    t = {"model.embed_tokens.weight": w(VOCAB, HIDDEN)}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = 1 + w(HIDDEN)
        t[p + "self_attn.q_proj.weight"] = w(HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        t[p + "post_attention_layernorm.weight"] = 1 + w(HIDDEN)
        t[p + "mlp.gate_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN)
        t[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
    t["model.norm.weight"] = 1 + w(HIDDEN)
    t["lm_head.weight"] = w(VOCAB, HIDDEN)
    write_safetensors(d / "model.safetensors", t)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": "compat-llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": ROPE_THETA, "tie_word_embeddings": False, "vocab_size": VOCAB,
        "hidden_act": "silu",
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE,
    }))
    return d, t


def gguf_tensors(t):
    """GGUF name -> (f32 values in GGUF row order, is_output_head)."""
    out = {"token_embd.weight": (t["model.embed_tokens.weight"], False)}
    for l in range(LAYERS):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        out[b + "attn_norm.weight"] = (t[p + "input_layernorm.weight"], False)
        out[b + "attn_q.weight"] = (permute(t[p + "self_attn.q_proj.weight"], HEADS), False)
        out[b + "attn_k.weight"] = (permute(t[p + "self_attn.k_proj.weight"], KV_HEADS), False)
        out[b + "attn_v.weight"] = (t[p + "self_attn.v_proj.weight"], False)
        out[b + "attn_output.weight"] = (t[p + "self_attn.o_proj.weight"], False)
        out[b + "ffn_norm.weight"] = (t[p + "post_attention_layernorm.weight"], False)
        out[b + "ffn_gate.weight"] = (t[p + "mlp.gate_proj.weight"], False)
        out[b + "ffn_up.weight"] = (t[p + "mlp.up_proj.weight"], False)
        out[b + "ffn_down.weight"] = (t[p + "mlp.down_proj.weight"], False)
    out["output_norm.weight"] = (t["model.norm.weight"], False)
    out["output.weight"] = (t["lm_head.weight"], True)
    return out


TYPES = {"f32": (Q.F32, 0), "f16": (Q.F16, 1), "bf16": (Q.BF16, 32), "q8_0": (Q.Q8_0, 7),
         "q4_0": (Q.Q4_0, 2), "q4_1": (Q.Q4_1, 3)}


def policy(ty, values, head, pure=False):
    if values.ndim == 1:
        return Q.F32
    q = TYPES[ty][0]
    if head and not pure and ty in ("q4_0", "q4_1"):
        q = Q.Q8_0
    block = quants.GGML_QUANT_SIZES[q][0]
    if values.shape[-1] % block:
        return Q.F32 if ty == "f32" else Q.F16
    return q


def expected_bytes(q, values):
    if q == Q.F32:
        return values.astype(np.float32).tobytes()
    if q == Q.F16:
        return values.astype(np.float16).tobytes()
    return quants.quantize(values.astype(np.float32), q).tobytes()


def field(r, key):
    f = r.fields[key]
    return f.contents(), f.types


def check_keys(r, ty, vocab_too=False):
    tok = json.loads(TOKENIZER.read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    want = {
        "general.architecture": ("llama", [VT.STRING]),
        "general.type": ("model", [VT.STRING]),
        "general.name": ("compat-llama", [VT.STRING]),
        "general.file_type": (TYPES[ty][1], [VT.UINT32]),
        "general.quantization_version": (2, [VT.UINT32]),
        "llama.block_count": (LAYERS, [VT.UINT32]),
        "llama.context_length": (4096, [VT.UINT32]),
        "llama.embedding_length": (HIDDEN, [VT.UINT32]),
        "llama.feed_forward_length": (FFN, [VT.UINT32]),
        "llama.attention.head_count": (HEADS, [VT.UINT32]),
        "llama.attention.head_count_kv": (KV_HEADS, [VT.UINT32]),
        "llama.rope.freq_base": (ROPE_THETA, [VT.FLOAT32]),
        "llama.attention.layer_norm_rms_epsilon": (float(np.float32(1e-5)), [VT.FLOAT32]),
        "llama.vocab_size": (VOCAB, [VT.UINT32]),
        "llama.rope.dimension_count": (HEAD_DIM, [VT.UINT32]),
        "tokenizer.ggml.model": ("gpt2", [VT.STRING]),
        "tokenizer.ggml.pre": ("smollm", [VT.STRING]),
        "tokenizer.ggml.add_space_prefix": (False, [VT.BOOL]),
        "tokenizer.ggml.add_bos_token": (False, [VT.BOOL]),
        "tokenizer.ggml.bos_token_id": (1, [VT.UINT32]),
        "tokenizer.ggml.eos_token_id": (2, [VT.UINT32]),
        "tokenizer.ggml.unknown_token_id": (0, [VT.UINT32]),
        "tokenizer.ggml.padding_token_id": (2, [VT.UINT32]),
        "tokenizer.chat_template": (TEMPLATE, [VT.STRING]),
        "airlock.rope_scaling.rope_type": ("llama3", [VT.STRING]),
        "airlock.rope_scaling.factor": (8.0, [VT.FLOAT64]),
        "airlock.rope_scaling.low_freq_factor": (1.0, [VT.FLOAT64]),
        "airlock.rope_scaling.high_freq_factor": (4.0, [VT.FLOAT64]),
        "airlock.rope_scaling.original_max_position_embeddings": (8192, [VT.UINT64]),
    }
    for key, (value, types) in want.items():
        got, got_types = field(r, key)
        assert got_types == types, key
        assert got == value, key
    for key, elem, n in [("tokenizer.ggml.tokens", VT.STRING, VOCAB),
                         ("tokenizer.ggml.token_type", VT.INT32, VOCAB),
                         ("tokenizer.ggml.merges", VT.STRING, len(tok["model"]["merges"]))]:
        assert r.fields[key].types == [VT.ARRAY, elem], key
        assert len(r.fields[key].data) == n, key
    if vocab_too:  # element by element (slow in gguf-py, so once)
        assert field(r, "tokenizer.ggml.tokens")[0] == [t for t, _ in vocab]
        added = {a["id"] for a in tok["added_tokens"] if a["special"]}
        want_types = [3 if i in added else 1 for i in range(VOCAB)]
        assert field(r, "tokenizer.ggml.token_type")[0] == want_types
        want_merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        assert field(r, "tokenizer.ggml.merges")[0] == want_merges
    extra = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    keys = {k for k in r.fields if not k.startswith("GGUF.")}
    assert keys == set(want) | extra, keys ^ (set(want) | extra)


def check_tensors(r, t, ty, pure=False):
    expect = gguf_tensors(t)
    got = {x.name: x for x in r.tensors}
    assert set(got) == set(expect) | {"rope_freqs.weight"}
    rf = got["rope_freqs.weight"]
    assert rf.tensor_type == Q.F32 and list(rf.shape) == [HEAD_DIM // 2]
    np.testing.assert_allclose(np.asarray(rf.data), rope_factors(), rtol=1e-6)
    for name, (values, head) in expect.items():
        x = got[name]
        q = policy(ty, values, head, pure)
        assert x.tensor_type == q, (name, x.tensor_type, q)
        assert list(x.shape) == list(reversed(values.shape)), name  # GGUF ne order
        assert np.asarray(x.data).tobytes() == expected_bytes(q, values), f"{name}: bytes differ"
        deq = quants.dequantize(x.data, x.tensor_type).reshape(values.shape)
        tol = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-3, Q.Q8_0: 2e-3, Q.Q4_0: 3e-2, Q.Q4_1: 3e-2}[q]
        assert np.max(np.abs(deq - values)) <= tol * max(1.0, np.max(np.abs(values))), name


@pytest.mark.parametrize("ty", list(TYPES))
def test_convert_every_type(checkpoint, tmp_path, ty):
    d, t = checkpoint
    out = tmp_path / f"m.{ty}.gguf"
    airlock("convert", d, "-o", out, "--type", ty, "--quiet")
    r = GGUFReader(out)
    assert r.data.shape[0] == out.stat().st_size
    check_keys(r, ty, vocab_too=(ty == "f32"))
    check_tensors(r, t, ty)


def test_pure_and_quantize(checkpoint, tmp_path):
    d, t = checkpoint
    pure = tmp_path / "pure.gguf"
    airlock("convert", d, "-o", pure, "--type", "q4_0", "--pure")
    check_tensors(GGUFReader(pure), t, "q4_0", pure=True)
    f32 = tmp_path / "m.f32.gguf"
    airlock("convert", d, "-o", f32, "--type", "f32")
    for ty in ("q4_1", "q8_0", "bf16"):
        out = tmp_path / f"q.{ty}.gguf"
        airlock("quantize", f32, "-o", out, "--type", ty)
        r = GGUFReader(out)
        check_keys(r, ty)
        check_tensors(r, t, ty)
