//! The batched forward pass over many sequences at once.
//!
//! A batch is a list of sequences, each with its own [`KvCache`] and the tokens it brings this
//! step: one when decoding, many for a prompt chunk. Their rows are stacked into one activation
//! matrix, so the embedding, the norms, every matmul and SwiGLU run once for the whole batch and
//! each weight is read from memory once per step, not once per sequence. Only RoPE, the KV write
//! and attention go sequence by sequence, each reading its own cache in place.
//!
//! Per layer, for N = n_1 + ... + n_S stacked rows (sequence s at positions pos_s..pos_s + n_s):
//!   xn = rmsnorm(x)                      x (N, embd)
//!   q, k, v = xn Wq, xn Wk, xn Wv        (N, q_dim), (N, kv_dim) x2
//!   per sequence s:
//!     rope(q_s, k_s); cache_s[pos_s..pos_s + n_s] = k_s, v_s
//!     att_s = softmax(q_s K_s^T / sqrt(hd)) V_s    causal, GQA heads share K/V
//!   (every sequence's attention tasks share one parallel region)
//!   x += att Wo                          att (N, q_dim)
//!   x += (silu(xn' Wgate) * xn' Wup) Wdown, xn' = rmsnorm(x)
//! then logits = rmsnorm(x) Wout for the rows each sequence asked for.
//!
//! Batch invariance: every kernel keeps one float accumulation order per (row, token) whatever
//! the other rows are, the tile, the chunk or the thread count, so a sequence's logits are
//! bit-identical alone or in any batch, and whatever the prompt's chunking.

use airlock_kernels::attention::{
    attention, attention_batch, AttentionJob, AttentionShape, KvLayer, KvStore,
};
use airlock_kernels::ops;

use super::{LlamaModel, ModelError, Weight};

/// How matrices are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Activations quantized to 8 bits per block (Q8_0/Q8_1) and integer dot products, as ggml.
    Fast,
    /// Weight rows dequantized to f32 and f32 activations: the accuracy reference.
    Exact,
}

/// The KV cache's element type (`--kv-type`): f32, f16 or Q8_0, as llama.cpp's `-ctk/-ctv`.
pub use airlock_kernels::attention::KvType;

/// Which of a sequence's tokens in a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None: a prompt chunk that is not the prompt's end.
    None,
    /// The last token's (prompt end, decoding).
    Last,
    /// Every token's (teacher forcing).
    All,
    /// The last n tokens' (perplexity scores only the second half of a chunk).
    Tail(usize),
}

impl Logits {
    /// The first of the rows wanted out of `n` tokens; rows first..n are returned.
    fn first_row(self, n: usize) -> usize {
        match self {
            Logits::None => n,
            Logits::Last => n.saturating_sub(1),
            Logits::All => 0,
            Logits::Tail(k) => n.saturating_sub(k),
        }
    }

    /// How many logit rows a sequence bringing `n` tokens gets back.
    pub fn rows(self, n: usize) -> usize {
        n - self.first_row(n)
    }
}

/// One sequence's KV cache: the keys and values of every layer at positions 0..pos, laid out
/// per layer and KV head as attention reads them ([`KvStore`]).
pub struct KvCache {
    n_ctx: usize,
    pos: usize,
    n_layers: usize,
    kv_dim: usize,
    store: KvStore,
}

impl KvCache {
    /// A cache of `n_ctx` positions for `model`, allocated (zeroed) now.
    ///
    /// # Panics
    /// When `kv_type` cannot hold the model's heads ([`KvType::fits_head_dim`]: Q8_0 needs a
    /// head size that is a multiple of 32); [`crate::load::load`] refuses such a pair first.
    pub fn new(model: &LlamaModel, n_ctx: usize, kv_type: KvType) -> Self {
        let c = &model.config;
        KvCache {
            n_ctx,
            pos: 0,
            n_layers: c.n_layers,
            kv_dim: c.kv_dim(),
            store: KvStore::new(kv_type, c.n_layers, c.n_head_kv, c.head_dim, n_ctx),
        }
    }

    /// Tokens in the cache.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Positions the cache holds.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kv_type(&self) -> KvType {
        self.store.ty()
    }

    /// Bytes the cache holds allocated.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Forget everything (the contents are simply overwritten later).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Drop cached positions from `pos` on, e.g. to keep a shared prompt prefix.
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Make this cache hold `src`'s first `n` positions and nothing after: a prompt prefix
    /// computed once, then continued in several caches (one per multiple-choice option).
    /// Between caches of one KV type the copy is exact, so a continuation's logits are those of
    /// running the whole sequence in one cache.
    pub fn copy_prefix_from(&mut self, src: &KvCache, n: usize) -> Result<(), ModelError> {
        if src.store.shape() != self.store.shape() {
            return Err(ModelError::CacheMismatch {
                cache_layers: src.n_layers,
                cache_kv_dim: src.kv_dim,
                n_layers: self.n_layers,
                kv_dim: self.kv_dim,
            });
        }
        if n > src.pos || n > self.n_ctx {
            return Err(ModelError::ContextFull {
                needed: n,
                n_ctx: src.pos.min(self.n_ctx),
            });
        }
        self.store.copy_prefix_from(&src.store, n);
        self.pos = n;
        Ok(())
    }

    /// Store token `p`'s keys and values of layer `li`.
    fn write(&mut self, li: usize, p: usize, k: &[f32], v: &[f32]) {
        self.store.write(li, p, k, v);
    }

    /// Layer `li`'s keys and values.
    fn layer(&self, li: usize) -> KvLayer<'_> {
        self.store.layer(li)
    }
}

