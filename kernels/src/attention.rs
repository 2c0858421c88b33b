//! Causal attention over a KV cache, blocked like flash attention: keys are visited in blocks,
//! with an online softmax (running max and sum, the accumulator rescaled once per block), so no
//! row of n scores is ever stored and memory does not grow with the context.
//!
//! One task handles one KV head and the queries that read it: a chunk of prompt tokens times
//! the GQA group (a single token's group when decoding). Per block of [`BLOCK`] keys it
//! converts the K and V rows to f32 once, then
//! - scores `S = Q K^T` as a small GEMM vectorized over queries (Q is stored transposed, scaled
//!   by 1/sqrt(head_dim)), so the softmax below is vertical: lane i is query i;
//! - masks the keys after each query's position (only in blocks that cross the diagonal);
//! - updates the running max, turns the scores into probabilities with a vector `exp` (only for
//!   the block's real keys) and rescales the running sums;
//! - accumulates `P V` vectorized over head_dim, several queries at once.
//!
//! The same code runs on every path through [`lanes::Lanes`]: AVX-512 (16 lanes), AVX2 (8)
//! or the portable eight-lane twin (`AIRLOCK_SIMD=scalar`), picked by [`simd_path`].
//! A query's numbers do not depend on which other queries share its task, so a prompt gives
//! the same result whether it is fed whole or token by token.

pub(crate) mod exp;
mod lanes;

use std::cell::RefCell;

use half::f16;
use rayon::prelude::*;

use self::lanes::{Lanes, Scalar8};
use crate::simd::{simd_path, SimdPath};

/// Keys per block of the online softmax.
const BLOCK: usize = 32;
/// Largest head size supported (Llama models use 64 or 128).
pub const MAX_HEAD_DIM: usize = 256;
/// Most queries (tokens x GQA group) one prompt task handles: bounds its state to
/// `MAX_QUERIES * head_dim` f32s for the accumulator and as much for the transposed queries.
const MAX_QUERIES: usize = 128;

