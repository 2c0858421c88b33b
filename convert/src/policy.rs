//! Which ggml type each output tensor gets: llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp
//! at commit 0c1e57098) for a dense llama model, so `airlock convert` / `quantize` write the same
//! per-tensor mix as `llama-quantize` (checked against its own type lists in
//! tests/fixtures/llamacpp/kquant-*.json).
//!
//! The rules (the same for `convert` and `quantize`, documented in `--help` and the README):
//! - 1-D tensors (norms, `rope_freqs`) are F32.
//! - `--type` names a llama.cpp file type (`llama_ftype`). Its default tensor type (F32, F16, BF16,
//!   Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K) goes to every 2-D tensor, then:
//! - The output head (`output.weight`, or `token_embd.weight` when the embeddings are tied, since
//!   it is then the output head too) gets Q6_K for every quantized `--type` except q8_0 (which
//!   keeps Q8_0), or Q8_0 when its row length is not a multiple of the default type's block.
//! - The K-quant mixes raise chosen tensors (`use_more_bits(i, n)` is llama.cpp's
//!   `i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`, i the layer, n the layer count):
//!   q4_k_m, q5_k_m: attn_v and ffn_down in Q6_K where use_more_bits holds;
//!   q4_k_s: attn_v in Q5_K in the first 4 layers, ffn_down in Q5_K in the first n/8;
//!   q3_k_m: attn_v Q5_K in the first 2 layers then Q4_K, attn_output Q4_K, ffn_down Q5_K in the
//!   first n/16 then Q4_K; q3_k_l: attn_v, attn_output and ffn_down Q5_K;
//!   q2_k: attn_v Q4_K (Q3_K when fewer than 4 query heads share a KV head), attn_output and
//!   ffn_down Q3_K; 80-layer models with grouped-query attention (llama.cpp's "70B") also get
//!   Q5_K instead of Q3_K/Q4_K for attn_v. q3_k_s, q5_k_s, q6_k and the single types add nothing.
//! - `--pure` skips the two rules above; `--output-type` sets the output head's type.
//! - A row length that is not a multiple of the chosen type's block falls back as llama.cpp's
//!   `tensor_type_fallback`: Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and to
//!   F16 when even that block does not fit.

use airlock_engine::gguf::{FileType, FILE_TYPES};
use airlock_kernels::GgmlType;

use crate::error::ConvertError;

/// What `--type` names: one of llama.cpp's file types (`llama_ftype`), a recipe that decides
/// every tensor's type.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

/// Every `--type`, with its name and default tensor type (llama.cpp's
/// `llama_ftype_get_default_type`).
const OUT_TYPES: [(OutType, &str, GgmlType); 17] = [
    (OutType::Q8_0, "q8_0", GgmlType::Q8_0),
    (OutType::Q6_K, "q6_k", GgmlType::Q6_K),
    (OutType::Q5_K_M, "q5_k_m", GgmlType::Q5_K),
    (OutType::Q5_K_S, "q5_k_s", GgmlType::Q5_K),
    (OutType::Q5_1, "q5_1", GgmlType::Q5_1),
    (OutType::Q5_0, "q5_0", GgmlType::Q5_0),
    (OutType::Q4_K_M, "q4_k_m", GgmlType::Q4_K),
    (OutType::Q4_K_S, "q4_k_s", GgmlType::Q4_K),
    (OutType::Q4_1, "q4_1", GgmlType::Q4_1),
    (OutType::Q4_0, "q4_0", GgmlType::Q4_0),
    (OutType::Q3_K_L, "q3_k_l", GgmlType::Q3_K),
    (OutType::Q3_K_M, "q3_k_m", GgmlType::Q3_K),
    (OutType::Q3_K_S, "q3_k_s", GgmlType::Q3_K),
    (OutType::Q2_K, "q2_k", GgmlType::Q2_K),
    (OutType::F16, "f16", GgmlType::F16),
    (OutType::BF16, "bf16", GgmlType::BF16),
    (OutType::F32, "f32", GgmlType::F32),
];

/// llama-quantize's aliases: the K type alone means its medium mix.
const ALIASES: [(&str, OutType); 3] = [
    ("q3_k", OutType::Q3_K_M),
    ("q4_k", OutType::Q4_K_M),
    ("q5_k", OutType::Q5_K_M),
];

