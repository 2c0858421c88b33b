//! Causal attention over a KV cache, blocked like flash attention: keys are visited in blocks
//! of [`TILE`] (one tile of the cache, see [`kv`]), with an online softmax (running max and
//! sum, the accumulator rescaled once per block), so no row of n scores is ever stored and
//! memory does not grow with the context.
//!
//! **One order per query.** A query's keys are cut into spans of [`SPAN`] positions (aligned
//! at multiples of it). Each span runs the online softmax from an empty state, block by block;
//! the spans' states are then folded into one in position order, and the result divided by the
//! sum. Every step (scores summed over the head dimension in order, the block's sum of
//! probabilities in a fixed pairwise tree, `P V` in key order, the fold) is the same float
//! operation whichever way the work is split: so a query gets the same bits whether it comes
//! in a prompt chunk or alone, with any batch, tile or thread count.
//!
//! **Two ways to run it.**
//! - A prompt chunk: one task per KV head and chunk of tokens (times the GQA group) converts
//!   each block's K and V to f32 once and scores it as a small GEMM vectorised over queries
//!   (queries stored transposed, scaled by 1/sqrt(head_dim)), so the softmax is vertical (lane
//!   i is query i); masks keys after each query's position (only in blocks that cross the
//!   diagonal); accumulates `P V` vectorised over head_dim, several queries at once.
//! - A decoding token: its few queries (the GQA group) would fill 4 of 16 lanes that way, so
//!   it is vectorised over keys instead (K is stored transposed for this), read straight from
//!   the cache, and its spans are separate tasks: a long context keeps every thread busy
//!   even when the model has fewer KV heads than there are threads. A second, short pass folds
//!   each head's spans.
//!
//! The same code runs on every path through [`lanes::Lanes`]: AVX-512 (16 lanes), AVX2 (8)
//! or the portable eight-lane twin (`AIRLOCK_SIMD=scalar`), picked by [`simd_path`].

pub(crate) mod exp;
mod kv;
mod lanes;

use std::cell::RefCell;
use std::ops::Range;

use half::f16;

use self::kv::ValsRef;
pub use self::kv::{KvLayer, KvStore, KvType, TILE};
use self::lanes::{Lanes, Scalar8};
use crate::pool::{for_each_chunk_mut, for_each_mut};
use crate::simd::{simd_path, SimdPath};

/// Positions per span (see the module docs): a decode task's share of one head's keys.
pub const SPAN: usize = 256;
const _: () = assert!(SPAN.is_multiple_of(TILE));
/// Largest head size supported (Llama models use 64 or 128).
pub const MAX_HEAD_DIM: usize = 256;
/// Most queries (tokens x GQA group) one prompt task handles: bounds its state to
/// `MAX_QUERIES * head_dim` f32s for each accumulator and as much for the transposed queries.
const MAX_QUERIES: usize = 128;
/// A query's state in a decode task and a partial: max, sum, then the accumulator padded to
/// 16 values (the widest vector).
const STATE_HEAD: usize = 2;

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
/// query head h. `q` and `out` are n_tokens x n_head x head_dim; `kv` holds at least
/// pos0 + n_tokens positions (those written).
///
/// Runs on the process's [`simd_path`] (the portable twin if that is an error, which every
/// matmul call reports anyway). A single token (decode) allocates nothing once each worker
/// thread's scratch buffer has grown to the shape.
pub fn attention(s: AttentionShape, q: &[f32], kv: KvLayer, out: &mut [f32]) {
    attention_with(simd_path().unwrap_or(SimdPath::Scalar), s, q, kv, out)
}

/// [`attention`] on a given path (benchmarks and tests). Panics if the path is unavailable.
pub fn attention_with(path: SimdPath, s: AttentionShape, q: &[f32], kv: KvLayer, out: &mut [f32]) {
    let job = AttentionJob {
        shape: s,
        q,
        kv,
        out,
    };
    attention_batch_with(path, &mut [job])
}

/// One sequence's attention in a batch: its own shape (its `pos0`), queries, cache and output,
/// as [`attention`] takes them.
pub struct AttentionJob<'a> {
    pub shape: AttentionShape,
    pub q: &'a [f32],
    pub kv: KvLayer<'a>,
    pub out: &'a mut [f32],
}

/// [`attention`] for several sequences in one parallel region: the tasks of every job (per KV
/// head and span for a decoding token, per KV head and chunk of tokens for a prompt) share the
/// pool. Each job's numbers are the same as alone (a task's do not depend on the other tasks).
pub fn attention_batch(jobs: &mut [AttentionJob]) {
    attention_batch_with(simd_path().unwrap_or(SimdPath::Scalar), jobs)
}

thread_local! {
    /// Per-thread scratch for the tasks, grown to the largest shape seen and then reused.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's buffer of decode partials (one state per head, span and query).
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`attention_batch`] on a given path. Panics if the path is unavailable.
pub fn attention_batch_with(path: SimdPath, jobs: &mut [AttentionJob]) {
    assert!(path.is_available(), "SIMD path {path} is not available");
    if let [job] = jobs {
        let Some(kernel) = Kernel::new(path, job) else {
            return;
        };
        if kernel.n == 1 {
            // One decoding token: no task list, so a step allocates nothing.
            let (group, hd) = (kernel.group, kernel.s.head_dim);
            let n_spans = kernel.n_keys().div_ceil(SPAN);
            if n_spans == 1 {
                for_each_chunk_mut(job.out, group * hd, |h_kv, o| {
                    kernel.decode(h_kv, 0, Dest::Out(o))
                });
                return;
            }
            let (pl, n_head_kv) = (kernel.partial_len(), kernel.s.n_head_kv);
            let per_head = n_spans * pl;
            let mut partials = PARTIALS.with(|p| std::mem::take(&mut *p.borrow_mut()));
            partials.resize(n_head_kv * per_head, 0.0);
            // A task takes several (head, span) units in a row: tasks of a few microseconds
            // each would spend much of it in the pool. Each unit still writes its own span's
            // state, so the grouping changes no number.
            let units = n_head_kv * n_spans;
            let per_task = units.div_ceil(4 * rayon::current_num_threads()).max(1);
            for_each_chunk_mut(&mut partials, per_task * pl, |c, ps| {
                for (i, p) in ps.chunks_exact_mut(pl).enumerate() {
                    let u = c * per_task + i;
                    kernel.decode(u / n_spans, u % n_spans, Dest::Partial(p));
                }
            });
            // The folds are short (a head's spans x group x head_dim): in parallel only when
            // there are many.
            let fold_work = units * pl;
            if fold_work >= 1 << 16 {
                for_each_chunk_mut(job.out, group * hd, |h, o| {
                    kernel.fold(&partials[h * per_head..][..per_head], o)
                });
            } else {
                for (h, o) in job.out.chunks_mut(group * hd).enumerate() {
                    kernel.fold(&partials[h * per_head..][..per_head], o);
                }
            }
            PARTIALS.with(|p| *p.borrow_mut() = partials);
            return;
        }
    }
    let kernels: Vec<Option<Kernel>> = jobs.iter().map(|j| Kernel::new(path, j)).collect();

    // Decode partials of every decoding job, then the tasks: (job, chunk of tokens, KV head)
    // for prompts, (job, KV head, span) for decoding tokens. A prompt gets enough chunks to
    // keep every thread busy (later chunks see more keys, so the work per task grows along the
    // prompt), as few as that allows so each converted K/V block serves many queries.
    let partial_total: usize = kernels
        .iter()
        .flatten()
        .filter(|k| k.n == 1)
        .map(|k| k.s.n_head_kv * k.n_keys().div_ceil(SPAN) * k.partial_len())
        .sum();
    let mut partials = vec![0.0f32; partial_total];
    let want_tasks = 8 * rayon::current_num_threads();
    let mut tasks: Vec<Task> = Vec::new();
    let mut folds: Vec<(&Kernel, usize, &mut [f32])> = Vec::new();
    let mut rest = &mut partials[..];
    for (job, kernel) in jobs.iter_mut().zip(&kernels) {
        let Some(kernel) = kernel else { continue };
        let s = kernel.s;
        let (group, hd) = (kernel.group, s.head_dim);
        if kernel.n == 1 {
            // Several (head, span) units per task, as for one sequence alone.
            let n_spans = kernel.n_keys().div_ceil(SPAN);
            let units = s.n_head_kv * n_spans;
            let per_task = units.div_ceil(want_tasks / 2).max(1);
            for u0 in (0..units).step_by(per_task) {
                let nu = per_task.min(units - u0);
                let (p, r) = std::mem::take(&mut rest).split_at_mut(nu * kernel.partial_len());
                rest = r;
                tasks.push(Task::Spans(kernel, n_spans, u0, p));
            }
            folds.push((kernel, n_spans, &mut *job.out));
            continue;
        }
        let row = s.n_head * hd;
        let n = kernel.n;
        let max_t = (MAX_QUERIES / group).max(1);
        let min_t = 16usize.div_ceil(group).min(max_t);
        let n_chunks = want_tasks.div_ceil(s.n_head_kv).min(n);
        let tc = n.div_ceil(n_chunks).clamp(min_t, max_t);
        let first = tasks.len();
        for c in 0..n.div_ceil(tc) {
            for h_kv in 0..s.n_head_kv {
                tasks.push(Task::Chunk(kernel, c * tc, h_kv, Vec::with_capacity(tc)));
            }
        }
        for (t, r) in job.out.chunks_mut(row).enumerate() {
            for (h_kv, o) in r.chunks_mut(group * hd).enumerate() {
                if let Task::Chunk(_, _, _, outs) =
                    &mut tasks[first + (t / tc) * s.n_head_kv + h_kv]
                {
                    outs.push(o);
                }
            }
        }
    }
    for_each_mut(&mut tasks, |task| match task {
        Task::Chunk(kernel, t0, h_kv, outs) => kernel.prompt(*t0, *h_kv, outs),
        Task::Spans(kernel, n_spans, u0, ps) => {
            let (n_spans, u0) = (*n_spans, *u0);
            for (i, p) in ps.chunks_exact_mut(kernel.partial_len()).enumerate() {
                let u = u0 + i;
                kernel.decode(u / n_spans, u % n_spans, Dest::Partial(p));
            }
        }
    });
    // Fold each decoding job's spans, per KV head, in span order.
    let mut heads: Vec<(&Kernel, &[f32], &mut [f32])> = Vec::new();
    let mut rest = &partials[..];
    for (kernel, n_spans, out) in folds {
        let per_head = n_spans * kernel.partial_len();
        let gh = kernel.group * kernel.s.head_dim;
        for o in out.chunks_mut(gh) {
            let (p, r) = rest.split_at(per_head);
            rest = r;
            heads.push((kernel, p, o));
        }
    }
    if partial_total >= 1 << 16 {
        for_each_mut(&mut heads, |(kernel, p, o)| kernel.fold(p, o));
    } else {
        for (kernel, p, o) in heads {
            kernel.fold(p, o);
        }
    }
}

