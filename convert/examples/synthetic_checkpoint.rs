//! Writes a random-weight Hugging Face Llama checkpoint (sharded bf16 safetensors, config.json with
//! Llama 3.1 rope scaling, the tokenizer files of a directory you name) for scale tests of
//! `airlock convert`. Streams: memory stays at one 8 MB chunk whatever the shape.
//!
//! ```text
//! cargo run --release -p airlock-convert --example synthetic_checkpoint -- \
//!     OUT_DIR --shape llama-3.1-8b --tokenizer-dir ../shared/fixtures/llama3 [--shard-size 5000000000]
//! ```
//! Shapes: `llama-3.1-8b` (Foundation-sec-8b's: 32 layers, hidden 4096, 32 heads, 8 KV heads,
//! ffn 14336, vocab 128256, untied) and `tiny` (2 layers, hidden 64, vocab 128256).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use airlock_convert::export::safetensors_header;

struct Shape {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

fn shape(name: &str) -> Option<Shape> {
    Some(match name {
        "llama-3.1-8b" => Shape {
            layers: 32,
            hidden: 4096,
            ffn: 14336,
            heads: 32,
            kv_heads: 8,
            vocab: 128256,
        },
        "tiny" => Shape {
            layers: 2,
            hidden: 64,
            ffn: 128,
            heads: 4,
            kv_heads: 2,
            vocab: 128256,
        },
        _ => return None,
    })
}

/// xorshift64*: cheap, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Fills `out` with bf16 values: weights of magnitude 2^-10..2^-4 with random sign and mantissa,
/// or values near 1 for norms.
fn fill(rng: &mut Rng, out: &mut [u8], norm: bool) {
    for pair in out.chunks_exact_mut(8) {
        let r = rng.next();
        for k in 0..4 {
            let b = (r >> (16 * k)) as u16;
            let bits = if norm {
                0x3F80 | (b & 0x0F) // 1.0 .. 1.06
            } else {
                let sign = b & 0x8000;
                let exp = 117 + (b >> 7 & 0x7) % 6; // 2^-10 .. 2^-5
                sign | (exp << 7) | (b & 0x7F)
            };
            pair[2 * k..2 * k + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = None;
    let mut shape_name = "llama-3.1-8b".to_string();
    let mut tok_dir = None;
    let mut shard_size: u64 = 5_000_000_000;
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).cloned().ok_or("missing value".to_string());
        match args[i].as_str() {
            "--shape" => shape_name = val(i)?,
            "--tokenizer-dir" => tok_dir = Some(PathBuf::from(val(i)?)),
            "--shard-size" => shard_size = val(i)?.parse().map_err(|e| format!("{e}"))?,
            s if out.is_none() && !s.starts_with('-') => {
                out = Some(PathBuf::from(s));
                i += 1;
                continue;
            }
            s => return Err(format!("unexpected argument {s:?}")),
        }
        i += 2;
    }
    let out =
        out.ok_or("usage: synthetic_checkpoint OUT_DIR [--shape NAME] --tokenizer-dir DIR")?;
    let tok_dir = tok_dir.ok_or("--tokenizer-dir DIR is required")?;
    let s = shape(&shape_name).ok_or(format!("unknown shape {shape_name}"))?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    let hd = s.hidden / s.heads;
    let (h, f, v) = (s.hidden as u64, s.ffn as u64, s.vocab as u64);
    let (q, kv) = ((s.heads * hd) as u64, (s.kv_heads * hd) as u64);
    let mut tensors: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..s.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        tensors.extend([
            (p("input_layernorm"), vec![h]),
            (p("self_attn.q_proj"), vec![q, h]),
            (p("self_attn.k_proj"), vec![kv, h]),
            (p("self_attn.v_proj"), vec![kv, h]),
            (p("self_attn.o_proj"), vec![h, q]),
            (p("post_attention_layernorm"), vec![h]),
            (p("mlp.gate_proj"), vec![f, h]),
            (p("mlp.up_proj"), vec![f, h]),
            (p("mlp.down_proj"), vec![h, f]),
        ]);
    }
    tensors.push(("model.norm.weight".into(), vec![h]));
    tensors.push(("lm_head.weight".into(), vec![v, h]));

    // Group into shards of at most shard_size bytes.
    let mut shards: Vec<Vec<(String, Vec<u64>)>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let n = 2 * t.1.iter().product::<u64>();
        if size > 0 && size + n > shard_size {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().unwrap().push(t);
    }
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; 8 << 20];
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n_shards:05}.safetensors", k + 1);
        let entries: Vec<(String, &str, Vec<u64>, u64)> = shard
            .iter()
            .map(|(n, sh)| {
                (
                    n.clone(),
                    "BF16",
                    sh.clone(),
                    2 * sh.iter().product::<u64>(),
                )
            })
            .collect();
        let path = out.join(&name);
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut w = BufWriter::new(File::create(&path).map_err(err)?);
        w.write_all(&safetensors_header(&entries)).map_err(err)?;
        for (n, _, sh, bytes) in &entries {
            let norm = sh.len() == 1;
            let mut left = *bytes as usize;
            while left > 0 {
                let m = left.min(buf.len());
                fill(&mut rng, &mut buf[..m], norm);
                w.write_all(&buf[..m]).map_err(err)?;
                left -= m;
            }
            weight_map.insert(n.clone(), serde_json::json!(name));
            total += bytes;
        }
        w.flush().map_err(err)?;
        eprintln!("wrote {}", path.display());
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": format!("synthetic-{shape_name}"),
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"
        },
        "tie_word_embeddings": false,
        "vocab_size": s.vocab,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16"
    });
    write_json(&out.join("config.json"), &config)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = tok_dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name)).map_err(|e| format!("{}: {e}", src.display()))?;
        }
    }
    eprintln!(
        "checkpoint {} ({} shards, {:.2} GB of bf16)",
        out.display(),
        n_shards,
        total as f64 / 1e9
    );
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), String> {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap_or_default())
        .map_err(|e| format!("{}: {e}", path.display()))
}