pub const OUT_TYPE_NAMES: &str = "q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, \
q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k, f16, bf16, f32 (q3_k, q4_k, q5_k: the _m mixes)";

/// The tensor types `--output-type` accepts: the ones airlock can encode.
pub const TENSOR_TYPE_NAMES: &str =
    "q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k, f16, bf16, f32";

impl OutType {
    fn row(self) -> &'static (OutType, &'static str, GgmlType) {
        OUT_TYPES
            .iter()
            .find(|r| r.0 == self)
            .expect("OUT_TYPES has every variant (tested)")
    }

    pub fn parse(s: &str) -> Result<Self, ConvertError> {
        let s = s.to_ascii_lowercase();
        OUT_TYPES
            .iter()
            .find(|r| r.1 == s)
            .map(|r| r.0)
            .or_else(|| ALIASES.iter().find(|a| a.0 == s).map(|a| a.1))
            .ok_or_else(|| {
                ConvertError::Usage(format!(
                    "unknown type {s:?}; expected one of {OUT_TYPE_NAMES}"
                ))
            })
    }

    /// The type of most 2-D tensors (llama.cpp's `llama_ftype_get_default_type`); the only one
    /// for f32, f16, bf16 and `--pure` files whose rows fit its blocks.
    pub fn ggml(self) -> GgmlType {
        self.row().2
    }

    /// The `llama_ftype` entry: `general.file_type` and llama.cpp's names for it.
    pub fn llama_ftype(self) -> &'static FileType {
        let want = match self {
            OutType::F32 => "ALL_F32".to_string(),
            t => format!("MOSTLY_{}", t.name().to_ascii_uppercase()),
        };
        FILE_TYPES
            .iter()
            .find(|f| f.name == want)
            .expect("every output type is a llama_ftype (tested)")
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        self.llama_ftype().id
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }
}

/// `--output-type`: one tensor type airlock can encode, by ggml's name in any case.
pub fn parse_tensor_type(s: &str) -> Result<GgmlType, ConvertError> {
    TENSOR_TYPE_NAMES
        .split(", ")
        .find(|n| n.eq_ignore_ascii_case(s))
        .and_then(|n| {
            airlock_kernels::types::all()
                .iter()
                .copied()
                .find(|t| t.name().eq_ignore_ascii_case(n))
        })
        .ok_or_else(|| {
            ConvertError::Usage(format!(
                "unknown tensor type {s:?}; expected one of {TENSOR_TYPE_NAMES}"
            ))
        })
}

impl std::str::FromStr for OutType {
    type Err = ConvertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutType::parse(s)
    }
}

impl std::fmt::Display for OutType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The model hyperparameters llama.cpp's rules read besides tensor names and shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFacts {
    /// `block_count`: the `n` of `use_more_bits(i, n)` for ffn_down.
    pub n_layer: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
}

impl ModelFacts {
    /// Query heads per KV head (llama.cpp's `n_gqa`; 0 without KV heads).
    fn n_gqa(&self) -> u64 {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }

    /// llama.cpp's `LLM_TYPE_70B` for the llama architecture.
    fn is_70b(&self) -> bool {
        self.n_layer == 80 && self.n_head != self.n_head_kv
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ty: OutType,
    /// `--output-type`: the output head's type (and a tied token embedding's).
    pub output_ty: Option<GgmlType>,
    /// `--pure`: every 2-D tensor in the default type (the fallback still applies).
    pub pure: bool,
}

/// llama.cpp's `tensor_category` (by name; only what a dense llama model has matters here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    /// attn_v and the fused attn_qkv / attn_kv_b (llama.cpp's `category_is_attn_v`).
    AttnV,
    AttnOutput,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight")
        || name.contains("attn_kv_b.weight")
        || name.contains("attn_v.weight")
    {
        Category::AttnV
    } else if name.contains("attn_k.weight") || name.contains("attn_q.weight") {
        // llama.cpp changes these only in IQ mixes.
        Category::Other
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") || name.contains("ffn_gate") {
        // Changed only in IQ mixes; tested before ffn_down as llama.cpp does.
        Category::Other
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// llama.cpp's `tensor_allows_quantization`, the parts that can name a llama tensor: a weight
/// and not a norm.
fn allows_quantization(name: &str) -> bool {
    name.ends_with("weight") && !name.contains("_norm.weight")
}

/// `use_more_bits(i_layer, n_layers)` of llama-quant.cpp, in C's integer arithmetic.
pub fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: the type used when `ty`'s blocks do not divide a row of
/// `ncols` values.
pub fn fallback(ty: GgmlType, ncols: u64) -> GgmlType {
    use GgmlType::*;
    if ncols.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let next = match ty {
        Q2_K | Q3_K => Q4_0,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        // 32-value blocks: nothing smaller to go to; F16 below.
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => ty,
        // Never chosen by airlock's policy (llama.cpp maps the IQ types to IQ4_NL and refuses
        // the rest); F16 always fits.
        IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0
        | Q8_K | NVFP4 | Q1_0 => F16,
        // Block size 1 always fits (returned above).
        F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => ty,
    };
    if ncols.is_multiple_of(next.block_size() as u64) {
        next
    } else {
        F16
    }
}

/// llama.cpp's `weight_name_comparer`: tensors outside the layers first, then by layer number
/// (`blk.N.`), then by name. The `i` of the counting rules is a tensor's rank in this order.
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            (digits > 0 && r.as_bytes().get(digits) == Some(&b'.'))
                .then(|| r[..digits].parse::<i64>().unwrap_or(i64::MAX))
        })
        .unwrap_or(-1)
}

impl Policy {
    pub fn new(ty: OutType) -> Self {
        Policy {
            ty,
            output_ty: None,
            pure: false,
        }
    }

    /// The type of every tensor in `tensors` (name, ggml dims with the row length first, source
    /// type), in the same order. The model's tensors must all be given at once: llama.cpp's rules
    /// count attn_v and ffn_down tensors, and look for `output.weight` to tell tied embeddings.
    pub fn plan(&self, m: &ModelFacts, tensors: &[(&str, &[u64], GgmlType)]) -> Vec<GgmlType> {
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| {
            let (na, nb) = (tensors[a].0, tensors[b].0);
            (layer_of(na), na).cmp(&(layer_of(nb), nb))
        });
        let tied = !tensors.iter().any(|t| t.0 == "output.weight");
        let n_attn_v = tensors
            .iter()
            .filter(|t| category(t.0) == Category::AttnV)
            .count() as i64;
        let mut st = Counters {
            n_attn_v,
            ..Counters::default()
        };
        let mut out = vec![GgmlType::F32; tensors.len()];
        for i in order {
            let (name, dims, src) = tensors[i];
            out[i] = self.choose(m, &mut st, name, dims, src, tied);
        }
        out
    }

    fn choose(
        &self,
        m: &ModelFacts,
        st: &mut Counters,
        name: &str,
        dims: &[u64],
        src: GgmlType,
        tied: bool,
    ) -> GgmlType {
        if dims.len() <= 1 {
            return GgmlType::F32;
        }
        if !allows_quantization(name) {
            return src;
        }
        let ncols = dims[0];
        let cat = category(name);
        let head = cat == Category::Output || (tied && cat == Category::TokenEmbd);
        if let (true, Some(t)) = (head, self.output_ty) {
            return fallback(t, ncols);
        }
        let default = self.ty.ggml();
        if !default.is_quantized() {
            return default;
        }
        let t = if self.pure {
            default
        } else {
            self.mix(m, st, cat, head, ncols)
        };
        fallback(t, ncols)
    }

    /// `llama_tensor_get_type_impl` for the llama architecture without experts.
    fn mix(
        &self,
        m: &ModelFacts,
        st: &mut Counters,
        cat: Category,
        head: bool,
        ncols: u64,
    ) -> GgmlType {
        use GgmlType as G;
        use OutType as F;
        let ft = self.ty;
        let mut t = ft.ggml();
        if head {
            return if !ncols.is_multiple_of(t.block_size() as u64) || t == G::Q8_0 {
                G::Q8_0
            } else {
                G::Q6_K
            };
        }
        match cat {
            Category::AttnV => {
                let (i, n) = (st.i_attn_v, st.n_attn_v);
                match ft {
                    F::Q2_K => t = if m.n_gqa() >= 4 { G::Q4_K } else { G::Q3_K },
                    F::Q3_K_M => t = if i < 2 { G::Q5_K } else { G::Q4_K },
                    F::Q3_K_L => t = G::Q5_K,
                    F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => t = G::Q6_K,
                    F::Q4_K_S if i < 4 => t = G::Q5_K,
                    _ => {}
                }
                if m.is_70b() && matches!(t, G::Q3_K | G::Q4_K) {
                    t = G::Q5_K;
                }
                st.i_attn_v += 1;
            }
            Category::FfnDown => {
                let (i, n) = (st.i_ffn_down, m.n_layer as i64);
                match ft {
                    F::Q2_K => t = G::Q3_K,
                    F::Q3_K_M => t = if i < n / 16 { G::Q5_K } else { G::Q4_K },
                    F::Q3_K_L => t = G::Q5_K,
                    F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => t = G::Q6_K,
                    F::Q4_K_S if i < n / 8 => t = G::Q5_K,
                    _ => {}
                }
                st.i_ffn_down += 1;
            }
            Category::AttnOutput => match ft {
                F::Q2_K => t = G::Q3_K,
                F::Q3_K_M => t = G::Q4_K,
                F::Q3_K_L => t = G::Q5_K,
                _ => {}
            },
            Category::Output | Category::TokenEmbd | Category::Other => {}
        }
        t
    }
}