/// One task of a batch.
enum Task<'k, 'o> {
    /// Tokens t0..t0 + outs.len() of a prompt job, KV head h_kv: `outs[i]` is token t0 + i's
    /// output for the group's query heads.
    Chunk(&'k Kernel<'k>, usize, usize, Vec<&'o mut [f32]>),
    /// (head, span) units u0.. of a decoding job with n_spans spans per head (unit u is head
    /// u / n_spans, span u % n_spans), each into its partial state.
    Spans(&'k Kernel<'k>, usize, usize, &'o mut [f32]),
}

/// Where a decode task's state goes.
enum Dest<'a> {
    /// The group's output rows: the span was the only one.
    Out(&'a mut [f32]),
    /// A partial state, folded later: group rows of [`Kernel::state_row`].
    Partial(&'a mut [f32]),
}

/// Everything a task needs besides its own range.
struct Kernel<'a> {
    path: SimdPath,
    s: AttentionShape,
    group: usize,
    /// Tokens in the job.
    n: usize,
    q: &'a [f32],
    kv: KvLayer<'a>,
}

/// One KV head's tiles of one element type, read as f32 vectors: the pointers are the head's
/// first tile's.
///
/// # Safety (every method)
/// `L`'s features; `t < n_tiles`, `d < head_dim`, `v < TILE / L::LANES`, `j < TILE`,
/// `(e + 1) * L::LANES <= hdv` (the padded V row).
trait Head: Copy {
    /// Scales of keys `t * TILE + v * LANES ..` for dimensions `32 * b ..` (Q8_0), to give
    /// [`Head::k_scaled`]; anything for the float types, which ignore it.
    unsafe fn k_scale<L: Lanes>(self, t: usize, b: usize, v: usize) -> L;
    /// K of keys `t * TILE + v * LANES ..` at dimension `d`, given [`Head::k_scale`] of d's
    /// block of 32.
    unsafe fn k_scaled<L: Lanes>(self, t: usize, d: usize, v: usize, scale: L) -> L;
    /// K of keys `t * TILE + v * LANES ..` at dimension `d`.
    #[inline(always)]
    unsafe fn k<L: Lanes>(self, t: usize, d: usize, v: usize) -> L {
        // SAFETY: the caller's contract; d / 32 is d's block.
        unsafe { self.k_scaled(t, d, v, self.k_scale::<L>(t, d / 32, v)) }
    }
    /// V of key `t * TILE + j`, dimensions `e * LANES ..`.
    unsafe fn v<L: Lanes>(self, t: usize, j: usize, e: usize) -> L;
}

#[derive(Clone, Copy)]
struct F32Head {
    k: *const f32,
    v: *const f32,
    hd: usize,
    hdv: usize,
}

#[derive(Clone, Copy)]
struct F16Head {
    k: *const f16,
    v: *const f16,
    hd: usize,
    hdv: usize,
}

#[derive(Clone, Copy)]
struct Q8Head {
    kq: *const i8,
    kd: *const f16,
    vq: *const i8,
    vd: *const f16,
    hd: usize,
    /// Blocks of 32 per head row.
    nb: usize,
}

impl Head for F32Head {
    #[inline(always)]
    unsafe fn k_scale<L: Lanes>(self, _: usize, _: usize, _: usize) -> L {
        // SAFETY: no memory is read.
        unsafe { L::splat(1.0) }
    }
    #[inline(always)]
    unsafe fn k_scaled<L: Lanes>(self, t: usize, d: usize, v: usize, _: L) -> L {
        // SAFETY: the trait's contract keeps the offset inside the head's tiles.
        unsafe { L::load(self.k.add(t * TILE * self.hd + d * TILE + v * L::LANES)) }
    }
    #[inline(always)]
    unsafe fn v<L: Lanes>(self, t: usize, j: usize, e: usize) -> L {
        // SAFETY: as above.
        unsafe { L::load(self.v.add((t * TILE + j) * self.hdv + e * L::LANES)) }
    }
}

impl Head for F16Head {
    #[inline(always)]
    unsafe fn k_scale<L: Lanes>(self, _: usize, _: usize, _: usize) -> L {
        // SAFETY: no memory is read.
        unsafe { L::splat(1.0) }
    }
    #[inline(always)]
    unsafe fn k_scaled<L: Lanes>(self, t: usize, d: usize, v: usize, _: L) -> L {
        // SAFETY: the trait's contract keeps the offset inside the head's tiles.
        unsafe { L::load_f16(self.k.add(t * TILE * self.hd + d * TILE + v * L::LANES)) }
    }
    #[inline(always)]
    unsafe fn v<L: Lanes>(self, t: usize, j: usize, e: usize) -> L {
        // SAFETY: as above.
        unsafe { L::load_f16(self.v.add((t * TILE + j) * self.hdv + e * L::LANES)) }
    }
}

impl Head for Q8Head {
    #[inline(always)]
    unsafe fn k_scale<L: Lanes>(self, t: usize, b: usize, v: usize) -> L {
        // SAFETY: the trait's contract keeps the offset inside the head's tiles (b < nb);
        // scales are [nb][TILE] per tile, one per lane.
        unsafe { L::load_f16(self.kd.add(t * TILE * self.nb + b * TILE + v * L::LANES)) }
    }
    #[inline(always)]
    unsafe fn k_scaled<L: Lanes>(self, t: usize, d: usize, v: usize, scale: L) -> L {
        // SAFETY: the trait's contract keeps the offset inside the head's tiles. The product
        // is exact (an f16 times an i8), whatever computes it.
        unsafe {
            let q = L::load_i8(self.kq.add(t * TILE * self.hd + d * TILE + v * L::LANES));
            L::mul(q, scale)
        }
    }
    #[inline(always)]
    unsafe fn v<L: Lanes>(self, t: usize, j: usize, e: usize) -> L {
        // SAFETY: as above; V rows are not padded for Q8_0 (head_dim is a multiple of 32) and
        // scales are [TILE][nb] per tile; a vector lies inside one block of 32.
        unsafe {
            let q = L::load_i8(self.vq.add((t * TILE + j) * self.hd + e * L::LANES));
            L::mul(
                q,
                L::splat_f16(self.vd.add((t * TILE + j) * self.nb + e * L::LANES / 32)),
            )
        }
    }
}

/// A head of any type.
#[derive(Clone, Copy)]
enum AnyHead {
    F32(F32Head),
    F16(F16Head),
    Q8(Q8Head),
}

impl KvLayer<'_> {
    /// Head `h`'s tiles: the sub-slices are bounds-checked here, so the pointers cover
    /// `n_tiles` tiles.
    fn head(&self, h: usize) -> AnyHead {
        let (hd, hdv, nt) = (self.head_dim, self.hdv, self.n_tiles);
        let kr = h * nt * TILE * hd..(h + 1) * nt * TILE * hd;
        let vr = h * nt * TILE * hdv..(h + 1) * nt * TILE * hdv;
        let nb = hd / 32;
        let dr = h * nt * TILE * nb..(h + 1) * nt * TILE * nb;
        match (self.k, self.v) {
            (ValsRef::F32(k), ValsRef::F32(v)) => AnyHead::F32(F32Head {
                k: k[kr].as_ptr(),
                v: v[vr].as_ptr(),
                hd,
                hdv,
            }),
            (ValsRef::F16(k), ValsRef::F16(v)) => AnyHead::F16(F16Head {
                k: k[kr].as_ptr(),
                v: v[vr].as_ptr(),
                hd,
                hdv,
            }),
            (ValsRef::Q8_0(kq, kd), ValsRef::Q8_0(vq, vd)) => AnyHead::Q8(Q8Head {
                kq: kq[kr].as_ptr(),
                kd: kd[dr.clone()].as_ptr(),
                vq: vq[vr].as_ptr(),
                vd: vd[dr].as_ptr(),
                hd,
                nb,
            }),
            _ => unreachable!("K and V are built with the same type"),
        }
    }
}

impl<'a> Kernel<'a> {
    /// Checks `job`'s shapes (panics on a caller's bug, as slicing would) and returns its
    /// kernel, or None when it has no tokens.
    fn new(path: SimdPath, job: &AttentionJob<'a>) -> Option<Self> {
        let s = job.shape;
        let hd = s.head_dim;
        assert!(hd > 0 && hd <= MAX_HEAD_DIM && s.n_head.is_multiple_of(s.n_head_kv));
        assert!(job.kv.n_head_kv == s.n_head_kv && job.kv.head_dim == hd);
        let row = s.n_head * hd;
        assert!(job.out.len().is_multiple_of(row) && job.q.len() == job.out.len());
        let n = job.out.len() / row;
        if n == 0 {
            return None;
        }
        assert!(job.kv.capacity() >= s.pos0 + n);
        Some(Kernel {
            path,
            s,
            group: s.n_head / s.n_head_kv,
            n,
            q: job.q,
            kv: job.kv,
        })
    }

