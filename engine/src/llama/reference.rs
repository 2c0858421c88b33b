//! The scalar reference forward pass: one token at a time, f32 everywhere, every weight row
//! dequantized and dotted in the plainest way. Slow on purpose: it is what the fast batched
//! path is tested against, and it should be checkable by eye. No rayon, no tiling, no reuse.

use super::{LlamaModel, ModelError, Weight};

/// Reference state: an f32 KV cache that grows by one position per token.
pub struct ReferenceState {
    /// keys[layer][pos] and values[layer][pos], each kv_dim long.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
}

impl ReferenceState {
    pub fn new(model: &LlamaModel) -> Self {
        let n = model.config.n_layers;
        ReferenceState {
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks

/// out (rows,) = W (rows, cols) @ x (cols,), dequantizing W one row at a time.
fn matvec(model: &LlamaModel, w: &Weight, x: &[f32]) -> Result<Vec<f32>, ModelError> {
    let view = w.view(&model.file);
    let rb = w.row_bytes();
    let mut row = vec![0.0f32; w.cols];
    let mut out = vec![0.0f32; w.rows];
    for (r, o) in out.iter_mut().enumerate() {
        airlock_kernels::dequantize_row(w.ty, &view.data[r * rb..(r + 1) * rb], &mut row)?;
        let mut sum = 0.0f64;
        for (a, b) in row.iter().zip(x) {
            sum += *a as f64 * *b as f64;
        }
        *o = sum as f32;
    }
    Ok(out)
}

fn rmsnorm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mean_sq = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (mean_sq + eps as f64).sqrt();
    x.iter()
        .zip(weight)
        .map(|(v, w)| (*v as f64 * scale) as f32 * w)
        .collect()
}

/// Rotate adjacent pairs of one head (llama.cpp's layout for the llama architecture).
fn rope(head: &mut [f32], pos: usize, model: &LlamaModel) {
    let c = &model.config;
    let factors = model.weights.rope_freqs.as_deref();
    for i in 0..c.rope_dim / 2 {
        let mut freq = (c.rope_base as f64).powf(-2.0 * i as f64 / c.rope_dim as f64);
        if let Some(f) = factors {
            freq /= f[i] as f64;
        }
        freq *= c.rope_freq_scale as f64;
        let angle = pos as f64 * freq;
        let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
        head[2 * i] = (a * angle.cos() - b * angle.sin()) as f32;
        head[2 * i + 1] = (a * angle.sin() + b * angle.cos()) as f32;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------------
// The forward pass

/// Run one token at position `state`'s length and return its logits (vocab,).
pub fn forward_token(
    model: &LlamaModel,
    state: &mut ReferenceState,
    token: u32,
) -> Result<Vec<f32>, ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let hd = c.head_dim;
    if token as usize >= c.vocab_size {
        return Err(ModelError::InvalidToken {
            id: token,
            vocab_size: c.vocab_size,
        });
    }
    let pos = state.keys[0].len();

    // x (embd,) = token_embd[token]
    let emb = w.token_embd.view(&model.file);
    let rb = w.token_embd.row_bytes();
    let mut x = vec![0.0f32; c.n_embd];
    let t = token as usize;
    airlock_kernels::dequantize_row(emb.ty, &emb.data[t * rb..(t + 1) * rb], &mut x)?;

    for (li, l) in w.layers.iter().enumerate() {
        // Attention block.
        let xn = rmsnorm(&x, &l.attn_norm, c.rms_eps);
        let mut q = matvec(model, &l.wq, &xn)?; // (n_head * hd,)
        let mut k = matvec(model, &l.wk, &xn)?; // (n_head_kv * hd,)
        let v = matvec(model, &l.wv, &xn)?; // (n_head_kv * hd,)
        for h in 0..c.n_head {
            rope(&mut q[h * hd..(h + 1) * hd], pos, model);
        }
        for h in 0..c.n_head_kv {
            rope(&mut k[h * hd..(h + 1) * hd], pos, model);
        }
        state.keys[li].push(k);
        state.values[li].push(v);

        let mut att_out = vec![0.0f32; c.n_head * hd];
        for h in 0..c.n_head {
            let kvh = h / (c.n_head / c.n_head_kv);
            let qh = &q[h * hd..(h + 1) * hd];
            // scores (pos+1,) = q . k_j / sqrt(hd)
            let mut scores: Vec<f64> = state.keys[li]
                .iter()
                .map(|kj| {
                    let kh = &kj[kvh * hd..(kvh + 1) * hd];
                    qh.iter()
                        .zip(kh)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            // out_h (hd,) = sum_j softmax_j * v_j
            for (j, vj) in state.values[li].iter().enumerate() {
                let p = scores[j] / sum;
                for d in 0..hd {
                    att_out[h * hd + d] += (p * vj[kvh * hd + d] as f64) as f32;
                }
            }
        }
        let o = matvec(model, &l.wo, &att_out)?;
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }

        // Feed-forward block: down(silu(gate(xn)) * up(xn)).
        let xn = rmsnorm(&x, &l.ffn_norm, c.rms_eps);
        let gate = matvec(model, &l.w_gate, &xn)?;
        let up = matvec(model, &l.w_up, &xn)?;
        let h: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        let down = matvec(model, &l.w_down, &h)?;
        for (a, b) in x.iter_mut().zip(&down) {
            *a += b;
        }
    }

    // logits (vocab,) = output (vocab, embd) @ rmsnorm(x)
    let xn = rmsnorm(&x, &w.output_norm, c.rms_eps);
    matvec(model, &w.output, &xn)
}
