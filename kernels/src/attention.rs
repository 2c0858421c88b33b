//! Causal attention over a KV cache, blocked like flash attention: keys are visited in blocks,
//! with an online softmax (running max and sum, the accumulator rescaled once per block), so no
//! row of n scores is ever stored and memory does not grow with the context.
//!
//! Work is split over (token, query head) pairs; grouped-query heads read the same K/V rows.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Keys per block of the online softmax.
const BLOCK: usize = 32;
/// Largest head size supported (Llama models use 64 or 128).
pub const MAX_HEAD_DIM: usize = 256;

/// One layer's keys or values: `n_ctx` rows of `n_head_kv * head_dim`, in f16 or f32.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvRows<'_> {
    /// Copy one row as f32 into `dst`.
    fn to_f32(self, at: usize, dst: &mut [f32]) {
        match self {
            KvRows::F16(v) => v[at..at + dst.len()].convert_to_f32_slice(dst),
            KvRows::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
        }
    }

    /// `acc += p * row`.
    fn axpy(&self, at: usize, p: f32, acc: &mut [f32], tmp: &mut [f32]) {
        let row: &[f32] = match self {
            KvRows::F16(v) => {
                v[at..at + acc.len()].convert_to_f32_slice(tmp);
                tmp
            }
            KvRows::F32(v) => &v[at..at + acc.len()],
        };
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += p * x;
        }
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Position of the first query token; token t attends to keys 0..=pos0 + t.
    pub pos0: usize,
}

/// `out[t][h] = softmax(q[t][h] . K[0..=pos0+t]^T / sqrt(hd)) V[...]` for every token t and
/// query head h. `q` and `out` are n_tokens x n_head x head_dim; `k`, `v` hold at least
/// pos0 + n_tokens rows of n_head_kv x head_dim.
pub fn attention(s: AttentionShape, q: &[f32], k: KvRows, v: KvRows, out: &mut [f32]) {
    let hd = s.head_dim;
    assert!(hd <= MAX_HEAD_DIM && s.n_head.is_multiple_of(s.n_head_kv));
    if out.len() > s.n_head * hd {
        return attention_batch(s, q, k, v, out);
    }
    let kvd = s.n_head_kv * hd;
    let group = s.n_head / s.n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / s.n_head, i % s.n_head);
        let qh = &q[i * hd..(i + 1) * hd];
        let kv_off = (h / group) * hd;
        let n_keys = s.pos0 + t + 1;
        let mut acc_buf = [0.0f32; MAX_HEAD_DIM];
        let mut tmp_buf = [0.0f32; MAX_HEAD_DIM];
        let acc = &mut acc_buf[..hd];
        let tmp = &mut tmp_buf[..hd];
        let mut scores = [0.0f32; BLOCK];
        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
        for start in (0..n_keys).step_by(BLOCK) {
            let end = (start + BLOCK).min(n_keys);
            let sc = &mut scores[..end - start];
            let mut block_max = f32::NEG_INFINITY;
            for (j, sj) in sc.iter_mut().enumerate() {
                // Same arithmetic as the batch path (f32 row, 8-lane dot), so a prompt gives the
                // same numbers whether it is fed whole or token by token.
                k.to_f32((start + j) * kvd + kv_off, tmp);
                *sj = dot8(qh, tmp) * scale;
                block_max = block_max.max(*sj);
            }
            let m_new = m.max(block_max);
            if m_new == f32::NEG_INFINITY {
                continue;
            }
            // Rescale what was accumulated under the old maximum (exp(-inf) = 0 the first time).
            let corr = (m - m_new).exp();
            if corr != 1.0 {
                l *= corr;
                for a in acc.iter_mut() {
                    *a *= corr;
                }
            }
            for (j, &sj) in sc.iter().enumerate() {
                let p = (sj - m_new).exp();
                l += p;
                v.axpy((start + j) * kvd + kv_off, p, acc, tmp);
            }
            m = m_new;
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for (o, a) in o.iter_mut().zip(acc.iter()) {
            *o = a * inv;
        }
    });
}

/// Query state (running max, running sum, accumulator) that one batch task keeps on the stack.
const BATCH_STATE: usize = 8192;