/// llama.cpp's `quantize_state_impl` counters.
#[derive(Default)]
struct Counters {
    n_attn_v: i64,
    i_attn_v: i64,
    i_ffn_down: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType as G;

    #[test]
    fn every_output_type_parses_from_its_name_and_has_a_file_type() {
        let names: Vec<&str> = OUT_TYPE_NAMES
            .split(" (")
            .next()
            .unwrap()
            .split(", ")
            .collect();
        assert_eq!(names.len(), OUT_TYPES.len());
        for name in names {
            let t = OutType::parse(name).unwrap();
            assert_eq!(t.name(), name);
            assert_eq!(OutType::parse(&name.to_uppercase()).unwrap(), t);
            let ft = FileType::from_id(t.file_type()).unwrap();
            assert_eq!(
                ft.name.to_ascii_lowercase().rsplit_once("y_").map(|x| x.1),
                { (t != OutType::F32).then_some(name) }
            );
            // Single-type recipes are exactly the ones the ftype table says have one type.
            if let Some(s) = ft.single {
                assert_eq!(s, t.ggml(), "{name}");
            }
        }
        assert_eq!(OutType::parse("q4_k").unwrap(), OutType::Q4_K_M);
        assert_eq!(OutType::parse("Q5_K").unwrap(), OutType::Q5_K_M);
        assert_eq!(OutType::parse("q3_k").unwrap(), OutType::Q3_K_M);
        assert_eq!(OutType::Q4_K_M.file_type(), 15);
        assert_eq!(OutType::Q6_K.file_type(), 18);
        assert_eq!(OutType::F32.file_type(), 0);
        for bad in ["q4_k_x", "q8_k", "iq4_xs", "q2_k_s", ""] {
            assert!(OutType::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tensor_type_names_parse() {
        for name in TENSOR_TYPE_NAMES.split(", ") {
            let t = parse_tensor_type(name).unwrap();
            assert_eq!(t.name().to_ascii_lowercase(), name);
        }
        assert_eq!(parse_tensor_type("Q6_K").unwrap(), G::Q6_K);
        assert!(parse_tensor_type("q4_k_m").is_err());
        assert!(parse_tensor_type("q8_1").is_err());
        assert!(parse_tensor_type("iq4_nl").is_err());
    }

    #[test]
    fn use_more_bits_is_llama_cpps() {
        // n = 32 (Llama-3.1-8B): the first 4, the last 4, and every third from layer 6.
        let more: Vec<i64> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let more: Vec<i64> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn fallbacks_are_llama_cpps() {
        assert_eq!(fallback(G::Q4_K, 576), G::Q5_0);
        assert_eq!(fallback(G::Q5_K, 576), G::Q5_1);
        assert_eq!(fallback(G::Q6_K, 576), G::Q8_0);
        assert_eq!(fallback(G::Q3_K, 576), G::Q4_0);
        assert_eq!(fallback(G::Q2_K, 576), G::Q4_0);
        assert_eq!(fallback(G::Q4_K, 1536), G::Q4_K);
        assert_eq!(fallback(G::Q4_K, 100), G::F16);
        assert_eq!(fallback(G::Q4_0, 100), G::F16);
        assert_eq!(fallback(G::Q8_0, 64), G::Q8_0);
        assert_eq!(fallback(G::F16, 7), G::F16);
    }

    #[test]
    fn layer_order_is_llama_cpps() {
        assert_eq!(layer_of("output.weight"), -1);
        assert_eq!(layer_of("blk.10.attn_v.weight"), 10);
        assert_eq!(layer_of("blk.x.attn_v.weight"), -1);
        assert_eq!(layer_of("blk.99999999999999999999.a"), i64::MAX);
    }

    fn llama(n_layer: u64, tied: bool, embd: u64, ff: u64) -> Vec<(String, Vec<u64>)> {
        let mut v = vec![("token_embd.weight".to_string(), vec![embd, 1000])];
        for i in 0..n_layer {
            for (n, d) in [
                ("attn_norm", vec![embd]),
                ("attn_q", vec![embd, embd]),
                ("attn_k", vec![embd, embd / 4]),
                ("attn_v", vec![embd, embd / 4]),
                ("attn_output", vec![embd, embd]),
                ("ffn_norm", vec![embd]),
                ("ffn_gate", vec![embd, ff]),
                ("ffn_up", vec![embd, ff]),
                ("ffn_down", vec![ff, embd]),
            ] {
                v.push((format!("blk.{i}.{n}.weight"), d));
            }
        }
        v.push(("output_norm.weight".into(), vec![embd]));
        if !tied {
            v.push(("output.weight".into(), vec![embd, 1000]));
        }
        v
    }

    fn plan_of(p: &Policy, m: &ModelFacts, ts: &[(String, Vec<u64>)]) -> Vec<(String, GgmlType)> {
        let refs: Vec<(&str, &[u64], GgmlType)> = ts
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice(), G::BF16))
            .collect();
        ts.iter()
            .map(|t| t.0.clone())
            .zip(p.plan(m, &refs))
            .collect()
    }

    fn ty(plan: &[(String, GgmlType)], name: &str) -> GgmlType {
        plan.iter().find(|p| p.0 == name).unwrap().1
    }

    #[test]
    fn q4_k_m_mix_on_a_256_wide_model() {
        let m = ModelFacts {
            n_layer: 16,
            n_head: 32,
            n_head_kv: 8,
        };
        let ts = llama(16, false, 2048, 8192);
        let p = plan_of(&Policy::new(OutType::Q4_K_M), &m, &ts);
        assert_eq!(ty(&p, "output.weight"), G::Q6_K);
        assert_eq!(ty(&p, "token_embd.weight"), G::Q4_K);
        assert_eq!(ty(&p, "blk.0.attn_norm.weight"), G::F32);
        for i in 0..16 {
            let want = if use_more_bits(i, 16) {
                G::Q6_K
            } else {
                G::Q4_K
            };
            assert_eq!(ty(&p, &format!("blk.{i}.attn_v.weight")), want, "{i}");
            assert_eq!(ty(&p, &format!("blk.{i}.ffn_down.weight")), want, "{i}");
            assert_eq!(ty(&p, &format!("blk.{i}.attn_q.weight")), G::Q4_K);
            assert_eq!(ty(&p, &format!("blk.{i}.ffn_up.weight")), G::Q4_K);
        }
        // Input order does not matter: the counters follow llama.cpp's name order.
        let mut rev = ts.clone();
        rev.reverse();
        let pr = plan_of(&Policy::new(OutType::Q4_K_M), &m, &rev);
        for (n, t) in &p {
            assert_eq!(ty(&pr, n), *t, "{n}");
        }
        // --pure: one type; --output-type: the head only.
        let pure = Policy {
            pure: true,
            ..Policy::new(OutType::Q4_K_M)
        };
        let pp = plan_of(&pure, &m, &ts);
        assert!(pp
            .iter()
            .all(|(n, t)| *t == G::Q4_K || n.ends_with("norm.weight")));
        let o = Policy {
            output_ty: Some(G::Q8_0),
            ..Policy::new(OutType::Q4_K_M)
        };
        assert_eq!(ty(&plan_of(&o, &m, &ts), "output.weight"), G::Q8_0);
    }

    #[test]
    fn smollm2_widths_fall_back() {
        // SmolLM2-135M: 576 wide (not a multiple of 256), ffn 1536 (a multiple), tied.
        let m = ModelFacts {
            n_layer: 30,
            n_head: 9,
            n_head_kv: 3,
        };
        let ts = llama(30, true, 576, 1536);
        let p = plan_of(&Policy::new(OutType::Q4_K_M), &m, &ts);
        assert_eq!(ty(&p, "token_embd.weight"), G::Q8_0);
        assert_eq!(ty(&p, "blk.0.attn_q.weight"), G::Q5_0);
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), G::Q8_0);
        assert_eq!(ty(&p, "blk.0.ffn_down.weight"), G::Q6_K);
        assert_eq!(ty(&p, "blk.4.ffn_down.weight"), G::Q4_K);
        let p = plan_of(&Policy::new(OutType::Q5_K_S), &m, &ts);
        assert_eq!(ty(&p, "blk.0.attn_q.weight"), G::Q5_1);
        let p = plan_of(&Policy::new(OutType::Q2_K), &m, &ts);
        // n_gqa 3 < 4: attn_v Q3_K, then Q4_0 for the 576-wide rows.
        assert_eq!(ty(&p, "blk.0.attn_v.weight"), G::Q4_0);
        assert_eq!(ty(&p, "blk.0.ffn_down.weight"), G::Q3_K);
        // q4_0: the head is Q6_K where it fits, Q8_0 here.
        let p = plan_of(&Policy::new(OutType::Q4_0), &m, &ts);
        assert_eq!(ty(&p, "token_embd.weight"), G::Q8_0);
        assert_eq!(ty(&p, "blk.0.attn_q.weight"), G::Q4_0);
    }

