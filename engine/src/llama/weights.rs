//! Where the weights live: every matrix is a (type, shape, byte range) into the GGUF map, checked
//! once against the config. Nothing is dequantized or copied at load except the 1-D norm vectors
//! (a few KB), which are decoded to f32 once. [`LlamaWeights::repack`] can then copy the
//! matrices the packed kernels read into their interleaved layout (anonymous memory); the map
//! stays the source of truth for the exact path and the embedding lookup.

use std::sync::Arc;

use airlock_kernels::packed::{can_pack, PackedKernels};
use airlock_kernels::{GgmlType, PackedWeights, WeightView};

use crate::gguf::{GgufFile, TensorInfo};

use super::{LlamaConfig, ModelError};

/// A 2-D weight matrix in the file: `rows` outputs of `cols` inputs each (ggml ne = [cols, rows]).
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    start: usize,
    len: usize,
    /// The same matrix in the packed layout, when [`LlamaWeights::repack`] made one.
    pub packed: Option<Arc<PackedWeights>>,
}

impl Weight {
    pub fn view<'a>(&self, file: &'a GgufFile) -> WeightView<'a> {
        let data = file
            .bytes()
            .get(self.start..self.start + self.len)
            .unwrap_or(&[]);
        WeightView {
            ty: self.ty,
            data,
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.len / self.rows.max(1)
    }

    pub fn n_bytes(&self) -> usize {
        self.len
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Weight,
    pub w_up: Weight,
    pub w_down: Weight,
}

#[derive(Clone, Debug)]
pub struct LlamaWeights {
    pub token_embd: Weight,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// `output.weight`, or the tied `token_embd.weight` when the file has none.
    pub output: Weight,
    pub output_tied: bool,
    /// Llama 3.1 rope scaling: one divisor per rotated pair (`rope_freqs.weight`).
    pub rope_freqs: Option<Vec<f32>>,
}

impl LlamaWeights {
    pub fn from_gguf(f: &GgufFile, c: &LlamaConfig) -> Result<Self, ModelError> {
        // Every matrix of a type airlock cannot compute, named in one error, before anything else.
        let unsupported: Vec<(String, &'static str)> = matrix_names(c.n_layers)
            .filter_map(|n| f.tensor(&n).map(|t| (n, t.ty)))
            .filter(|(_, ty)| !ty.can_compute())
            .map(|(n, ty)| (n, ty.name()))
            .collect();
        if !unsupported.is_empty() {
            return Err(ModelError::UnsupportedTensorTypes(unsupported));
        }
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Weight, ModelError> {
            let t = f
                .tensor(name)
                .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
            expect_shape(t, &[cols as u64, rows as u64])?;
            Ok(Weight {
                name: name.into(),
                ty: t.ty,
                rows,
                cols,
                start: (f.data_offset + t.offset) as usize,
                len: t.n_bytes as usize,
                packed: None,
            })
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>, ModelError> {
            let t = f
                .tensor(name)
                .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
            expect_shape(t, &[n as u64])?;
            decode_f32_vector(f, t)
        };

        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let token_embd = matrix("token_embd.weight", c.vocab_size, e)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(&n("attn_norm"), e)?,
                wq: matrix(&n("attn_q"), q, e)?,
                wk: matrix(&n("attn_k"), kv, e)?,
                wv: matrix(&n("attn_v"), kv, e)?,
                wo: matrix(&n("attn_output"), e, q)?,
                ffn_norm: vector(&n("ffn_norm"), e)?,
                w_gate: matrix(&n("ffn_gate"), ff, e)?,
                w_up: matrix(&n("ffn_up"), ff, e)?,
                w_down: matrix(&n("ffn_down"), e, ff)?,
            });
        }
        let output_norm = vector("output_norm.weight", e)?;
        let (output, output_tied) = match f.tensor("output.weight") {
            Some(_) => (matrix("output.weight", c.vocab_size, e)?, false),
            None => (token_embd.clone(), true),
        };
        let rope_freqs = match f.tensor("rope_freqs.weight") {
            None => None,
            Some(_) => {
                let v = vector("rope_freqs.weight", c.rope_dim / 2)?;
                if let Some(bad) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                    return Err(ModelError::BadTensor {
                        tensor: "rope_freqs.weight".into(),
                        reason: format!("factor {bad} is not positive and finite"),
                    });
                }
                Some(v)
            }
        };
        check_no_other_tensors(f, c.n_layers)?;
        Ok(LlamaWeights {
            token_embd,
            layers,
            output_norm,
            output,
            output_tied,
            rope_freqs,
        })
    }

    /// [`Self::matrices`], mutably.
    fn matrices_mut(&mut self) -> impl Iterator<Item = &mut Weight> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.w_gate,
                    &mut l.w_up,
                    &mut l.w_down,
                ]
            })
            .chain(std::iter::once(&mut self.output))
    }

    /// The matrices the forward pass multiplies by: every layer's seven, then the output.
    fn matrices(&self) -> impl Iterator<Item = &Weight> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
            .chain(std::iter::once(&self.output))
    }

    /// Bytes of packed copies held now.
    pub fn packed_bytes(&self) -> u64 {
        self.matrices()
            .filter_map(|w| w.packed.as_ref())
            .map(|p| p.n_bytes() as u64)
            .sum()
    }

    /// Copies every matrix of a type the packed kernels take (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1,
    /// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) into the packed layout of `kernels`; returns the bytes allocated. The forward pass then reads the packed copies on the fast path.
    pub fn repack(
        &mut self,
        f: &crate::gguf::GgufFile,
        kernels: &'static PackedKernels,
    ) -> Result<u64, ModelError> {
        let mut bytes = 0u64;
        for w in self.matrices_mut() {
            if !can_pack(w.ty) || w.packed.is_some() {
                continue;
            }
            let p =
                PackedWeights::pack(&w.view(f), kernels).map_err(|e| ModelError::BadTensor {
                    tensor: w.name.clone(),
                    reason: e.to_string(),
                })?;
            bytes += p.n_bytes() as u64;
            w.packed = Some(Arc::new(p));
            // The packed copy replaces the file pages, so they need not stay in this process's
            // resident set (released one tensor at a time, which keeps the peak near the
            // model's size); the embedding lookup still reads a tied output head's.
            if w.name != "token_embd.weight" {
                f.release(w.start, w.len);
            }
        }
        Ok(bytes)
    }

    /// Bytes of weights read to produce one token (every matrix once, the embedding row aside).
    pub fn bytes_per_token(&self) -> usize {
        self.matrices().map(|w| w.n_bytes()).sum()
    }
}