/// One sequence's part of a batch: its cache, the tokens it brings (appended to the cache at
/// its current position), and which of their logits it wants.
pub struct BatchSeq<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// The buffers a forward pass reuses from step to step, for whatever batch comes: one per
/// thread that runs passes, not one per sequence. Grown to the largest batch seen.
#[derive(Default)]
pub struct Workspace {
    /// (N, embd): the residual stream of every stacked row
    x: Vec<f32>,
    /// (N, embd): normed rows
    xn: Vec<f32>,
    /// (N, q_dim)
    q: Vec<f32>,
    /// (N, kv_dim) x2: this step's keys and values before they go to the caches
    kb: Vec<f32>,
    vb: Vec<f32>,
    /// (N, q_dim): attention output
    att: Vec<f32>,
    /// (N, embd): a matmul's output before it is added to x
    tmp: Vec<f32>,
    /// (N, n_ff) x2
    gate: Vec<f32>,
    up: Vec<f32>,
    /// (N, rope_dim / 2) x2: each row's RoPE angles (they depend on its position only)
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// (rows wanted, vocab)
    logits: Vec<f32>,
    /// Indices into x of the rows whose logits are wanted, in batch order.
    out_rows: Vec<usize>,
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

/// y = W x on the pass's precision: the packed copy when there is one (fast path only).
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

/// Run every sequence's tokens through the model in one pass and append them to its cache.
/// Returns the logits wanted, (rows, vocab) row-major: each sequence's rows in batch order
/// ([`Logits::rows`] of them), each sequence's in token order.
///
/// Nothing is written when an argument is refused (a full context, a token outside the
/// vocabulary, a cache of another model). The pass runs on a thread of the rayon pool while
/// the pool's other threads spin between its parallel regions instead of sleeping
/// ([`with_spinning_pool`]).
///
/// [`with_spinning_pool`]: airlock_kernels::pool::with_spinning_pool
pub fn forward_batch<'w>(
    model: &LlamaModel,
    precision: Precision,
    ws: &'w mut Workspace,
    seqs: &mut [BatchSeq],
) -> Result<&'w [f32], ModelError> {
    check_batch(model, seqs)?;
    airlock_kernels::pool::with_spinning_pool(|| ws.forward(model, precision, seqs))?;
    Ok(&ws.logits)
}

/// Refuse a batch that does not fit before anything is computed or written.
fn check_batch(model: &LlamaModel, seqs: &[BatchSeq]) -> Result<(), ModelError> {
    let c = &model.config;
    for s in seqs {
        if s.cache.n_layers != c.n_layers || s.cache.kv_dim != c.kv_dim() {
            return Err(ModelError::CacheMismatch {
                cache_layers: s.cache.n_layers,
                cache_kv_dim: s.cache.kv_dim,
                n_layers: c.n_layers,
                kv_dim: c.kv_dim(),
            });
        }
        let needed = s.cache.pos + s.tokens.len();
        if needed > s.cache.n_ctx {
            return Err(ModelError::ContextFull {
                needed,
                n_ctx: s.cache.n_ctx,
            });
        }
        if let Some(&id) = s.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::InvalidToken {
                id,
                vocab_size: c.vocab_size,
            });
        }
    }
    Ok(())
}