    /// Keys the job's last token sees.
    fn n_keys(&self) -> usize {
        self.s.pos0 + self.n
    }

    /// f32s of one query's state: max, sum, accumulator padded to 16.
    fn state_row(&self) -> usize {
        STATE_HEAD + self.s.head_dim.next_multiple_of(16)
    }

    /// f32s of one decode task's partial: the group's states.
    fn partial_len(&self) -> usize {
        self.group * self.state_row()
    }

    /// Tokens t0..t0 + outs.len() of KV head h_kv (a prompt chunk).
    fn prompt(&self, t0: usize, h_kv: usize, outs: &mut [&mut [f32]]) {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            match self.path {
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx512 | SimdPath::Avx512Vnni => {
                    // SAFETY: attention_batch_with checked the path is available, and both
                    // AVX-512 paths include AVX-512F, AVX2, FMA and F16C (simd.rs detection).
                    unsafe { prompt_avx512(self, t0, h_kv, outs, &mut scratch) }
                }
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx2 | SimdPath::AvxVnni => {
                    // SAFETY: attention_batch_with checked the path is available, and both
                    // 256-bit paths include AVX2, FMA and F16C (simd.rs detection).
                    unsafe { prompt_avx2(self, t0, h_kv, outs, &mut scratch) }
                }
                // SAFETY: the portable twin needs no CPU feature.
                _ => unsafe {
                    prompt_task::<Scalar8, 2, 4, 4, 2>(self, t0, h_kv, outs, &mut scratch)
                },
            }
        })
    }

    /// The decoding token's queries of KV head h_kv over span `span`.
    fn decode(&self, h_kv: usize, span: usize, dest: Dest) {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            match self.path {
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx512 | SimdPath::Avx512Vnni => {
                    // SAFETY: as in `prompt`.
                    unsafe { decode_avx512(self, h_kv, span, dest, &mut scratch) }
                }
                #[cfg(target_arch = "x86_64")]
                SimdPath::Avx2 | SimdPath::AvxVnni => {
                    // SAFETY: as in `prompt`.
                    unsafe { decode_avx2(self, h_kv, span, dest, &mut scratch) }
                }
                // SAFETY: the portable twin needs no CPU feature.
                _ => unsafe {
                    decode_task::<Scalar8, 2, 4, 4, 2>(self, h_kv, span, dest, &mut scratch)
                },
            }
        })
    }

    /// Fold one KV head's span partials (`p`, in span order) into its output rows `o`.
    fn fold(&self, p: &[f32], o: &mut [f32]) {
        match self.path {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 | SimdPath::Avx512Vnni => {
                // SAFETY: as in `prompt`.
                unsafe { fold_avx512(self, p, o) }
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 | SimdPath::AvxVnni => {
                // SAFETY: as in `prompt`.
                unsafe { fold_avx2(self, p, o) }
            }
            // SAFETY: the portable twin needs no CPU feature.
            _ => unsafe { fold_partials::<Scalar8>(self, p, o) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn prompt_avx512(
    kn: &Kernel,
    t0: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are Zmm's.
    unsafe { prompt_task::<lanes::Zmm, 2, 8, 4, 4>(kn, t0, h_kv, outs, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prompt_avx2(
    kn: &Kernel,
    t0: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are Ymm's.
    unsafe { prompt_task::<lanes::Ymm, 2, 4, 4, 2>(kn, t0, h_kv, outs, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn decode_avx512(kn: &Kernel, h_kv: usize, span: usize, dest: Dest, scratch: &mut Vec<f32>) {
    // SAFETY: this function's features are Zmm's.
    unsafe { decode_task::<lanes::Zmm, 4, 2, 4, 4>(kn, h_kv, span, dest, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_avx2(kn: &Kernel, h_kv: usize, span: usize, dest: Dest, scratch: &mut Vec<f32>) {
    // SAFETY: this function's features are Ymm's.
    unsafe { decode_task::<lanes::Ymm, 2, 4, 4, 2>(kn, h_kv, span, dest, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fold_avx512(kn: &Kernel, p: &[f32], o: &mut [f32]) {
    // SAFETY: this function's features are Zmm's.
    unsafe { fold_partials::<lanes::Zmm>(kn, p, o) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold_avx2(kn: &Kernel, p: &[f32], o: &mut [f32]) {
    // SAFETY: this function's features are Ymm's.
    unsafe { fold_partials::<lanes::Ymm>(kn, p, o) }
}

/// Carve `sizes` f32 buffers out of `scratch` (grown as needed).
fn carve<const N: usize>(scratch: &mut Vec<f32>, sizes: [usize; N]) -> [&mut [f32]; N] {
    let total: usize = sizes.iter().sum();
    if scratch.len() < total {
        scratch.resize(total, 0.0);
    }
    let mut rest = &mut scratch[..total];
    std::array::from_fn(|i| {
        let (a, r) = std::mem::take(&mut rest).split_at_mut(sizes[i]);
        rest = r;
        a
    })
}

#[cfg(test)]
/// Sum of a block's TILE probabilities in one fixed order: the halves folded onto each other
/// (i + 16, then i + 8, ...), which the prompt path computes with vertical vector adds.
#[inline(always)]
fn tree_sum(x: &[f32]) -> f32 {
    let mut b: [f32; TILE] = x[..TILE].try_into().expect("a block of TILE");
    let mut n = TILE;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            b[i] += b[i + n];
        }
    }
    b[0]
}

/// [`tree_sum`] of a block held in `NV` vectors (`NV * L::LANES == TILE`): the vectors'
/// halves added onto each other, then the lanes'.
///
/// # Safety
/// `L`'s features.
#[inline(always)]
unsafe fn block_sum<L: Lanes, const NV: usize>(mut e: [L; NV]) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        let mut n = NV;
        while n > 1 {
            n /= 2;
            for v in 0..n {
                e[v] = L::add(e[v], e[v + n]);
            }
        }
        e[0].fold_sum()
    }
}

/// What the scores are shifted by before `exp`: the running max `m`, or 0 while no key has
/// been seen (m = -inf), so that -inf - -inf never makes a NaN.
#[inline(always)]
fn exp_base(m: f32) -> f32 {
    if m > f32::NEG_INFINITY {
        m
    } else {
        0.0
    }
}

/// Fold span state (m, l, acc) into the running state (rm, rl, racc); `first`: the running
/// state is empty, so it becomes a copy. Both paths fold with this, in span order.
///
/// # Safety
/// `L`'s features; `racc` and `acc` valid for `hdp` f32s, a multiple of `L::LANES`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn merge<L: Lanes>(
    rm: &mut f32,
    rl: &mut f32,
    racc: *mut f32,
    m: f32,
    l: f32,
    acc: *const f32,
    hdp: usize,
    first: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        if first {
            *rm = m;
            *rl = l;
            std::ptr::copy_nonoverlapping(acc, racc, hdp);
            return;
        }
        let mx = rm.max(m);
        let base = exp_base(mx);
        let a = L::exp(L::splat(*rm - base)).first();
        let b = L::exp(L::splat(m - base)).first();
        let (av, bv) = (L::splat(a), L::splat(b));
        for e in (0..hdp).step_by(L::LANES) {
            let r = L::mul(L::load(racc.add(e)), av);
            L::mul_add(L::load(acc.add(e)), bv, r).store(racc.add(e));
        }
        *rl = L::mul_add(L::splat(l), bv, L::splat(*rl * a)).first();
        *rm = mx;
    }
}

/// `o[d] = acc[d] / l`, the last step of every query (0 for a query that saw no key).
#[inline(always)]
fn finish(acc: &[f32], l: f32, o: &mut [f32]) {
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (o, &a) in o.iter_mut().zip(acc) {
        *o = a * inv;
    }
}

/// One decoding token, KV head `h_kv`, keys of span `span`: the group's states into `dest`.
///
/// Tiles: `QD` queries x `NV` vectors of keys (NV * LANES = TILE) for the scores, `QT`
/// queries x `DV` head_dim vectors for `P V`.
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
unsafe fn decode_task<
    L: Lanes,
    const QD: usize,
    const NV: usize,
    const QT: usize,
    const DV: usize,
>(
    kn: &Kernel,
    h_kv: usize,
    span: usize,
    dest: Dest,
    scratch: &mut Vec<f32>,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match kn.kv.head(h_kv) {
            AnyHead::F32(h) => {
                decode_head::<L, _, QD, NV, QT, DV>(kn, h, h_kv, span, dest, scratch)
            }
            AnyHead::F16(h) => {
                decode_head::<L, _, QD, NV, QT, DV>(kn, h, h_kv, span, dest, scratch)
            }
            AnyHead::Q8(h) => decode_head::<L, _, QD, NV, QT, DV>(kn, h, h_kv, span, dest, scratch),
        }
    }
}

/// [`decode_task`] for one head type.
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_head<
    L: Lanes,
    H: Head,
    const QD: usize,
    const NV: usize,
    const QT: usize,
    const DV: usize,
>(
    kn: &Kernel,
    h: H,
    h_kv: usize,
    span: usize,
    dest: Dest,
    scratch: &mut Vec<f32>,
) {
    let s = kn.s;
    let (hd, group) = (s.head_dim, kn.group);
    let nl = L::LANES;
    assert!(NV * nl == TILE);
    let sr = kn.state_row();
    let hdp = hd.next_multiple_of(nl);
    let n_keys = kn.n_keys();
    let keys = span * SPAN..((span + 1) * SPAN).min(n_keys);
    assert!(!keys.is_empty());

    let [qs, sc, corr, st] = carve(scratch, [group * hd, group * TILE, group, group * sr]);
    // The group's queries, scaled (the prompt path's multiply, lane by lane).
    let scale = 1.0 / (hd as f32).sqrt();
    let q0 = h_kv * group * hd;
    for (o, &x) in qs.iter_mut().zip(&kn.q[q0..q0 + group * hd]) {
        *o = x * scale;
    }
    for row in st.chunks_exact_mut(sr) {
        row[0] = f32::NEG_INFINITY;
        row[1..].fill(0.0);
    }

    for t in keys.start / TILE..keys.end.div_ceil(TILE) {
        let start = t * TILE;
        let nvis = (n_keys - start).min(TILE);
        // SAFETY (the whole block): L's features (caller); t < n_tiles (n_keys <= capacity),
        // query rows < group, key vectors < NV, head_dim vectors < hdp / nl <= hdv / nl, and
        // the buffers were carved to these sizes.
        unsafe {
            // Scores, keys in lanes, up to QD queries per pass over the tile (a GQA group
            // of 3 takes one pass of 3, not three of 1).
            let mut i0 = 0;
            while i0 < group {
                let (qs, sp) = (qs.as_ptr(), sc.as_mut_ptr());
                i0 += match (group - i0).min(QD) {
                    n if n >= 4 => {
                        scores_keys::<L, H, 4, NV>(h, t, qs, hd, i0, sp);
                        4
                    }
                    3 => {
                        scores_keys::<L, H, 3, NV>(h, t, qs, hd, i0, sp);
                        3
                    }
                    2 => {
                        scores_keys::<L, H, 2, NV>(h, t, qs, hd, i0, sp);
                        2
                    }
                    _ => {
                        scores_keys::<L, H, 1, NV>(h, t, qs, hd, i0, sp);
                        1
                    }
                };
            }
            // Keys past the token's position (the tile's unwritten end) are masked.
            for row in sc.chunks_exact_mut(TILE) {
                row[nvis..].fill(f32::NEG_INFINITY);
            }
            // Online softmax, per query: the block's max, then every correction exp(m_old -
            // m_new) in one vector pass, then the probabilities and their tree sum, all in
            // vectors (lane-wise exp and max give the prompt path's bits).
            for i in 0..group {
                let row = sc.as_ptr().add(i * TILE);
                let mut mv = L::load(row);
                for v in 1..NV {
                    mv = L::max(mv, L::load(row.add(v * nl)));
                }
                let m_old = st[i * sr];
                let m_new = m_old.max(mv.fold_max());
                st[i * sr] = m_new;
                corr[i] = m_old - exp_base(m_new);
            }
            for c in corr.chunks_mut(nl) {
                let mut lanes = [0.0f32; 16];
                lanes[..c.len()].copy_from_slice(c);
                L::exp(L::load(lanes.as_ptr())).store(lanes.as_mut_ptr());
                c.copy_from_slice(&lanes[..c.len()]);
            }
            for i in 0..group {
                let row = sc.as_mut_ptr().add(i * TILE);
                let bv = L::splat(exp_base(st[i * sr]));
                let mut e = [L::splat(0.0); NV];
                for (v, y) in e.iter_mut().enumerate() {
                    let p = row.add(v * nl);
                    *y = L::exp(L::sub(L::load(p), bv));
                    y.store(p);
                }
                let sum = block_sum(e);
                let l_old = st[i * sr + 1];
                st[i * sr + 1] =
                    L::mul_add(L::splat(l_old), L::splat(corr[i]), L::splat(sum)).first();
            }
            // acc = acc * corr + P V over the keys the token sees, up to QT queries at once.
            let acc = st.as_mut_ptr().add(STATE_HEAD);
            let ndv = hdp / nl;
            let mut q0 = 0;
            while q0 < group {
                let qn = (group - q0).min(QT);
                let vs = HeadV { h, t };
                let mut d0 = 0;
                while d0 < ndv {
                    let whole = d0 + DV <= ndv;
                    pv_n::<L, _, DV>(
                        qn,
                        whole,
                        sc.as_ptr(),
                        1,
                        TILE,
                        vs,
                        0..nvis,
                        acc,
                        sr,
                        corr.as_ptr(),
                        q0,
                        d0,
                    );
                    d0 += if whole { DV } else { 1 };
                }
                q0 += qn;
            }
        }
    }

    match dest {
        Dest::Out(o) => {
            for (i, row) in st.chunks_exact(sr).enumerate() {
                finish(
                    &row[STATE_HEAD..STATE_HEAD + hd],
                    row[1],
                    &mut o[i * hd..(i + 1) * hd],
                );
            }
        }
        Dest::Partial(p) => p.copy_from_slice(st),
    }
}

/// Fold one head's span partials into the output rows (see [`Kernel::fold`]).
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
unsafe fn fold_partials<L: Lanes>(kn: &Kernel, p: &[f32], o: &mut [f32]) {
    let (hd, group) = (kn.s.head_dim, kn.group);
    let sr = kn.state_row();
    let hdp = hd.next_multiple_of(L::LANES);
    let mut acc = [0.0f32; MAX_HEAD_DIM];
    for i in 0..group {
        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0);
        for (span, part) in p.chunks_exact(kn.partial_len()).enumerate() {
            let row = &part[i * sr..(i + 1) * sr];
            // SAFETY: L's features (caller); acc holds MAX_HEAD_DIM >= hdp f32s (hd <=
            // MAX_HEAD_DIM, a multiple of every lane count) and a state row hdp after its head.
            unsafe {
                merge::<L>(
                    &mut m,
                    &mut l,
                    acc.as_mut_ptr(),
                    row[0],
                    row[1],
                    row[STATE_HEAD..].as_ptr(),
                    hdp,
                    span == 0,
                )
            };
        }
        finish(&acc[..hd], l, &mut o[i * hd..(i + 1) * hd]);
    }
}

/// `sc[i][j] = sum_d qs[i][d] * K[j][d]` for the TILE keys of tile `t` and queries
/// i0..i0 + QD (rows of TILE in `sc`, rows of hd in `qs`), d in order from 0.
///
/// # Safety
/// `L`'s features; the ranges in bounds (see the caller).
#[inline(always)]
unsafe fn scores_keys<L: Lanes, H: Head, const QD: usize, const NV: usize>(
    h: H,
    t: usize,
    qs: *const f32,
    hd: usize,
    i0: usize,
    sc: *mut f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let zero = L::splat(0.0);
        let mut a = [[zero; NV]; QD];
        // By blocks of 32 dimensions, which share a Q8_0 scale per key.
        for d0 in (0..hd).step_by(32) {
            let mut scale = [zero; NV];
            for (v, y) in scale.iter_mut().enumerate() {
                *y = h.k_scale::<L>(t, d0 / 32, v);
            }
            for d in d0..(d0 + 32).min(hd) {
                let mut kv = [zero; NV];
                for (v, y) in kv.iter_mut().enumerate() {
                    *y = h.k_scaled::<L>(t, d, v, scale[v]);
                }
                for (i, row) in a.iter_mut().enumerate() {
                    let q = L::splat(*qs.add((i0 + i) * hd + d));
                    for (v, y) in row.iter_mut().enumerate() {
                        *y = L::mul_add(q, kv[v], *y);
                    }
                }
            }
        }
        for (i, row) in a.iter().enumerate() {
            for (v, y) in row.iter().enumerate() {
                y.store(sc.add((i0 + i) * TILE + v * L::LANES));
            }
        }
    }
}

/// Rows of V for [`pv`]: key j's head_dim vector e.
trait VRows: Copy {
    /// # Safety
    /// `L`'s features; j and e in range of the rows.
    unsafe fn row<L: Lanes>(self, j: usize, e: usize) -> L;
}

/// V rows converted to f32 in a buffer of rows of `hdp`.
#[derive(Clone, Copy)]
struct BufV {
    p: *const f32,
    hdp: usize,
}

impl VRows for BufV {
    #[inline(always)]
    unsafe fn row<L: Lanes>(self, j: usize, e: usize) -> L {
        // SAFETY: the caller's contract.
        unsafe { L::load(self.p.add(j * self.hdp + e * L::LANES)) }
    }
}

/// V rows of one tile of a head, read from the cache.
#[derive(Clone, Copy)]
struct HeadV<H> {
    h: H,
    t: usize,
}

impl<H: Head> VRows for HeadV<H> {
    #[inline(always)]
    unsafe fn row<L: Lanes>(self, j: usize, e: usize) -> L {
        // SAFETY: the caller's contract (j < TILE, e within the padded row).
        unsafe { self.h.v::<L>(self.t, j, e) }
    }
}

/// [`pv`] with rescaling for `qn` (1 to 4) queries and DV head_dim vectors (`whole`) or one.
///
/// # Safety
/// As [`pv`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_n<L: Lanes, V: VRows, const DV: usize>(
    qn: usize,
    whole: bool,
    p: *const f32,
    pj: usize,
    pq: usize,
    vs: V,
    keys: Range<usize>,
    acc: *mut f32,
    acc_row: usize,
    corr: *const f32,
    q0: usize,
    d0: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match (qn, whole) {
            (4, true) => pv::<L, V, 4, DV>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (3, true) => pv::<L, V, 3, DV>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (2, true) => pv::<L, V, 2, DV>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (1, true) => pv::<L, V, 1, DV>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (4, false) => pv::<L, V, 4, 1>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (3, false) => pv::<L, V, 3, 1>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            (2, false) => pv::<L, V, 2, 1>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
            _ => pv::<L, V, 1, 1>(p, pj, pq, vs, keys, true, acc, acc_row, corr, q0, d0),
        }
    }
}

/// One prompt task (see [`Kernel::prompt`]) with vector type `L`. Tiles: `QV` query vectors x
/// `KJ` keys for the scores, `QT` queries x `DV` head_dim vectors for `P V`.
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
unsafe fn prompt_task<
    L: Lanes,
    const QV: usize,
    const KJ: usize,
    const QT: usize,
    const DV: usize,
>(
    kn: &Kernel,
    t0: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match kn.kv.head(h_kv) {
            AnyHead::F32(h) => prompt_head::<L, _, QV, KJ, QT, DV>(kn, h, t0, h_kv, outs, scratch),
            AnyHead::F16(h) => prompt_head::<L, _, QV, KJ, QT, DV>(kn, h, t0, h_kv, outs, scratch),
            AnyHead::Q8(h) => prompt_head::<L, _, QV, KJ, QT, DV>(kn, h, t0, h_kv, outs, scratch),
        }
    }
}

/// [`prompt_task`] for one head type.
///
/// # Safety
/// `L`'s CPU features must be present.
#[inline(always)]
unsafe fn prompt_head<
    L: Lanes,
    H: Head,
    const QV: usize,
    const KJ: usize,
    const QT: usize,
    const DV: usize,
>(
    kn: &Kernel,
    h: H,
    t0: usize,
    h_kv: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) {
    let s = kn.s;
    let (hd, group) = (s.head_dim, kn.group);
    let nl = L::LANES;
    let n_t = outs.len();
    let nq = n_t * group;
    let nqp = nq.next_multiple_of(nl);
    let hdp = hd.next_multiple_of(nl);

    // Scratch: transposed scaled queries, positions, the span's max/sum/correction, scores,
    // accumulators, converted K (transposed) and V rows, the folded state (max, sum, acc).
    let [qt, pos, m, l, corr, sc, acc, kb, vb, mr, lr, accr] = carve(
        scratch,
        [
            hd * nqp,
            nqp,
            nqp,
            nqp,
            nqp,
            TILE * nqp,
            nqp * hdp,
            hd * TILE,
            TILE * hdp,
            nqp,
            nqp,
            nqp * hdp,
        ],
    );

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
    kb.fill(0.0);
    vb.fill(0.0);

    let n_keys = s.pos0 + t0 + n_t;
    let first_pos = s.pos0 + t0;
    for span_start in (0..n_keys).step_by(SPAN) {
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        for start in (span_start..(span_start + SPAN).min(n_keys)).step_by(TILE) {
            let t = start / TILE;
            let nb = (n_keys - start).min(TILE);
            // SAFETY (the whole block): L's features are present (caller); t < n_tiles; every
            // pointer below stays inside its buffer: qt has hd rows of nqp, sc TILE rows of
            // nqp, kb hd rows of TILE, vb TILE rows of hdp, acc nqp rows of hdp, and the loops
            // keep query vectors < nqp / nl, keys < TILE, queries < nq <= nqp and head_dim
            // vectors < hdp / nl.
            unsafe {
                // This block's K (transposed, as stored) and V rows, as f32.
                for d in 0..hd {
                    for v in 0..TILE / nl {
                        h.k::<L>(t, d, v)
                            .store(kb.as_mut_ptr().add(d * TILE + v * nl));
                    }
                }
                for j in 0..nb {
                    for e in 0..hdp / nl {
                        h.v::<L>(t, j, e)
                            .store(vb.as_mut_ptr().add(j * hdp + e * nl));
                    }
                }
                let nbk = nb.next_multiple_of(KJ);
                // Scores.
                let nv = nqp / nl;
                // The last real query of vectors ..v sees keys up to this position (queries
                // are in token order); a tile whose first key is past it is fully masked and
                // skipped (the mask below overwrites whatever its scores hold).
                let last_pos = |v: usize| pos[(v * nl).min(nq) - 1] as usize;
                for j0 in (0..nbk).step_by(KJ) {
                    let mut v0 = 0;
                    while v0 + QV <= nv {
                        if start + j0 <= last_pos(v0 + QV) {
                            scores::<L, QV, KJ>(qt, nqp, hd, kb, sc, v0, j0);
                        }
                        v0 += QV;
                    }
                    while v0 < nv {
                        if start + j0 <= last_pos(v0 + 1) {
                            scores::<L, 1, KJ>(qt, nqp, hd, kb, sc, v0, j0);
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
                // Keys past the last token (the tile's unwritten end) count as probability 0.
                sc[nb * nqp..].fill(0.0);
                // Online softmax, lane i = query i.
                for v0 in 0..nv {
                    let o = v0 * nl;
                    let mut mx = L::splat(f32::NEG_INFINITY);
                    for j in 0..nb {
                        mx = L::max(mx, L::load(sc.as_ptr().add(j * nqp + o)));
                    }
                    let m_old = L::load(m.as_ptr().add(o));
                    let m_new = L::max(m_old, mx);
                    // A query that has seen only masked keys keeps -inf: subtract 0 instead,
                    // so its probabilities are exp(-inf) = 0, not NaN.
                    let neg = L::splat(f32::NEG_INFINITY);
                    let base = L::select_gt(m_new, neg, m_new, L::splat(0.0));
                    let c = L::exp(L::sub(m_old, base));
                    for j in 0..nb {
                        let p = sc.as_mut_ptr().add(j * nqp + o);
                        L::exp(L::sub(L::load(p), base)).store(p);
                    }
                    // The block's sum in tree_sum's order.
                    let mut part = [L::splat(0.0); TILE / 2];
                    for (i, y) in part.iter_mut().enumerate() {
                        let a = L::load(sc.as_ptr().add(i * nqp + o));
                        let b = L::load(sc.as_ptr().add((i + TILE / 2) * nqp + o));
                        *y = L::add(a, b);
                    }
                    let mut n = TILE / 2;
                    while n > 1 {
                        n /= 2;
                        for i in 0..n {
                            part[i] = L::add(part[i], part[i + n]);
                        }
                    }
                    let l_old = L::load(l.as_ptr().add(o));
                    L::mul_add(l_old, c, part[0]).store(l.as_mut_ptr().add(o));
                    m_new.store(m.as_mut_ptr().add(o));
                    c.store(corr.as_mut_ptr().add(o));
                }
                // acc = acc * corr + P V, each query over the keys it sees: a masked key never
                // enters, not even with probability 0, since 0 * inf is NaN and a non-finite
                // value in V would then change a result that, fed token by token, never reads
                // that key.
                let ndv = hdp / nl;
                let seen = |q: usize| nb.min((pos[q] as usize + 1).saturating_sub(start));
                let vs = BufV {
                    p: vb.as_ptr(),
                    hdp,
                };
                let (p, accp, cp) = (sc.as_ptr(), acc.as_mut_ptr(), corr.as_ptr());
                let mut q0 = 0;
                while q0 < nq {
                    let qt_n = (nq - q0).min(QT);
                    // Queries are in token order: the tile's first sees the fewest keys. The
                    // tile takes those, then each query its own rest; the store and reload
                    // between the two loops is exact, so every query adds its keys in one
                    // order either way.
                    let common = seen(q0);
                    let mut d0 = 0;
                    while d0 < ndv {
                        let dn = (ndv - d0).min(DV);
                        if qt_n == QT && dn == DV {
                            pv::<L, _, QT, DV>(
                                p,
                                nqp,
                                1,
                                vs,
                                0..common,
                                true,
                                accp,
                                hdp,
                                cp,
                                q0,
                                d0,
                            );
                            for q in q0 + 1..q0 + QT {
                                let keys = common..seen(q);
                                if !keys.is_empty() {
                                    pv::<L, _, 1, DV>(
                                        p, nqp, 1, vs, keys, false, accp, hdp, cp, q, d0,
                                    );
                                }
                            }
                        } else {
                            for q in q0..q0 + qt_n {
                                for d in d0..d0 + dn {
                                    let keys = 0..seen(q);
                                    pv::<L, _, 1, 1>(
                                        p, nqp, 1, vs, keys, true, accp, hdp, cp, q, d,
                                    );
                                }
                            }
                        }
                        d0 += dn;
                    }
                    q0 += qt_n;
                }
            }
        }
        // Fold the span into each query that reaches it.
        for q in 0..nq {
            if pos[q] as usize >= span_start {
                // SAFETY: L's features (caller); acc and accr rows are hdp long.
                unsafe {
                    merge::<L>(
                        &mut mr[q],
                        &mut lr[q],
                        accr.as_mut_ptr().add(q * hdp),
                        m[q],
                        l[q],
                        acc.as_ptr().add(q * hdp),
                        hdp,
                        span_start == 0,
                    )
                };
            }
        }
    }

    for i in 0..nq {
        let (t, g) = (i / group, i % group);
        finish(
            &accr[i * hdp..i * hdp + hd],
            lr[i],
            &mut outs[t][g * hd..(g + 1) * hd],
        );
    }
}

/// `sc[j][v] = sum_d qt[d][v] * kb[d][j]` for keys j0..j0 + KJ and query vectors v0..v0 + QV.
///
/// # Safety
/// `L`'s features; the ranges in bounds of the buffers (see the caller).
#[inline(always)]
unsafe fn scores<L: Lanes, const QV: usize, const KJ: usize>(
    qt: &[f32],
    nqp: usize,
    hd: usize,
    kb: &[f32],
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
        let kp = kb.as_ptr().add(j0);
        for d in 0..hd {
            let mut qv = [zero; QV];
            for (x, y) in qv.iter_mut().enumerate() {
                *y = L::load(qp.add(d * nqp + x * nl));
            }
            for (b, row) in a.iter_mut().enumerate() {
                let k = L::splat(*kp.add(d * TILE + b));
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

/// `acc[q] = acc[q] * corr[q] + sum_{j in keys} p[j][q] V[j]` for queries q0..q0 + QT and
/// head_dim vectors d0..d0 + DV, in key order; without the `* corr[q]` when `rescale` is false
/// (a query's second range of keys in the same block). `p[j][q]` is at `p + j * pj + q * pq`,
/// query q's accumulator at `acc + q * acc_row`.
///
/// # Safety
/// `L`'s features; the ranges in bounds of the buffers (see the caller).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<L: Lanes, V: VRows, const QT: usize, const DV: usize>(
    p: *const f32,
    pj: usize,
    pq: usize,
    vs: V,
    keys: Range<usize>,
    rescale: bool,
    acc: *mut f32,
    acc_row: usize,
    corr: *const f32,
    q0: usize,
    d0: usize,
) {
    let nl = L::LANES;
    // SAFETY: the caller's contract.
    unsafe {
        let zero = L::splat(0.0);
        let mut a = [[zero; DV]; QT];
        let ap = acc.add(q0 * acc_row + d0 * nl);
        for (i, row) in a.iter_mut().enumerate() {
            let c = L::splat(*corr.add(q0 + i));
            for (e, y) in row.iter_mut().enumerate() {
                let x = L::load(ap.add(i * acc_row + e * nl));
                *y = if rescale { L::mul(x, c) } else { x };
            }
        }
        let pp = p.add(q0 * pq);
        for j in keys {
            let mut vv = [zero; DV];
            for (e, y) in vv.iter_mut().enumerate() {
                *y = vs.row::<L>(j, d0 + e);
            }
            for (i, row) in a.iter_mut().enumerate() {
                let w = L::splat(*pp.add(j * pj + i * pq));
                for (e, y) in row.iter_mut().enumerate() {
                    *y = L::mul_add(w, vv[e], *y);
                }
            }
        }
        for (i, row) in a.iter().enumerate() {
            for (e, y) in row.iter().enumerate() {
                y.store(ap.add(i * acc_row + e * nl));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain two-pass softmax attention in f64, the definition. `k`, `v`: rows of
    /// n_head_kv * head_dim.
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

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A one-layer store of `ty` holding rows of K and V (n_head_kv * head_dim each), and
    /// the values it holds (rounded to f16, or quantized), as rows again.
    fn store(
        ty: KvType,
        n_head_kv: usize,
        hd: usize,
        k: &[f32],
        v: &[f32],
    ) -> (KvStore, Vec<f32>, Vec<f32>) {
        let kvd = n_head_kv * hd;
        let rows = k.len() / kvd;
        let mut st = KvStore::new(ty, 1, n_head_kv, hd, rows);
        for p in 0..rows {
            st.write(0, p, &k[p * kvd..][..kvd], &v[p * kvd..][..kvd]);
        }
        let (mut ks, mut vs) = (vec![], vec![]);
        let layer = st.layer(0);
        for p in 0..rows {
            for h in 0..n_head_kv {
                let (kr, vr) = layer.get(h, p);
                ks.extend(kr);
                vs.extend(vr);
            }
        }
        (st, ks, vs)
    }

    fn types_for(hd: usize) -> Vec<KvType> {
        KvType::ALL
            .into_iter()
            .filter(|t| t.fits_head_dim(hd))
            .collect()
    }

    /// Every available path (the portable twin included) and every cache type against the
    /// f64 definition over the values the cache holds.
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
            for ty in types_for(hd) {
                let (st, kr, vr) = store(ty, n_head_kv, hd, &k, &v);
                let want = naive(s, n, &q, &kr, &vr);
                for path in SimdPath::available() {
                    let mut got = vec![0.0; want.len()];
                    attention_with(path, s, &q, st.layer(0), &mut got);
                    let d = max_diff(&want, &got);
                    assert!(
                        d < 1e-5,
                        "{path} {ty:?} {n_head}/{n_head_kv} n {n} pos0 {pos0} hd {hd}: {d}"
                    );
                }
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
        // vector width, a group of one (MHA) and a group of 8; contexts over several spans
        // (256), decoding and prompting.
        check_all_paths(9, 3, &[(1, 0, 64), (1, 200, 64), (97, 0, 64), (45, 37, 64)]);
        check_all_paths(9, 3, &[(1, 700, 64), (40, 500, 64)]);
        check_all_paths(32, 8, &[(1, 150, 128), (33, 3, 128), (1, 600, 128)]);
        check_all_paths(4, 4, &[(19, 5, 24), (2, 63, 40), (1, 31, 12), (1, 300, 40)]);
        check_all_paths(8, 1, &[(150, 0, 16), (1, 64, 8)]);
    }

    #[test]
    fn prompt_whole_equals_token_by_token() {
        // The decode path (one token, keys in lanes, spans as separate tasks) and the prompt
        // path (queries in lanes, spans folded in the task) agree bit for bit, over contexts
        // that cross span boundaries, on every path and cache type. Decoded again one by one:
        // the first 40 tokens, the last tile's worth, and a tile's worth on each side of each
        // span boundary, so every place in a tile on both sides of a boundary (decoding all
        // 530 of the longest context was most of the aarch64 run under qemu).
        let checked = |t: usize, n: usize| {
            let near_boundary = t >= SPAN - TILE && (t + TILE) % SPAN < 2 * TILE;
            t < 40 || t + TILE >= n || near_boundary
        };
        for (n_head, n_head_kv, hd, n) in [
            (9, 3, 64, 75),
            (9, 3, 64, 530),
            (8, 2, 32, 300),
            (6, 6, 24, 280),
        ] {
            let s = AttentionShape {
                n_head,
                n_head_kv,
                head_dim: hd,
                pos0: 0,
            };
            let (row, kvd) = (n_head * hd, n_head_kv * hd);
            let q = rand_vec(n * row, 4, 2.0);
            let k = rand_vec(n * kvd, 5, 6.0);
            let v = rand_vec(n * kvd, 6, 1.0);
            for ty in types_for(hd) {
                let (st, _, _) = store(ty, n_head_kv, hd, &k, &v);
                for path in SimdPath::available() {
                    let mut whole = vec![0.0; n * row];
                    attention_with(path, s, &q, st.layer(0), &mut whole);
                    for t in (0..n).filter(|&t| checked(t, n)) {
                        let mut one = vec![0.0; row];
                        let st1 = AttentionShape { pos0: t, ..s };
                        let qt = &q[t * row..(t + 1) * row];
                        attention_with(path, st1, qt, st.layer(0), &mut one);
                        assert!(
                            same_bits(&one, &whole[t * row..(t + 1) * row]),
                            "{path} {ty:?} {n_head}/{n_head_kv} hd {hd}: token {t} differs"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn decoding_gives_the_same_bits_on_any_thread_count() {
        // A decoding token's spans run as separate tasks: one thread or three, the folds
        // happen in span order, so the bits do not move.
        let (n_head, n_head_kv, hd, pos0) = (9, 3, 64, 1000);
        let s = AttentionShape {
            n_head,
            n_head_kv,
            head_dim: hd,
            pos0,
        };
        let kvd = n_head_kv * hd;
        let q = rand_vec(n_head * hd, 30, 2.0);
        let k = rand_vec((pos0 + 1) * kvd, 31, 6.0);
        let v = rand_vec((pos0 + 1) * kvd, 32, 1.0);
        for ty in types_for(hd) {
            let (st, _, _) = store(ty, n_head_kv, hd, &k, &v);
            for path in SimdPath::available() {
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![0.0; n_head * hd];
                    pool.install(|| attention_with(path, s, &q, st.layer(0), &mut out));
                    out
                };
                let one = run(1);
                assert!(same_bits(&one, &run(3)), "{path} {ty:?}");
                assert!(same_bits(&one, &run(2)), "{path} {ty:?}");
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
            for ty in KvType::ALL {
                let (st, _, _) = store(ty, n_head_kv, hd, &k, &v);
                for path in SimdPath::available() {
                    let mut whole = vec![0.0; n * row];
                    attention_with(path, s, &q, st.layer(0), &mut whole);
                    for t in 0..poisoned - pos0 {
                        let mut one = vec![0.0; row];
                        let st1 = AttentionShape {
                            pos0: pos0 + t,
                            ..s
                        };
                        let qt = &q[t * row..(t + 1) * row];
                        attention_with(path, st1, qt, st.layer(0), &mut one);
                        let got = &whole[t * row..(t + 1) * row];
                        assert!(
                            got.iter().all(|x| x.is_finite()),
                            "{path} {ty:?} pos0 {pos0} t {t}"
                        );
                        assert!(
                            same_bits(&one, got),
                            "{path} {ty:?} pos0 {pos0} token {t} differs from token by token"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_batch_of_sequences_gives_each_the_bits_it_gets_alone() {
        // Decoding sequences at several depths (some over several spans) and prompt chunks,
        // in one parallel region.
        let (n_head, n_head_kv, hd) = (9, 3, 64);
        let row = n_head * hd;
        let kvd = n_head_kv * hd;
        let seqs = [
            (1, 0),
            (1, 70),
            (40, 0),
            (1, 33),
            (17, 90),
            (0, 5),
            (1, 600),
            (30, 280),
        ];
        for ty in KvType::ALL {
            let data: Vec<_> = seqs
                .iter()
                .enumerate()
                .map(|(i, &(n, pos0))| {
                    let seed = 20 + 3 * i as u32;
                    let q = rand_vec(n * row, seed, 2.0);
                    let k = rand_vec((pos0 + n) * kvd, seed + 1, 6.0);
                    let v = rand_vec((pos0 + n) * kvd, seed + 2, 1.0);
                    let (st, _, _) = store(ty, n_head_kv, hd, &k, &v);
                    (n, pos0, q, st)
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
                    .map(|(n, pos0, q, st)| {
                        let mut out = vec![0.0; n * row];
                        attention_with(path, shape(*pos0), q, st.layer(0), &mut out);
                        out
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = data.iter().map(|d| vec![0.0; d.0 * row]).collect();
                let mut jobs: Vec<AttentionJob> = data
                    .iter()
                    .zip(&mut outs)
                    .map(|((_, pos0, q, st), out)| AttentionJob {
                        shape: shape(*pos0),
                        q,
                        kv: st.layer(0),
                        out,
                    })
                    .collect();
                attention_batch_with(path, &mut jobs);
                for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
                    assert!(
                        same_bits(a, b),
                        "{path} {ty:?}: sequence {i} differs in a batch"
                    );
                }
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
        let k = rand_vec((300 + n) * kvd, 8, 6.0);
        let v = rand_vec((300 + n) * kvd, 9, 1.0);
        for ty in KvType::ALL {
            let (st, _, _) = store(ty, 8, 128, &k, &v);
            for (qs, pos0) in [(&q[..], 300), (&q[..32 * 128], 319)] {
                let s = AttentionShape { pos0, ..s };
                let mut want = vec![0.0; qs.len()];
                attention_with(SimdPath::Scalar, s, qs, st.layer(0), &mut want);
                for path in SimdPath::available() {
                    let mut got = vec![0.0; qs.len()];
                    attention_with(path, s, qs, st.layer(0), &mut got);
                    let d = max_diff(&want, &got);
                    assert!(d < 1e-5, "{path} {ty:?} pos0 {pos0}: {d}");
                }
            }
        }
    }

    #[test]
    fn a_copied_prefix_holds_the_source_positions_in_every_layer_and_head() {
        // Two layers, 3 heads, 70 positions (a partial third tile); the copy of the first 45
        // goes into stores of other capacities (tile offsets per head differ), of the same
        // type (bit for bit) and of another (rounded as a write of the values would be).
        let (layers, nh, hd, rows) = (2, 3, 64, 70);
        let kvd = nh * hd;
        let k = rand_vec(layers * rows * kvd, 50, 4.0);
        let v = rand_vec(layers * rows * kvd, 51, 1.0);
        let at = |li: usize, p: usize| (li * rows + p) * kvd;
        let mut src = KvStore::new(KvType::F16, layers, nh, hd, rows);
        for li in 0..layers {
            for p in 0..rows {
                src.write(li, p, &k[at(li, p)..][..kvd], &v[at(li, p)..][..kvd]);
            }
        }
        let n = 45;
        for (ty, cap) in [
            (KvType::F16, 200),
            (KvType::F16, 45),
            (KvType::F32, 96),
            (KvType::Q8_0, 64),
        ] {
            let mut dst = KvStore::new(ty, layers, nh, hd, cap);
            // Something else first, so stale values would show.
            for li in 0..layers {
                for p in 0..n {
                    dst.write(li, p, &vec![9.0; kvd], &vec![-9.0; kvd]);
                }
            }
            dst.copy_prefix_from(&src, n);
            // What writing the source's (f16) values straight into this type would hold.
            let mut want = KvStore::new(ty, layers, nh, hd, cap);
            for li in 0..layers {
                for p in 0..n {
                    let (mut kr, mut vr) = (vec![], vec![]);
                    for h in 0..nh {
                        let (a, b) = src.layer(li).get(h, p);
                        kr.extend(a);
                        vr.extend(b);
                    }
                    want.write(li, p, &kr, &vr);
                }
            }
            for li in 0..layers {
                for p in 0..n {
                    for h in 0..nh {
                        let (gk, gv) = dst.layer(li).get(h, p);
                        let (wk, wv) = want.layer(li).get(h, p);
                        assert!(
                            same_bits(&gk, &wk) && same_bits(&gv, &wv),
                            "{ty:?} {li} {p} {h}"
                        );
                    }
                }
            }
        }
    }

    /// [`block_sum`] and a block's max on `L`, from 32 values.
    ///
    /// # Safety
    /// `L`'s features.
    #[inline(always)]
    unsafe fn sum_max<L: Lanes, const NV: usize>(x: &[f32; TILE]) -> (f32, f32) {
        // SAFETY: the caller's contract; x holds NV * LANES values.
        unsafe {
            let e: [L; NV] = std::array::from_fn(|v| L::load(x.as_ptr().add(v * L::LANES)));
            let mut m = e[0];
            for y in &e[1..] {
                m = L::max(m, *y);
            }
            (block_sum(e), m.fold_max())
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn sum_max_zmm(x: &[f32; TILE]) -> (f32, f32) {
        // SAFETY: this function's features are Zmm's.
        unsafe { sum_max::<lanes::Zmm, 2>(x) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_max_ymm(x: &[f32; TILE]) -> (f32, f32) {
        // SAFETY: this function's features are Ymm's.
        unsafe { sum_max::<lanes::Ymm, 4>(x) }
    }

    /// The decode path sums a block's probabilities in vectors; the prompt path relies on the
    /// order of `tree_sum` (values of mixed magnitude make any other order round differently).
    #[test]
    fn vector_block_sums_and_maxes_keep_the_tree_order() {
        let mut rng = 0x2545_f491u32;
        let mut mismatched_naive = 0;
        for _ in 0..2000 {
            let x: [f32; TILE] = std::array::from_fn(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                let m = (rng >> 8) as f32 / (1u32 << 24) as f32;
                m * [1.0, 1e-3, 3e4, 0.5][(rng & 3) as usize]
            });
            let want = (
                tree_sum(&x),
                x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
            );
            let naive: f32 = x.iter().sum();
            mismatched_naive += (naive.to_bits() != want.0.to_bits()) as usize;
            // SAFETY: Scalar8 needs no features.
            let got = unsafe { sum_max::<Scalar8, 4>(&x) };
            assert_eq!(
                (got.0.to_bits(), got.1.to_bits()),
                (want.0.to_bits(), want.1.to_bits())
            );
            #[cfg(target_arch = "x86_64")]
            {
                if SimdPath::Avx2.is_available() {
                    // SAFETY: AVX2, FMA and F16C were detected.
                    let got = unsafe { sum_max_ymm(&x) };
                    assert_eq!(got.0.to_bits(), want.0.to_bits());
                    assert_eq!(got.1.to_bits(), want.1.to_bits());
                }
                if SimdPath::Avx512.is_available() {
                    // SAFETY: AVX-512F and the AVX2 set were detected.
                    let got = unsafe { sum_max_zmm(&x) };
                    assert_eq!(got.0.to_bits(), want.0.to_bits());
                    assert_eq!(got.1.to_bits(), want.1.to_bits());
                }
            }
        }
        // The data would expose a wrong order: a plain left-to-right sum differs often.
        assert!(
            mismatched_naive > 100,
            "only {mismatched_naive} of 2000 differ"
        );
    }

    #[test]
    fn q8_0_cache_holds_ggml_blocks() {
        // Each position's head row, read back, is ggml's Q8_0 quantization of it dequantized
        // (the reference codec in quant/), and the store takes the bytes it claims.
        let (n_head_kv, hd, rows) = (3, 64, 45);
        let kvd = n_head_kv * hd;
        let k = rand_vec(rows * kvd, 40, 6.0);
        let v = rand_vec(rows * kvd, 41, 1.0);
        let (st, kr, vr) = store(KvType::Q8_0, n_head_kv, hd, &k, &v);
        let roundtrip = |x: &[f32]| {
            let mut blocks = vec![
                crate::quant::BlockQ8_0 {
                    d: [0; 2],
                    qs: [0; 32]
                };
                x.len() / 32
            ];
            crate::quant::quantize_row_q8_0(x, &mut blocks);
            let mut y = vec![0.0; x.len()];
            crate::quant::dequantize_row_q8_0(&blocks, &mut y);
            y
        };
        assert_eq!(kr, roundtrip(&k));
        assert_eq!(vr, roundtrip(&v));
        assert_ne!(
            kr, k,
            "quantization changed nothing: the test would not see a bypass"
        );
        // 64 positions (whole tiles of 32), per head 64 + 64 i8 and 2 + 2 f16 scales; f16
        // takes 2 bytes a value.
        assert_eq!(st.bytes(), 64 * 3 * (128 + 8));
        assert_eq!(KvStore::bytes_for(KvType::F16, 1, 3, 64, 45), 64 * 3 * 256);
    }
}