/// Prompt processing: one task per chunk of query tokens, walking each KV head's keys in blocks
/// that are converted to f32 once and then used by every query of the chunk that shares that KV
/// head (all its tokens times the GQA group), instead of once per (token, head).
fn attention_batch(s: AttentionShape, q: &[f32], k: KvRows, v: KvRows, out: &mut [f32]) {
    let hd = s.head_dim;
    let kvd = s.n_head_kv * hd;
    let group = s.n_head / s.n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let chunk_tokens = (BATCH_STATE / (group * hd)).clamp(1, 32);
    let row = s.n_head * hd;
    out.par_chunks_mut(chunk_tokens * row)
        .enumerate()
        .for_each(|(c, out_chunk)| {
            let t0 = c * chunk_tokens;
            let n_t = out_chunk.len() / row;
            let n_q = n_t * group;
            let mut acc_buf = [0.0f32; BATCH_STATE];
            let mut m_buf = [f32::NEG_INFINITY; BATCH_STATE / 2];
            let mut l_buf = [0.0f32; BATCH_STATE / 2];
            let mut kb = [0.0f32; BLOCK * MAX_HEAD_DIM];
            let mut vb = [0.0f32; BLOCK * MAX_HEAD_DIM];
            let mut sc = [0.0f32; BLOCK];
            for h_kv in 0..s.n_head_kv {
                let acc = &mut acc_buf[..n_q * hd];
                acc.fill(0.0);
                let (m, l) = (&mut m_buf[..n_q], &mut l_buf[..n_q]);
                m.fill(f32::NEG_INFINITY);
                l.fill(0.0);
                // The last token of the chunk sees the most keys.
                let n_keys = s.pos0 + t0 + n_t;
                for start in (0..n_keys).step_by(BLOCK) {
                    let nb = (n_keys - start).min(BLOCK);
                    for j in 0..nb {
                        let at = (start + j) * kvd + h_kv * hd;
                        k.to_f32(at, &mut kb[j * hd..(j + 1) * hd]);
                        v.to_f32(at, &mut vb[j * hd..(j + 1) * hd]);
                    }
                    for qi in 0..n_q {
                        let (t, g) = (qi / group, qi % group);
                        // Causal: token t0 + t sees keys 0..=pos0 + t0 + t.
                        let visible = (s.pos0 + t0 + t + 1).saturating_sub(start).min(nb);
                        if visible == 0 {
                            continue;
                        }
                        let h = h_kv * group + g;
                        let qh = &q[((t0 + t) * s.n_head + h) * hd..][..hd];
                        let mut block_max = f32::NEG_INFINITY;
                        for (j, sj) in sc[..visible].iter_mut().enumerate() {
                            *sj = dot8(qh, &kb[j * hd..(j + 1) * hd]) * scale;
                            block_max = block_max.max(*sj);
                        }
                        let m_new = m[qi].max(block_max);
                        if m_new == f32::NEG_INFINITY {
                            continue;
                        }
                        let a = &mut acc[qi * hd..(qi + 1) * hd];
                        let corr = (m[qi] - m_new).exp();
                        if corr != 1.0 {
                            l[qi] *= corr;
                            for x in a.iter_mut() {
                                *x *= corr;
                            }
                        }
                        for (j, &sj) in sc[..visible].iter().enumerate() {
                            let p = (sj - m_new).exp();
                            l[qi] += p;
                            for (x, &vv) in a.iter_mut().zip(&vb[j * hd..(j + 1) * hd]) {
                                *x += p * vv;
                            }
                        }
                        m[qi] = m_new;
                    }
                }
                for qi in 0..n_q {
                    let (t, g) = (qi / group, qi % group);
                    let h = h_kv * group + g;
                    let inv = if l[qi] > 0.0 { 1.0 / l[qi] } else { 0.0 };
                    let o = &mut out_chunk[t * row + h * hd..][..hd];
                    for (o, &x) in o.iter_mut().zip(&acc[qi * hd..(qi + 1) * hd]) {
                        *o = x * inv;
                    }
                }
            }
        });
}

/// f32 dot product with 8 independent partial sums, so it vectorises.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain two-pass softmax attention in f64, the definition.
    fn naive(s: AttentionShape, n: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let hd = s.head_dim;
        let kvd = s.n_head_kv * hd;
        let mut out = vec![0.0f32; n * s.n_head * hd];
        for t in 0..n {
            for h in 0..s.n_head {
                let kh = h / (s.n_head / s.n_head_kv) * hd;
                let qh = &q[(t * s.n_head + h) * hd..][..hd];
                let n_keys = s.pos0 + t + 1;
                let sc: Vec<f64> = (0..n_keys)
                    .map(|j| {
                        let kr = &k[j * kvd + kh..][..hd];
                        qh.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (0..n_keys).map(|j| e[j] * v[j * kvd + kh + d] as f64).sum();
                    out[(t * s.n_head + h) * hd + d] = (acc / sum) as f32;
                }
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: u32, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * amp
            })
            .collect()
    }

    #[test]
    fn blocked_online_softmax_equals_two_pass_definition() {
        // Sizes cross the key-block boundary (32) and are not multiples of it; GQA 6/2.
        for (n, pos0, hd) in [
            (1, 0, 8),
            (1, 70, 16),
            (5, 29, 64),
            (3, 100, 32),
            (40, 10, 64),
            (70, 0, 16),
        ] {
            let s = AttentionShape {
                n_head: 6,
                n_head_kv: 2,
                head_dim: hd,
                pos0,
            };
            let kvd = 2 * hd;
            let rows = pos0 + n;
            let q = rand_vec(n * 6 * hd, 1, 2.0);
            // Large-ish scores so the running maximum actually changes between blocks.
            let k = rand_vec(rows * kvd, 2, 6.0);
            let v = rand_vec(rows * kvd, 3, 1.0);
            let want = naive(s, n, &q, &k, &v);
            let mut got = vec![0.0; want.len()];
            attention(s, &q, KvRows::F32(&k), KvRows::F32(&v), &mut got);
            let d = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-5, "n {n} pos0 {pos0} hd {hd}: {d}");

            // f16 storage: the same function of the f16-rounded cache.
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let kr: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let vr: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            let want16 = naive(s, n, &q, &kr, &vr);
            attention(s, &q, KvRows::F16(&k16), KvRows::F16(&v16), &mut got);
            let d = want16
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-5, "f16 n {n} pos0 {pos0} hd {hd}: {d}");
        }
    }
}