/// One layer's keys or values: `n_ctx` rows of `n_head_kv * head_dim`, in f16 or f32.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvRows<'_> {
    /// Copy `dst.len()` values from `at` as f32 into `dst`.
    ///
    /// # Safety
    /// `L`'s CPU features must be present (see [`lanes`]).
    #[inline(always)]
    unsafe fn to_f32<L: Lanes>(self, at: usize, dst: &mut [f32]) {
        match self {
            // SAFETY: the caller guarantees L's features.
            KvRows::F16(v) => unsafe { L::f16_to_f32(&v[at..at + dst.len()], dst) },
            KvRows::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
        }
    }

    /// Prefetch the cache lines of `len` values from `at` (a hint; no bounds needed).
    ///
    /// # Safety
    /// `L`'s CPU features must be present.
    #[inline(always)]
    unsafe fn prefetch<L: Lanes>(self, at: usize, len: usize) {
        let (p, bytes) = match self {
            KvRows::F16(v) => (v.as_ptr() as *const u8, 2),
            KvRows::F32(v) => (v.as_ptr() as *const u8, 4),
        };
        for off in (0..len * bytes).step_by(64) {
            // SAFETY: the caller guarantees L's features; a prefetch of any address is sound,
            // and wrapping_add computes it without claiming it is in bounds.
            unsafe { L::prefetch(p.wrapping_add(at * bytes + off)) }
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
///
/// Runs on the process's [`simd_path`] (the portable twin if that is an error, which every
/// matmul call reports anyway). A single token (decode) allocates nothing once each worker
/// thread's scratch buffer has grown to the shape.
pub fn attention(s: AttentionShape, q: &[f32], k: KvRows, v: KvRows, out: &mut [f32]) {
    attention_with(simd_path().unwrap_or(SimdPath::Scalar), s, q, k, v, out)
}

/// [`attention`] on a given path (benchmarks and tests). Panics if the path is unavailable.
pub fn attention_with(
    path: SimdPath,
    s: AttentionShape,
    q: &[f32],
    k: KvRows,
    v: KvRows,
    out: &mut [f32],
) {
    let job = AttentionJob {
        shape: s,
        q,
        k,
        v,
        out,
    };
    attention_batch_with(path, &mut [job])
}

/// One sequence's attention in a batch: its own shape (its `pos0`), queries, cache and output,
/// as [`attention`] takes them.
pub struct AttentionJob<'a> {
    pub shape: AttentionShape,
    pub q: &'a [f32],
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub out: &'a mut [f32],
}

/// [`attention`] for several sequences in one parallel region: the tasks of every job (per KV
/// head, and per chunk of tokens for a prompt) share the pool, so a batch of decoding sequences
/// keeps every thread busy even when one sequence has fewer KV heads than there are threads.
/// Each job's numbers are the same as alone (a task's do not depend on the other tasks).
pub fn attention_batch(jobs: &mut [AttentionJob]) {
    attention_batch_with(simd_path().unwrap_or(SimdPath::Scalar), jobs)
}

/// [`attention_batch`] on a given path. Panics if the path is unavailable.
pub fn attention_batch_with(path: SimdPath, jobs: &mut [AttentionJob]) {
    assert!(path.is_available(), "SIMD path {path} is not available");
    if let [job] = jobs {
        let Some(kernel) = Kernel::new(path, job) else {
            return;
        };
        if job.out.len() == job.shape.n_head * job.shape.head_dim {
            // Decode of one sequence: one task per KV head, a contiguous slice of the output
            // row; no allocation.
            let (group, hd) = (kernel.group, kernel.s.head_dim);
            job.out
                .par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(h_kv, o)| kernel.run(0, 1, h_kv, &mut [o]));
            return;
        }
    }
    let kernels: Vec<Option<Kernel>> = jobs.iter().map(|j| Kernel::new(path, j)).collect();

    // Tasks are (job, chunk of tokens, KV head). A prompt gets enough chunks to keep every
    // thread busy (later chunks see more keys, so the work per task grows along the prompt), as
    // few as that allows so each converted K/V block serves many queries.
    let want_tasks = 8 * rayon::current_num_threads();
    let mut tasks: Vec<(&Kernel, usize, usize, Vec<&mut [f32]>)> = Vec::new();
    for (job, kernel) in jobs.iter_mut().zip(&kernels) {
        let Some(kernel) = kernel else { continue };
        let s = kernel.s;
        let (group, hd) = (kernel.group, s.head_dim);
        let row = s.n_head * hd;
        let n = job.out.len() / row;
        let max_t = (MAX_QUERIES / group).max(1);
        let min_t = 16usize.div_ceil(group).min(max_t);
        let tc = if n == 1 {
            1
        } else {
            let n_chunks = want_tasks.div_ceil(s.n_head_kv).min(n);
            n.div_ceil(n_chunks).clamp(min_t, max_t)
        };
        let first = tasks.len();
        for c in 0..n.div_ceil(tc) {
            for h_kv in 0..s.n_head_kv {
                tasks.push((kernel, c * tc, h_kv, Vec::with_capacity(tc)));
            }
        }
        for (t, r) in job.out.chunks_mut(row).enumerate() {
            for (h_kv, o) in r.chunks_mut(group * hd).enumerate() {
                tasks[first + (t / tc) * s.n_head_kv + h_kv].3.push(o);
            }
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(kernel, t0, h_kv, mut outs)| {
            let n_t = outs.len();
            kernel.run(t0, n_t, h_kv, &mut outs)
        });
}

/// Everything a task needs besides its own range.
struct Kernel<'a> {
    path: SimdPath,
    s: AttentionShape,
    group: usize,
    q: &'a [f32],
    k: KvRows<'a>,
    v: KvRows<'a>,
}