/// The names of the matrices a Llama model multiplies by (and the embedding), in file order.
fn matrix_names(n_layers: usize) -> impl Iterator<Item = String> {
    const LAYER: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    std::iter::once("token_embd.weight".to_string())
        .chain((0..n_layers).flat_map(|i| LAYER.iter().map(move |m| format!("blk.{i}.{m}.weight"))))
        .chain(std::iter::once("output.weight".to_string()))
}

/// Tensors the Llama forward pass reads in layer `blk.N` (the `N` stripped).
const LAYER_TENSORS: [&str; 9] = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// Refuses any tensor the forward pass would not read: llama.cpp's llama architecture uses
/// optional ones (attention and FFN biases, expert weights), so ignoring one would change the
/// output without a word.
fn check_no_other_tensors(f: &GgufFile, n_layers: usize) -> Result<(), ModelError> {
    for t in f.tensors() {
        let known = match t.name.as_str() {
            "token_embd.weight" | "output_norm.weight" | "output.weight" | "rope_freqs.weight" => {
                true
            }
            name => name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(i, part)| {
                    i.parse::<usize>().is_ok_and(|i| i < n_layers) && LAYER_TENSORS.contains(&part)
                }),
        };
        if !known {
            return Err(ModelError::BadTensor {
                tensor: t.name.clone(),
                reason: "is not one airlock's Llama reads (llama.cpp would use it: a bias, \
                         experts or another architecture's weights); running without it would \
                         give wrong output"
                    .into(),
            });
        }
    }
    Ok(())
}

fn expect_shape(t: &TensorInfo, want: &[u64]) -> Result<(), ModelError> {
    if t.dims != want {
        return Err(ModelError::BadTensor {
            tensor: t.name.clone(),
            reason: format!(
                "shape {:?} disagrees with the hyperparameters, which imply {want:?}",
                t.dims
            ),
        });
    }
    Ok(())
}

fn decode_f32_vector(f: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, ModelError> {
    let mut out = vec![0.0f32; t.n_elements as usize];
    airlock_kernels::dequantize_row(t.ty, f.tensor_data(t), &mut out).map_err(|e| {
        ModelError::BadTensor {
            tensor: t.name.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok(out)
}