    #[test]
    fn float_types_and_odd_rows() {
        let m = ModelFacts {
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
        };
        let ts = llama(2, true, 100, 96);
        for (ft, want) in [
            (OutType::F32, G::F32),
            (OutType::F16, G::F16),
            (OutType::BF16, G::BF16),
        ] {
            let p = plan_of(&Policy::new(ft), &m, &ts);
            assert!(p
                .iter()
                .all(|(n, t)| *t == want || n.ends_with("norm.weight")));
        }
        // 100-wide rows fit no block: F16; ffn_down (96 wide) fits Q8_0's 32.
        let p = plan_of(&Policy::new(OutType::Q8_0), &m, &ts);
        assert_eq!(ty(&p, "blk.0.attn_q.weight"), G::F16);
        assert_eq!(ty(&p, "token_embd.weight"), G::F16);
        assert_eq!(ty(&p, "blk.0.ffn_down.weight"), G::Q8_0);
        let p = plan_of(&Policy::new(OutType::Q6_K), &m, &ts);
        assert_eq!(ty(&p, "blk.0.ffn_down.weight"), G::Q8_0);
    }

    #[test]
    fn llama_70b_raises_attn_v() {
        let m = ModelFacts {
            n_layer: 80,
            n_head: 64,
            n_head_kv: 8,
        };
        let ts = llama(80, false, 512, 512);
        let p = plan_of(&Policy::new(OutType::Q3_K_M), &m, &ts);
        assert_eq!(ty(&p, "blk.40.attn_v.weight"), G::Q5_K);
        let p = plan_of(&Policy::new(OutType::Q4_K_S), &m, &ts);
        assert_eq!(ty(&p, "blk.40.attn_v.weight"), G::Q5_K);
        let p = plan_of(&Policy::new(OutType::Q2_K), &m, &ts);
        assert_eq!(ty(&p, "blk.40.attn_v.weight"), G::Q5_K);
        assert_eq!(ty(&p, "blk.40.ffn_down.weight"), G::Q3_K);
    }
}
