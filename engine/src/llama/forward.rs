//! The batched forward pass: a whole prompt chunk goes through each matrix at once
//! (matrix x matrix), and the KV cache keeps what earlier chunks and turns computed.
//!
//! Per layer, for n tokens at positions pos..pos+n:
//!   xn = rmsnorm(x)                      x (n, embd)
//!   q, k, v = xn Wq, xn Wk, xn Wv        (n, q_dim), (n, kv_dim) x2
//!   rope(q, k); cache[pos..pos+n] = k, v
//!   att = softmax(q K^T / sqrt(hd)) V    causal, per head, GQA heads share K/V
//!   x += att Wo
//!   x += (silu(xn' Wgate) * xn' Wup) Wdown, xn' = rmsnorm(x)
//! then logits = rmsnorm(x) Wout for the positions asked for.

use airlock_kernels::attention::{attention, AttentionShape, KvRows};
use airlock_kernels::ops;
use half::f16;

use super::{LlamaModel, ModelError, Weight};

/// How matrices are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Activations quantized to 8 bits per block (Q8_0/Q8_1) and integer dot products, as ggml.
    Fast,
    /// Weight rows dequantized to f32 and f32 activations: the accuracy reference.
    Exact,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

impl KvType {
    pub fn bytes_per_value(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// Which positions of a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

enum KvStore {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvStore {
    fn new(ty: KvType, n: usize) -> Self {
        match ty {
            KvType::F16 => KvStore::F16(vec![f16::ZERO; n]),
            KvType::F32 => KvStore::F32(vec![0.0; n]),
        }
    }

    fn rows(&self, r: std::ops::Range<usize>) -> KvRows<'_> {
        match self {
            KvStore::F16(v) => KvRows::F16(&v[r]),
            KvStore::F32(v) => KvRows::F32(&v[r]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvStore::F16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }
}

/// One conversation's state: its KV cache, position, and the buffers the forward pass reuses.
pub struct Session {
    pub n_ctx: usize,
    pub precision: Precision,
    pos: usize,
    kv_type: KvType,
    /// [layer][pos][kv_dim]
    k: KvStore,
    v: KvStore,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    kb: Vec<f32>,
    vb: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    scratch: MatmulScratch,
}

/// Quantized activations of one matmul, for the file-layout or the packed kernels.
#[derive(Default)]
struct MatmulScratch {
    bytes: Vec<u8>,
    packed: airlock_kernels::PackedScratch,
}

/// `ys[i] = ws[i] x` for matrices that share an input (Q, K, V; gate, up): one activation
/// quantization and one parallel region when all have packed copies, else one [`matmul`] each.
fn matmuls<const N: usize>(
    precision: Precision,
    f: &crate::gguf::GgufFile,
    ws: [(&Weight, &mut [f32]); N],
    x: &[f32],
    n: usize,
    scratch: &mut MatmulScratch,
) -> Result<(), airlock_kernels::KernelError> {
    let all_packed = ws.iter().all(|(w, _)| w.packed.is_some());
    if precision == Precision::Fast && all_packed {
        let mut pairs = ws.map(|(w, y)| (w.packed.as_deref().expect("checked above"), y));
        return airlock_kernels::matmul_packed_multi(&mut pairs, x, n, &mut scratch.packed);
    }
    for (w, y) in ws {
        matmul(precision, f, w, x, n, y, scratch)?;
    }
    Ok(())
}

/// y = W x on the session's precision: the packed copy when there is one (fast path only).
fn matmul(
    precision: Precision,
    f: &crate::gguf::GgufFile,
    wt: &Weight,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    scratch: &mut MatmulScratch,
) -> Result<(), airlock_kernels::KernelError> {
    match (precision, &wt.packed) {
        (Precision::Fast, Some(p)) => {
            airlock_kernels::matmul_packed(p, x, n, y, &mut scratch.packed)
        }
        (Precision::Fast, None) => {
            airlock_kernels::matmul(&wt.view(f), x, n, y, &mut scratch.bytes)
        }
        (Precision::Exact, _) => airlock_kernels::matmul_exact(&wt.view(f), x, n, y),
    }
}

impl Session {
    pub fn new(model: &LlamaModel, n_ctx: usize, kv_type: KvType, precision: Precision) -> Self {
        let n = model.config.n_layers * n_ctx * model.config.kv_dim();
        Session {
            n_ctx,
            precision,
            pos: 0,
            kv_type,
            k: KvStore::new(kv_type, n),
            v: KvStore::new(kv_type, n),
            x: Vec::new(),
            xn: Vec::new(),
            q: Vec::new(),
            kb: Vec::new(),
            vb: Vec::new(),
            att: Vec::new(),
            tmp: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            logits: Vec::new(),
            rope_cos: Vec::new(),
            rope_sin: Vec::new(),
            scratch: MatmulScratch::default(),
        }
    }

    /// Tokens in the cache so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Forget everything (the cache contents are simply overwritten later).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Drop cached positions from `pos` on, e.g. to re-use a shared prompt prefix.
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Run `tokens` through the model at the current position and append them to the cache.
    /// Returns the logits of the last token (`Logits::Last`, vocab values) or of every token
    /// (`Logits::All`, tokens.len() x vocab, row-major).
    ///
    /// The pass runs on a thread of the rayon pool while the pool's other threads spin
    /// between its parallel regions instead of sleeping ([`with_spinning_pool`]).
    ///
    /// [`with_spinning_pool`]: airlock_kernels::pool::with_spinning_pool
    pub fn forward(
        &mut self,
        model: &LlamaModel,
        tokens: &[u32],
        which: Logits,
    ) -> Result<&[f32], ModelError> {
        airlock_kernels::pool::with_spinning_pool(|| self.forward_in_pool(model, tokens, which))?;
        Ok(&self.logits)
    }

    fn forward_in_pool(
        &mut self,
        model: &LlamaModel,
        tokens: &[u32],
        which: Logits,
    ) -> Result<(), ModelError> {
        let c = &model.config;
        let w = &model.weights;
        let f = &*model.file;
        let n = tokens.len();
        if n == 0 {
            self.logits.clear();
            return Ok(());
        }
        let needed = self.pos + n;
        if needed > self.n_ctx {
            return Err(ModelError::ContextFull {
                needed,
                n_ctx: self.n_ctx,
            });
        }
        let (e, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        resize(&mut self.x, n * e);
        resize(&mut self.xn, n * e);
        resize(&mut self.q, n * qd);
        resize(&mut self.kb, n * kvd);
        resize(&mut self.vb, n * kvd);
        resize(&mut self.att, n * qd);
        resize(&mut self.tmp, n * e);
        resize(&mut self.gate, n * ff);
        resize(&mut self.up, n * ff);

        // Embedding lookup: dequantize one row per token.
        let emb = w.token_embd.view(f);
        let rb = w.token_embd.row_bytes();
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= c.vocab_size {
                return Err(ModelError::InvalidToken {
                    id,
                    vocab_size: c.vocab_size,
                });
            }
            let row = &emb.data[id as usize * rb..(id as usize + 1) * rb];
            airlock_kernels::dequantize_row(emb.ty, row, &mut self.x[t * e..(t + 1) * e])?;
        }

        let precision = self.precision;
        let mm = |wt: &Weight, x: &[f32], y: &mut [f32], scratch: &mut MatmulScratch| {
            matmul(precision, f, wt, x, n, y, scratch)
        };

        // RoPE angles depend only on the position: once per token, shared by heads and layers.
        let half = model.rope_inv_freq.len();
        resize(&mut self.rope_cos, n * half);
        resize(&mut self.rope_sin, n * half);
        for t in 0..n {
            ops::rope_angles(
                self.pos + t,
                &model.rope_inv_freq,
                &mut self.rope_cos[t * half..(t + 1) * half],
                &mut self.rope_sin[t * half..(t + 1) * half],
            );
        }

        let layer_stride = self.n_ctx * kvd;
        for (li, l) in w.layers.iter().enumerate() {
            norm_rows(&self.x, &l.attn_norm, c.rms_eps, &mut self.xn, e);
            matmuls(
                precision,
                f,
                [
                    (&l.wq, &mut self.q[..]),
                    (&l.wk, &mut self.kb[..]),
                    (&l.wv, &mut self.vb[..]),
                ],
                &self.xn,
                n,
                &mut self.scratch,
            )?;
            for t in 0..n {
                let p = self.pos + t;
                let (cos, sin) = (
                    &self.rope_cos[t * half..][..half],
                    &self.rope_sin[t * half..][..half],
                );
                for h in self.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                    ops::rope_rotate(h, cos, sin);
                }
                for h in self.kb[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                    ops::rope_rotate(h, cos, sin);
                }
                let at = li * layer_stride + p * kvd;
                self.k.write(at, &self.kb[t * kvd..(t + 1) * kvd]);
                self.v.write(at, &self.vb[t * kvd..(t + 1) * kvd]);
            }
            let layer = li * layer_stride..(li + 1) * layer_stride;
            let shape = AttentionShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                pos0: self.pos,
            };
            attention(
                shape,
                &self.q,
                self.k.rows(layer.clone()),
                self.v.rows(layer),
                &mut self.att,
            );
            mm(&l.wo, &self.att, &mut self.tmp, &mut self.scratch)?;
            ops::add_assign(&mut self.x, &self.tmp);

            norm_rows(&self.x, &l.ffn_norm, c.rms_eps, &mut self.xn, e);
            matmuls(
                precision,
                f,
                [(&l.w_gate, &mut self.gate[..]), (&l.w_up, &mut self.up[..])],
                &self.xn,
                n,
                &mut self.scratch,
            )?;
            ops::swiglu(&mut self.gate, &self.up);
            mm(&l.w_down, &self.gate, &mut self.tmp, &mut self.scratch)?;
            ops::add_assign(&mut self.x, &self.tmp);
        }
        self.pos += n;

        // Only the rows whose logits are wanted go through the (large) output matrix.
        let (rows, first) = match which {
            Logits::All => (n, 0),
            Logits::Last => (1, n - 1),
        };
        let x = &self.x[first * e..];
        norm_rows(x, &w.output_norm, c.rms_eps, &mut self.xn[..rows * e], e);
        resize(&mut self.logits, rows * c.vocab_size);
        matmul(
            precision,
            f,
            &w.output,
            &self.xn[..rows * e],
            rows,
            &mut self.logits,
            &mut self.scratch,
        )?;
        Ok(())
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], e: usize) {
    // A prompt batch's rows in parallel (each row's result is the same either way).
    if x.len() >= 16 * e {
        use rayon::prelude::*;
        x.par_chunks_exact(e)
            .zip(out.par_chunks_exact_mut(e))
            .for_each(|(xr, or)| ops::rms_norm(xr, w, eps, or));
        return;
    }
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        ops::rms_norm(xr, w, eps, or);
    }
}