impl Workspace {
    fn forward(
        &mut self,
        model: &LlamaModel,
        precision: Precision,
        seqs: &mut [BatchSeq],
    ) -> Result<(), ModelError> {
        let c = &model.config;
        let w = &model.weights;
        let f = &*model.file;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        self.out_rows.clear();
        self.logits.clear();
        if n == 0 {
            return Ok(());
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

        // Embedding lookup, one row per token (ids were checked), and each row's RoPE angles.
        let emb = w.token_embd.view(f);
        let rb = w.token_embd.row_bytes();
        let half = model.rope_inv_freq.len();
        resize(&mut self.rope_cos, n * half);
        resize(&mut self.rope_sin, n * half);
        let mut r = 0;
        for s in seqs.iter() {
            for (t, &id) in s.tokens.iter().enumerate() {
                let row = &emb.data[id as usize * rb..(id as usize + 1) * rb];
                airlock_kernels::dequantize_row(emb.ty, row, &mut self.x[r * e..(r + 1) * e])?;
                ops::rope_angles(
                    s.cache.pos + t,
                    &model.rope_inv_freq,
                    &mut self.rope_cos[r * half..(r + 1) * half],
                    &mut self.rope_sin[r * half..(r + 1) * half],
                );
                r += 1;
            }
        }

        let mm = |wt: &Weight, x: &[f32], y: &mut [f32], scratch: &mut MatmulScratch| {
            matmul(precision, f, wt, x, n, y, scratch)
        };
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
            // Sequence by sequence: RoPE and the cache write.
            let mut r0 = 0;
            for s in seqs.iter_mut() {
                for t in 0..s.tokens.len() {
                    let r = r0 + t;
                    let (cos, sin) = (
                        &self.rope_cos[r * half..][..half],
                        &self.rope_sin[r * half..][..half],
                    );
                    for h in self.q[r * qd..(r + 1) * qd].chunks_exact_mut(hd) {
                        ops::rope_rotate(h, cos, sin);
                    }
                    for h in self.kb[r * kvd..(r + 1) * kvd].chunks_exact_mut(hd) {
                        ops::rope_rotate(h, cos, sin);
                    }
                    let (k, v) = (&self.kb[r * kvd..][..kvd], &self.vb[r * kvd..][..kvd]);
                    s.cache.write(li, s.cache.pos + t, k, v);
                }
                r0 += s.tokens.len();
            }
            // Attention, each sequence over its own cache, all in one parallel region.
            let shape = |pos0| AttentionShape {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim: hd,
                pos0,
            };
            if let [s] = &seqs[..] {
                // One sequence: no job list, so a decode step allocates nothing.
                attention(
                    shape(s.cache.pos),
                    &self.q,
                    s.cache.layer(li),
                    &mut self.att,
                );
            } else {
                let mut jobs = Vec::with_capacity(seqs.len());
                let (mut q, mut att) = (&self.q[..], &mut self.att[..]);
                for s in seqs.iter() {
                    let rows = s.tokens.len() * qd;
                    let (qs, q_rest) = q.split_at(rows);
                    let (out, att_rest) = std::mem::take(&mut att).split_at_mut(rows);
                    jobs.push(AttentionJob {
                        shape: shape(s.cache.pos),
                        q: qs,
                        kv: s.cache.layer(li),
                        out,
                    });
                    (q, att) = (q_rest, att_rest);
                }
                attention_batch(&mut jobs);
            }
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

        // Only the rows whose logits are wanted go through the (large) output matrix.
        let mut r0 = 0;
        for s in seqs.iter_mut() {
            let nt = s.tokens.len();
            self.out_rows.extend(r0 + s.logits.first_row(nt)..r0 + nt);
            s.cache.pos += nt;
            r0 += nt;
        }
        let rows = self.out_rows.len();
        if rows == 0 {
            return Ok(());
        }
        for (i, &r) in self.out_rows.iter().enumerate() {
            ops::rms_norm(
                &self.x[r * e..(r + 1) * e],
                &w.output_norm,
                c.rms_eps,
                &mut self.xn[i * e..(i + 1) * e],
            );
        }
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

/// One conversation: its KV cache and a workspace, for front ends that run one sequence
/// (`run`, `chat`, `bench`). [`forward_batch`] with a batch of one.
pub struct Session {
    pub n_ctx: usize,
    pub precision: Precision,
    cache: KvCache,
    ws: Workspace,
}

impl Session {
    pub fn new(model: &LlamaModel, n_ctx: usize, kv_type: KvType, precision: Precision) -> Self {
        Session {
            n_ctx,
            precision,
            cache: KvCache::new(model, n_ctx, kv_type),
            ws: Workspace::default(),
        }
    }

    /// Tokens in the cache so far.
    pub fn pos(&self) -> usize {
        self.cache.pos()
    }

    pub fn kv_type(&self) -> KvType {
        self.cache.kv_type()
    }

    /// Forget everything (the cache contents are simply overwritten later).
    pub fn reset(&mut self) {
        self.cache.reset();
    }

    /// Drop cached positions from `pos` on, e.g. to re-use a shared prompt prefix.
    pub fn truncate(&mut self, pos: usize) {
        self.cache.truncate(pos);
    }

    /// Run `tokens` through the model at the current position and append them to the cache.
    /// Returns the logits [`Logits`] asks for: (rows, vocab) row-major.
    pub fn forward(
        &mut self,
        model: &LlamaModel,
        tokens: &[u32],
        which: Logits,
    ) -> Result<&[f32], ModelError> {
        let mut batch = [BatchSeq {
            cache: &mut self.cache,
            tokens,
            logits: which,
        }];
        forward_batch(model, self.precision, &mut self.ws, &mut batch)
    }
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], e: usize) {
    // A prompt batch's rows in parallel (each row's result is the same either way).
    if x.len() >= 16 * e {
        let rows = (x.len() / e).min(out.len() / e);
        let out = &mut out[..rows * e];
        airlock_kernels::pool::for_each_chunk_mut(out, e, |i, or| {
            ops::rms_norm(&x[i * e..][..e], w, eps, or)
        });
        return;
    }
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        ops::rms_norm(xr, w, eps, or);
    }
}