thread_local! {
    /// Per-thread scratch for the tasks, grown to the largest shape seen and then reused.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl<'a> Kernel<'a> {
    /// Checks `job`'s shapes (panics on a caller's bug, as slicing would) and returns its
    /// kernel, or None when it has no tokens.
    fn new(path: SimdPath, job: &AttentionJob<'a>) -> Option<Self> {
        let s = job.shape;
        let hd = s.head_dim;
        assert!(hd > 0 && hd <= MAX_HEAD_DIM && s.n_head.is_multiple_of(s.n_head_kv));
        let row = s.n_head * hd;
        assert!(job.out.len().is_multiple_of(row) && job.q.len() == job.out.len());
        let n = job.out.len() / row;
        if n == 0 {
            return None;
        }
        let rows_needed = (s.pos0 + n) * s.n_head_kv * hd;
        let kv_len = |r: &KvRows| match r {
            KvRows::F16(x) => x.len(),
            KvRows::F32(x) => x.len(),
        };
        assert!(kv_len(&job.k) >= rows_needed && kv_len(&job.v) >= rows_needed);
        Some(Kernel {
            path,
            s,
            group: s.n_head / s.n_head_kv,
            q: job.q,
            k: job.k,
            v: job.v,
        })
    }

    /// Tokens t0..t0 + n_t of KV head h_kv; `outs[i]` is token t0 + i's output for the
    /// group's query heads (group x head_dim).
    fn run(&self, t0: usize, n_t: usize, h_kv: usize, outs: &mut [&mut [f32]]) {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            match self.path {
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx512 | SimdPath::Avx512Vnni => {
                    // SAFETY: attention_with checked the path is available, and both AVX-512
                    // paths include AVX-512F, AVX2, FMA and F16C (simd.rs detection).
                    unsafe { task_avx512(self, t0, n_t, h_kv, outs, &mut scratch) }
                }
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx2 | SimdPath::AvxVnni => {
                    // SAFETY: attention_with checked the path is available, and both 256-bit
                    // paths include AVX2, FMA and F16C (simd.rs detection).
                    unsafe { task_avx2(self, t0, n_t, h_kv, outs, &mut scratch) }
                }
                // SAFETY: the portable twin needs no CPU feature.
                _ => unsafe {
                    task::<Scalar8, 2, 4, 4, 2>(self, t0, n_t, h_kv, outs, &mut scratch)
                },
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn task_avx512(
    kn: &Kernel,
    t0: usize,
    n_t: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are Zmm's.
    unsafe { task::<lanes::Zmm, 2, 8, 4, 4>(kn, t0, n_t, h_kv, outs, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2(
    kn: &Kernel,
    t0: usize,
    n_t: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are Ymm's.
    unsafe { task::<lanes::Ymm, 2, 4, 4, 2>(kn, t0, n_t, h_kv, outs, scratch) }
}

/// One task (see [`Kernel::run`]) with vector type `L`. Tiles: `QV` query vectors x `KJ` keys
/// for the scores, `QT` queries x `DV` head_dim vectors for `P V`.
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
unsafe fn task<L: Lanes, const QV: usize, const KJ: usize, const QT: usize, const DV: usize>(
    kn: &Kernel,
    t0: usize,
    n_t: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    let s = kn.s;
    let (hd, group) = (s.head_dim, kn.group);
    let kvd = s.n_head_kv * hd;
    let nl = L::LANES;
    let nq = n_t * group;
    let nqp = nq.next_multiple_of(nl);
    let hdp = hd.next_multiple_of(nl);

    // Scratch: transposed scaled queries, positions, running max/sum, correction, scores,
    // accumulators, converted K and V rows.
    let sizes = [
        hd * nqp,
        nqp,
        nqp,
        nqp,
        nqp,
        BLOCK * nqp,
        nqp * hdp,
        BLOCK * hdp,
        BLOCK * hdp,
    ];
    let total: usize = sizes.iter().sum();
    if scratch.len() < total {
        scratch.resize(total, 0.0);
    }
    let mut rest = &mut scratch[..total];
    let mut bufs: [&mut [f32]; 9] = Default::default();
    for (b, &n) in bufs.iter_mut().zip(&sizes) {
        let (a, r) = std::mem::take(&mut rest).split_at_mut(n);
        *b = a;
        rest = r;
    }
    let [qt, pos, m, l, corr, sc, acc, kb, vb] = bufs;

    // Queries, transposed (qt[d][i]) and scaled; padding lanes see every key.
    let scale = 1.0 / (hd as f32).sqrt();
    pos.fill(f32::MAX);
    // Gathered a vector of queries at a time (one strided load per lane, so no scalar
    // transpose); padding lanes repeat the last query, and lanes never mix, so their
    // (discarded) numbers cannot reach a real query.
    let q_row = |i: usize| ((t0 + i / group) * s.n_head + h_kv * group + i % group) * hd;
    let q_base = &kn.q[q_row(0)..q_row(nq - 1) + hd];
    assert!(q_base.len() <= i32::MAX as usize);
    for v0 in 0..nqp / nl {
        let idx: [i32; 16] =
            std::array::from_fn(|l| (q_row((v0 * nl + l).min(nq - 1)) - q_row(0)) as i32);
        let scv = L::splat(scale);
        for d in 0..hd {
            // SAFETY: L's features (caller); every q_base index idx[l] + d is below
            // q_row(nq - 1) - q_row(0) + hd = q_base.len(), and qt has hd rows of nqp.
            unsafe {
                let x = L::gather(q_base.as_ptr().add(d), &idx);
                L::mul(x, scv).store(qt.as_mut_ptr().add(d * nqp + v0 * nl));
            }
        }
    }
    for (i, p) in pos[..nq].iter_mut().enumerate() {
        *p = (s.pos0 + t0 + i / group) as f32;
    }
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    acc.fill(0.0);
    kb.fill(0.0);
    vb.fill(0.0);

    let n_keys = s.pos0 + t0 + n_t;
    let first_pos = s.pos0 + t0;
    for start in (0..n_keys).step_by(BLOCK) {
        let nb = (n_keys - start).min(BLOCK);
        // The rows of one KV head are strided (one per n_head_kv * head_dim): fetch the next
        // block's while this one is computed, which long decodes (cache bigger than L3) need.
        for j in start + BLOCK..(start + 2 * BLOCK).min(n_keys) {
            let at = j * kvd + h_kv * hd;
            // SAFETY: the caller guarantees L's features.
            unsafe {
                kn.k.prefetch::<L>(at, hd);
                kn.v.prefetch::<L>(at, hd);
            }
        }
        for j in 0..nb {
            let at = (start + j) * kvd + h_kv * hd;
            // SAFETY: the caller guarantees L's features.
            unsafe {
                kn.k.to_f32::<L>(at, &mut kb[j * hdp..][..hd]);
                kn.v.to_f32::<L>(at, &mut vb[j * hdp..][..hd]);
            }
        }
        let nbk = nb.next_multiple_of(KJ);
        // SAFETY (the whole block): L's features are present (caller); every pointer below
        // stays inside its buffer: qt has hd rows of nqp, sc BLOCK rows of nqp, kb/vb BLOCK
        // rows of hdp, acc nqp rows of hdp, and the loops keep query vectors < nqp / nl,
        // keys < nbk <= BLOCK, queries < nq <= nqp and head_dim vectors < hdp / nl.
        unsafe {
            // Scores.
            let nv = nqp / nl;
            // The last real query of vectors ..v sees keys up to this position (queries are in
            // token order); a tile whose first key is past it is fully masked and skipped (the
            // mask below overwrites whatever its scores hold).
            let last_pos = |v: usize| pos[(v * nl).min(nq) - 1] as usize;
            for j0 in (0..nbk).step_by(KJ) {
                let mut v0 = 0;
                while v0 + QV <= nv {
                    if start + j0 <= last_pos(v0 + QV) {
                        scores::<L, QV, KJ>(qt, nqp, hd, kb, hdp, sc, v0, j0);
                    }
                    v0 += QV;
                }
                while v0 < nv {
                    if start + j0 <= last_pos(v0 + 1) {
                        scores::<L, 1, KJ>(qt, nqp, hd, kb, hdp, sc, v0, j0);
                    }
                    v0 += 1;
                }
            }
            // Causal mask: only blocks whose last key is after the first query's position.
            if start + nb - 1 > first_pos {
                let neg = L::splat(f32::NEG_INFINITY);
                for j in 0..nb {
                    let kj = L::splat((start + j) as f32);
                    for v0 in 0..nv {
                        let p = sc.as_mut_ptr().add(j * nqp + v0 * nl);
                        let pv = L::load(pos.as_ptr().add(v0 * nl));
                        L::select_gt(kj, pv, neg, L::load(p)).store(p);
                    }
                }
            }
            // Online softmax, lane i = query i.
            for v0 in 0..nv {
                let o = v0 * nl;
                let mut mx = L::splat(f32::NEG_INFINITY);
                for j in 0..nb {
                    mx = L::max(mx, L::load(sc.as_ptr().add(j * nqp + o)));
                }
                let m_old = L::load(m.as_ptr().add(o));
                let m_new = L::max(m_old, mx);
                // A query that has seen only masked keys keeps -inf: subtract 0 instead, so
                // its probabilities are exp(-inf) = 0, not NaN.
                let neg = L::splat(f32::NEG_INFINITY);
                let base = L::select_gt(m_new, neg, m_new, L::splat(0.0));
                let c = L::exp(L::sub(m_old, base));
                let mut sum = L::splat(0.0);
                for j in 0..nb {
                    let p = sc.as_mut_ptr().add(j * nqp + o);
                    let e = L::exp(L::sub(L::load(p), base));
                    e.store(p);
                    sum = L::add(sum, e);
                }
                let l_old = L::load(l.as_ptr().add(o));
                L::mul_add(l_old, c, sum).store(l.as_mut_ptr().add(o));
                m_new.store(m.as_mut_ptr().add(o));
                c.store(corr.as_mut_ptr().add(o));
            }
            // acc = acc * corr + P V, each query over the keys it sees: a masked key never
            // enters, not even with probability 0, since 0 * inf is NaN and a non-finite value
            // in V would then change a result that, fed token by token, never reads that key.
            let ndv = hdp / nl;
            let seen = |q: usize| nb.min((pos[q] as usize + 1).saturating_sub(start));
            let mut q0 = 0;
            while q0 < nq {
                let qt_n = (nq - q0).min(QT);
                // Queries are in token order: the tile's first sees the fewest keys. The tile
                // takes those, then each query its own rest; the store and reload between the
                // two loops is exact, so every query adds its keys in one order either way.
                let common = seen(q0);
                let mut d0 = 0;
                while d0 < ndv {
                    let dn = (ndv - d0).min(DV);
                    if qt_n == QT && dn == DV {
                        pv::<L, QT, DV>(sc, nqp, vb, hdp, 0..common, true, acc, corr, q0, d0);
                        for q in q0 + 1..q0 + QT {
                            let keys = common..seen(q);
                            if !keys.is_empty() {
                                pv::<L, 1, DV>(sc, nqp, vb, hdp, keys, false, acc, corr, q, d0);
                            }
                        }
                    } else {
                        for q in q0..q0 + qt_n {
                            for d in d0..d0 + dn {
                                let keys = 0..seen(q);
                                pv::<L, 1, 1>(sc, nqp, vb, hdp, keys, true, acc, corr, q, d);
                            }
                        }
                    }
                    d0 += dn;
                }
                q0 += qt_n;
            }
        }
    }

    for i in 0..nq {
        let (t, g) = (i / group, i % group);
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        for (o, &a) in outs[t][g * hd..(g + 1) * hd]
            .iter_mut()
            .zip(&acc[i * hdp..])
        {
            *o = a * inv;
        }
    }
}

/// `sc[j][v] = sum_d qt[d][v] * kb[j][d]` for keys j0..j0 + KJ and query vectors v0..v0 + QV.
///
/// # Safety
/// `L`'s features; the ranges in bounds of the buffers (see the caller).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores<L: Lanes, const QV: usize, const KJ: usize>(
    qt: &[f32],
    nqp: usize,
    hd: usize,
    kb: &[f32],
    hdp: usize,
    sc: &mut [f32],
    v0: usize,
    j0: usize,
) {
    let nl = L::LANES;
    // SAFETY: the caller's contract.
    unsafe {
        let zero = L::splat(0.0);
        let mut a = [[zero; QV]; KJ];
        let qp = qt.as_ptr().add(v0 * nl);
        let kp = kb.as_ptr().add(j0 * hdp);
        for d in 0..hd {
            let mut qv = [zero; QV];
            for (x, y) in qv.iter_mut().enumerate() {
                *y = L::load(qp.add(d * nqp + x * nl));
            }
            for (b, row) in a.iter_mut().enumerate() {
                let k = L::splat(*kp.add(b * hdp + d));
                for (x, y) in row.iter_mut().enumerate() {
                    *y = L::mul_add(qv[x], k, *y);
                }
            }
        }
        let sp = sc.as_mut_ptr().add(j0 * nqp + v0 * nl);
        for (b, row) in a.iter().enumerate() {
            for (x, y) in row.iter().enumerate() {
                y.store(sp.add(b * nqp + x * nl));
            }
        }
    }
}

/// `acc[q] = acc[q] * corr[q] + sum_{j in keys} p[j][q] vb[j]` for queries q0..q0 + QT and
/// head_dim vectors d0..d0 + DV, in key order; without the `* corr[q]` when `rescale` is false
/// (a query's second range of keys in the same block).
///
/// # Safety
/// `L`'s features; the ranges in bounds of the buffers (see the caller).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<L: Lanes, const QT: usize, const DV: usize>(
    p: &[f32],
    nqp: usize,
    vb: &[f32],
    hdp: usize,
    keys: std::ops::Range<usize>,
    rescale: bool,
    acc: &mut [f32],
    corr: &[f32],
    q0: usize,
    d0: usize,
) {
    let nl = L::LANES;
    // SAFETY: the caller's contract.
    unsafe {
        let zero = L::splat(0.0);
        let mut a = [[zero; DV]; QT];
        let ap = acc.as_mut_ptr().add(q0 * hdp + d0 * nl);
        for (i, row) in a.iter_mut().enumerate() {
            let c = L::splat(corr[q0 + i]);
            for (e, y) in row.iter_mut().enumerate() {
                let x = L::load(ap.add(i * hdp + e * nl));
                *y = if rescale { L::mul(x, c) } else { x };
            }
        }
        let vp = vb.as_ptr().add(d0 * nl);
        let pp = p.as_ptr().add(q0);
        for j in keys {
            let mut vv = [zero; DV];
            for (e, y) in vv.iter_mut().enumerate() {
                *y = L::load(vp.add(j * hdp + e * nl));
            }
            for (i, row) in a.iter_mut().enumerate() {
                let w = L::splat(*pp.add(j * nqp + i));
                for (e, y) in row.iter_mut().enumerate() {
                    *y = L::mul_add(w, vv[e], *y);
                }
            }
        }
        for (i, row) in a.iter().enumerate() {
            for (e, y) in row.iter().enumerate() {
                y.store(ap.add(i * hdp + e * nl));
            }
        }
    }
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

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Every available path (the portable twin included) against the f64 definition, in f32
    /// and f16 storage.
    fn check_all_paths(n_head: usize, n_head_kv: usize, cases: &[(usize, usize, usize)]) {
        for &(n, pos0, hd) in cases {
            let s = AttentionShape {
                n_head,
                n_head_kv,
                head_dim: hd,
                pos0,
            };
            let kvd = n_head_kv * hd;
            let rows = pos0 + n;
            let q = rand_vec(n * n_head * hd, 1, 2.0);
            // Large-ish scores so the running maximum actually changes between blocks.
            let k = rand_vec(rows * kvd, 2, 6.0);
            let v = rand_vec(rows * kvd, 3, 1.0);
            let want = naive(s, n, &q, &k, &v);
            // f16 storage: the same function of the f16-rounded cache.
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let kr: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let vr: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            let want16 = naive(s, n, &q, &kr, &vr);
            for path in SimdPath::available() {
                let mut got = vec![0.0; want.len()];
                attention_with(path, s, &q, KvRows::F32(&k), KvRows::F32(&v), &mut got);
                let d = max_diff(&want, &got);
                assert!(
                    d < 1e-5,
                    "{path} {n_head}/{n_head_kv} n {n} pos0 {pos0} hd {hd}: {d}"
                );
                attention_with(path, s, &q, KvRows::F16(&k16), KvRows::F16(&v16), &mut got);
                let d = max_diff(&want16, &got);
                assert!(d < 1e-5, "{path} f16 n {n} pos0 {pos0} hd {hd}: {d}");
            }
        }
    }

    #[test]
    fn blocked_online_softmax_equals_two_pass_definition() {
        // Sizes cross the key-block boundary (32) and are not multiples of it; GQA 6/2.
        check_all_paths(
            6,
            2,
            &[
                (1, 0, 8),
                (1, 70, 16),
                (5, 29, 64),
                (3, 100, 32),
                (40, 10, 64),
                (70, 0, 16),
            ],
        );
    }

    #[test]
    fn model_shapes_and_odd_sizes_on_every_path() {
        // SmolLM2 (9/3, 64) and Llama 3 8B (32/8, 128) shapes; prompts that span several
        // chunks, the diagonal inside a block, head sizes that are not a multiple of any
        // vector width, a group of one (MHA) and a group of 8.
        check_all_paths(9, 3, &[(1, 0, 64), (1, 200, 64), (97, 0, 64), (45, 37, 64)]);
        check_all_paths(32, 8, &[(1, 150, 128), (33, 3, 128)]);
        check_all_paths(4, 4, &[(19, 5, 24), (2, 63, 40), (1, 31, 12)]);
        check_all_paths(8, 1, &[(150, 0, 16), (1, 64, 8)]);
    }

    #[test]
    fn prompt_whole_equals_token_by_token() {
        // The decode path (one token) and the prompt path agree bit for bit: a query's numbers
        // do not depend on the other queries of its task.
        let s = AttentionShape {
            n_head: 9,
            n_head_kv: 3,
            head_dim: 64,
            pos0: 0,
        };
        let n = 75;
        let (row, kvd) = (9 * 64, 3 * 64);
        let q = rand_vec(n * row, 4, 2.0);
        let k: Vec<f16> = rand_vec(n * kvd, 5, 6.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let v: Vec<f16> = rand_vec(n * kvd, 6, 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        for path in SimdPath::available() {
            let mut whole = vec![0.0; n * row];
            attention_with(path, s, &q, KvRows::F16(&k), KvRows::F16(&v), &mut whole);
            for t in 0..n {
                let mut one = vec![0.0; row];
                let st = AttentionShape { pos0: t, ..s };
                let qt = &q[t * row..(t + 1) * row];
                attention_with(path, st, qt, KvRows::F16(&k), KvRows::F16(&v), &mut one);
                let d = max_diff(&one, &whole[t * row..(t + 1) * row]);
                assert!(d == 0.0, "{path} token {t}: {d}");
            }
        }
    }

    #[test]
    fn masked_non_finite_cache_values_never_reach_earlier_queries() {
        // A chunk of tokens whose later positions hold inf and NaN in V (and inf in K): the
        // queries before them must give the same bits as when fed token by token, where those
        // positions are never read. With masked keys entering P V at weight 0, 0 * inf = NaN.
        let (n_head, n_head_kv, hd) = (9, 3, 64);
        let (row, kvd) = (n_head * hd, n_head_kv * hd);
        for pos0 in [0, 21] {
            let n = 75;
            let s = AttentionShape {
                n_head,
                n_head_kv,
                head_dim: hd,
                pos0,
            };
            let rows = pos0 + n;
            let q = rand_vec(n * row, 10, 2.0);
            let mut k = rand_vec(rows * kvd, 11, 6.0);
            let mut v = rand_vec(rows * kvd, 12, 1.0);
            let poisoned = pos0 + 40;
            v[poisoned * kvd + 5] = f32::INFINITY;
            v[(poisoned + 9) * kvd + kvd - 1] = f32::NAN;
            k[(poisoned + 3) * kvd + 7] = f32::INFINITY;
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            for path in SimdPath::available() {
                for (kr, vr) in [
                    (KvRows::F32(&k), KvRows::F32(&v)),
                    (KvRows::F16(&k16), KvRows::F16(&v16)),
                ] {
                    let mut whole = vec![0.0; n * row];
                    attention_with(path, s, &q, kr, vr, &mut whole);
                    for t in 0..poisoned - pos0 {
                        let mut one = vec![0.0; row];
                        let st = AttentionShape {
                            pos0: pos0 + t,
                            ..s
                        };
                        let qt = &q[t * row..(t + 1) * row];
                        attention_with(path, st, qt, kr, vr, &mut one);
                        let got = &whole[t * row..(t + 1) * row];
                        assert!(
                            got.iter().all(|x| x.is_finite()),
                            "{path} pos0 {pos0} t {t}"
                        );
                        let same = one.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{path} pos0 {pos0} token {t} differs from token by token"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_batch_of_sequences_gives_each_the_bits_it_gets_alone() {
        // Decoding sequences at several depths and prompt chunks, in one parallel region.
        let (n_head, n_head_kv, hd) = (9, 3, 64);
        let (row, kvd) = (n_head * hd, n_head_kv * hd);
        let seqs = [(1, 0), (1, 70), (40, 0), (1, 33), (17, 90), (0, 5)];
        let data: Vec<_> = seqs
            .iter()
            .enumerate()
            .map(|(i, &(n, pos0))| {
                let seed = 20 + 3 * i as u32;
                let q = rand_vec(n * row, seed, 2.0);
                let k: Vec<f16> = rand_vec((pos0 + n) * kvd, seed + 1, 6.0)
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
                let v: Vec<f16> = rand_vec((pos0 + n) * kvd, seed + 2, 1.0)
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
                (n, pos0, q, k, v)
            })
            .collect();
        let shape = |pos0| AttentionShape {
            n_head,
            n_head_kv,
            head_dim: hd,
            pos0,
        };
        for path in SimdPath::available() {
            let alone: Vec<Vec<f32>> = data
                .iter()
                .map(|(n, pos0, q, k, v)| {
                    let mut out = vec![0.0; n * row];
                    let (k, v) = (KvRows::F16(k), KvRows::F16(v));
                    attention_with(path, shape(*pos0), q, k, v, &mut out);
                    out
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = data.iter().map(|d| vec![0.0; d.0 * row]).collect();
            let mut jobs: Vec<AttentionJob> = data
                .iter()
                .zip(&mut outs)
                .map(|((_, pos0, q, k, v), out)| AttentionJob {
                    shape: shape(*pos0),
                    q,
                    k: KvRows::F16(k),
                    v: KvRows::F16(v),
                    out,
                })
                .collect();
            attention_batch_with(path, &mut jobs);
            for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{path}: sequence {i} differs in a batch");
            }
        }
    }

    #[test]
    fn paths_agree_with_the_scalar_twin() {
        let s = AttentionShape {
            n_head: 32,
            n_head_kv: 8,
            head_dim: 128,
            pos0: 300,
        };
        let n = 20;
        let kvd = 8 * 128;
        let q = rand_vec(n * 32 * 128, 7, 2.0);
        let k: Vec<f16> = rand_vec((300 + n) * kvd, 8, 6.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let v: Vec<f16> = rand_vec((300 + n) * kvd, 9, 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let mut want = vec![0.0; q.len()];
        attention_with(
            SimdPath::Scalar,
            s,
            &q,
            KvRows::F16(&k),
            KvRows::F16(&v),
            &mut want,
        );
        for path in SimdPath::available() {
            let mut got = vec![0.0; q.len()];
            attention_with(path, s, &q, KvRows::F16(&k), KvRows::F16(&v), &mut got);
            let d = max_diff(&want, &got);
            assert!(d < 1e-5, "{path}: {d}");
        }
    }
}
