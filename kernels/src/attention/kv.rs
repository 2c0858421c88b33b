//! The KV cache's storage: per layer, per KV head, positions in tiles of [`TILE`], so one
//! head's keys and values are one contiguous stream (a decode step reads them front to back,
//! which the hardware prefetchers follow) and a tile is exactly one block of the online
//! softmax.
//!
//! Inside a tile, K is stored transposed (`[head_dim][TILE]`: dimension-major, one row per
//! dimension with a lane per position) so a decode step scores a vector of keys at a time
//! with every lane busy, whatever the GQA group; V is stored row-major (`[TILE][head_dim]`,
//! rows padded to 16 values) since `P V` is vectorised over the head dimension.
//!
//! Element types, as llama.cpp's `-ctk/-ctv`: f32, f16, or Q8_0 (ggml's block: 32 values of
//! one position and head share an f16 scale `d`, value = `d * q` with `q` an i8, quantized as
//! `quantize_row_q8_0_ref`). A Q8_0 tile keeps its i8s in the same order as the float types
//! and the scales beside them (`[head_dim / 32][TILE]` for K, `[TILE][head_dim / 32]` for V).
//! Dequantising is exact in f32 (an f16 times an i8 fits a 24-bit mantissa), so attention over
//! a Q8_0 cache equals attention over its dequantised values, bit for bit.

use half::f16;

use crate::quant::q8_0::{quantize_block_q8_0, QK8_0};

/// Positions per tile, and keys per block of the online softmax.
pub const TILE: usize = 32;

/// V rows are padded to a multiple of this many values (the widest vector), so a vector load
/// of the last dimensions never reads the next position's row.
const V_ALIGN: usize = 16;

/// The element type of the K and V cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvType {
    F32,
    F16,
    /// ggml's Q8_0 blocks of 32 values along the head dimension: about half of f16's bytes.
    Q8_0,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    /// The name llama.cpp gives the type (`-ctk`, `type_k` in llama-bench's JSON).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    pub fn from_name(name: &str) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether heads of `head_dim` values can be stored: Q8_0 needs whole blocks of 32.
    pub fn fits_head_dim(self, head_dim: usize) -> bool {
        match self {
            KvType::F32 | KvType::F16 => head_dim > 0,
            KvType::Q8_0 => head_dim > 0 && head_dim.is_multiple_of(QK8_0),
        }
    }

    /// Bytes K and V take per position and KV head of `head_dim` values (V's row padding
    /// included).
    pub fn head_position_bytes(self, head_dim: usize) -> u64 {
        // In u64 from the start: head_dim may come from an unchecked header.
        let hd = head_dim as u64;
        let hdv = hd.next_multiple_of(V_ALIGN as u64);
        match self {
            KvType::F32 => 4 * (hd + hdv),
            KvType::F16 => 2 * (hd + hdv),
            // i8 values plus one f16 scale per 32, for K and for V.
            KvType::Q8_0 => 2 * (hd + 2 * (hd / QK8_0 as u64)),
        }
    }
}

/// Values of K or V for every tile, one vector per type.
enum Vals {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// i8 values and f16 scales.
    Q8_0(Vec<i8>, Vec<f16>),
}

impl Vals {
    fn new(ty: KvType, values: usize, scales: usize) -> Self {
        match ty {
            KvType::F32 => Vals::F32(vec![0.0; values]),
            KvType::F16 => Vals::F16(vec![f16::ZERO; values]),
            KvType::Q8_0 => Vals::Q8_0(vec![0; values], vec![f16::ZERO; scales]),
        }
    }

    fn slice(&self, values: std::ops::Range<usize>, scales: std::ops::Range<usize>) -> ValsRef<'_> {
        match self {
            Vals::F32(v) => ValsRef::F32(&v[values]),
            Vals::F16(v) => ValsRef::F16(&v[values]),
            Vals::Q8_0(q, d) => ValsRef::Q8_0(&q[values], &d[scales]),
        }
    }
}

/// One layer's K or V values, borrowed.
#[derive(Clone, Copy)]
pub(crate) enum ValsRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8_0(&'a [i8], &'a [f16]),
}

/// The K and V of every layer of one sequence, `capacity()` positions (the context size
/// rounded up to whole tiles).
pub struct KvStore {
    ty: KvType,
    n_layers: usize,
    n_head_kv: usize,
    head_dim: usize,
    /// V row length: head_dim padded to [`V_ALIGN`].
    hdv: usize,
    n_tiles: usize,
    k: Vals,
    v: Vals,
}

impl KvStore {
    /// A zeroed store for `n_ctx` positions of `n_layers` layers of `n_head_kv` heads.
    ///
    /// # Panics
    /// When `ty` cannot store heads of `head_dim` ([`KvType::fits_head_dim`]) or `head_dim`
    /// is above [`super::MAX_HEAD_DIM`]: a caller checks the model before (the loader does).
    pub fn new(
        ty: KvType,
        n_layers: usize,
        n_head_kv: usize,
        head_dim: usize,
        n_ctx: usize,
    ) -> Self {
        assert!(
            ty.fits_head_dim(head_dim) && head_dim <= super::MAX_HEAD_DIM,
            "KV type {} cannot store heads of {head_dim}",
            ty.name()
        );
        let n_tiles = n_ctx.div_ceil(TILE);
        let hdv = head_dim.next_multiple_of(V_ALIGN);
        let tiles = n_layers * n_head_kv * n_tiles;
        let scales = tiles * TILE * (head_dim / QK8_0);
        KvStore {
            ty,
            n_layers,
            n_head_kv,
            head_dim,
            hdv,
            n_tiles,
            k: Vals::new(ty, tiles * TILE * head_dim, scales),
            v: Vals::new(ty, tiles * TILE * hdv, scales),
        }
    }

    /// Bytes [`KvStore::new`] allocates for these arguments.
    pub fn bytes_for(
        ty: KvType,
        n_layers: usize,
        n_head_kv: usize,
        head_dim: usize,
        n_ctx: usize,
    ) -> u64 {
        // Saturating: a count no machine holds (from a hostile header) must compare as huge
        // in a memory check, not wrap to small.
        let positions = n_ctx.div_ceil(TILE) as u64 * TILE as u64;
        [n_layers as u64, n_head_kv as u64, positions]
            .iter()
            .fold(ty.head_position_bytes(head_dim), |acc, &x| {
                acc.saturating_mul(x)
            })
    }

    pub fn ty(&self) -> KvType {
        self.ty
    }

    /// (layers, KV heads, head size).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.n_layers, self.n_head_kv, self.head_dim)
    }

    /// Positions the store holds (the context size rounded up to a whole tile).
    pub fn capacity(&self) -> usize {
        self.n_tiles * TILE
    }

    pub fn bytes(&self) -> u64 {
        Self::bytes_for(
            self.ty,
            self.n_layers,
            self.n_head_kv,
            self.head_dim,
            self.capacity(),
        )
    }

    /// Store position `pos`'s keys and values of layer `layer`: `k` and `v` hold n_head_kv
    /// heads of head_dim values each.
    ///
    /// # Panics
    /// On a layer or position out of range, or wrong lengths (a caller's bug).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (hd, hdv) = (self.head_dim, self.hdv);
        assert!(layer < self.n_layers && pos < self.capacity());
        assert!(k.len() == self.n_head_kv * hd && v.len() == k.len());
        let (tile, lane) = (pos / TILE, pos % TILE);
        let nb = hd / QK8_0;
        for h in 0..self.n_head_kv {
            let t = (layer * self.n_head_kv + h) * self.n_tiles + tile;
            let (kh, vh) = (&k[h * hd..][..hd], &v[h * hd..][..hd]);
            // K: column `lane` of [hd][TILE]; V: row `lane` of [TILE][hdv].
            let kat = |d: usize| t * TILE * hd + d * TILE + lane;
            let vat = t * TILE * hdv + lane * hdv;
            match (&mut self.k, &mut self.v) {
                (Vals::F32(ks), Vals::F32(vs)) => {
                    for (d, &x) in kh.iter().enumerate() {
                        ks[kat(d)] = x;
                    }
                    vs[vat..vat + hd].copy_from_slice(vh);
                }
                (Vals::F16(ks), Vals::F16(vs)) => {
                    for (d, &x) in kh.iter().enumerate() {
                        ks[kat(d)] = f16::from_f32(x);
                    }
                    for (o, &x) in vs[vat..vat + hd].iter_mut().zip(vh) {
                        *o = f16::from_f32(x);
                    }
                }
                (Vals::Q8_0(kq, kd), Vals::Q8_0(vq, vd)) => {
                    for b in 0..nb {
                        let blk = quantize_block_q8_0(kh[b * QK8_0..][..QK8_0].try_into().unwrap());
                        kd[t * TILE * nb + b * TILE + lane] = f16::from_le_bytes(blk.d);
                        for (i, &q) in blk.qs.iter().enumerate() {
                            kq[kat(b * QK8_0 + i)] = q;
                        }
                        let blk = quantize_block_q8_0(vh[b * QK8_0..][..QK8_0].try_into().unwrap());
                        vd[t * TILE * nb + lane * nb + b] = f16::from_le_bytes(blk.d);
                        vq[vat + b * QK8_0..][..QK8_0].copy_from_slice(&blk.qs);
                    }
                }
                _ => unreachable!("K and V are built with the same type"),
            }
        }
    }

    /// Make positions 0..n hold `src`'s positions 0..n, in every layer and head. Of one type,
    /// whole tiles are copied (exact); across types each position is read as f32 and written
    /// again (rounded to this store's type).
    ///
    /// # Panics
    /// When the shapes differ or `n` exceeds either capacity (a caller checks first).
    pub fn copy_prefix_from(&mut self, src: &KvStore, n: usize) {
        assert!(self.shape() == src.shape());
        assert!(n <= self.capacity() && n <= src.capacity());
        if self.ty != src.ty {
            let (hd, nh) = (self.head_dim, self.n_head_kv);
            let (mut k, mut v) = (vec![0.0; nh * hd], vec![0.0; nh * hd]);
            for layer in 0..self.n_layers {
                let from = src.layer(layer);
                for pos in 0..n {
                    for h in 0..nh {
                        let (kh, vh) = from.get(h, pos);
                        k[h * hd..][..hd].copy_from_slice(&kh);
                        v[h * hd..][..hd].copy_from_slice(&vh);
                    }
                    self.write(layer, pos, &k, &v);
                }
            }
            return;
        }
        let tiles = n.div_ceil(TILE);
        let nb = self.head_dim / QK8_0;
        let (hd, hdv) = (self.head_dim, self.hdv);
        for lh in 0..self.n_layers * self.n_head_kv {
            // The first `tiles` tiles of head lh: contiguous in both stores.
            let (d0, s0) = (lh * self.n_tiles, lh * src.n_tiles);
            let copy = |per_tile: usize| (d0 * per_tile, s0 * per_tile, tiles * per_tile);
            copy_vals(&mut self.k, &src.k, copy(TILE * hd), copy(TILE * nb));
            copy_vals(&mut self.v, &src.v, copy(TILE * hdv), copy(TILE * nb));
        }
    }

    /// Layer `layer`'s keys and values, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        assert!(layer < self.n_layers);
        let tiles = self.n_head_kv * self.n_tiles;
        let nb = self.head_dim / QK8_0;
        let at = |per_tile: usize| layer * tiles * per_tile..(layer + 1) * tiles * per_tile;
        KvLayer {
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            hdv: self.hdv,
            n_tiles: self.n_tiles,
            k: self.k.slice(at(TILE * self.head_dim), at(TILE * nb)),
            v: self.v.slice(at(TILE * self.hdv), at(TILE * nb)),
        }
    }
}

/// Copies `len` values (and scales) from `src` at `from` to `dst` at `at`, of one type.
fn copy_vals(
    dst: &mut Vals,
    src: &Vals,
    (at, from, len): (usize, usize, usize),
    (sat, sfrom, slen): (usize, usize, usize),
) {
    match (dst, src) {
        (Vals::F32(d), Vals::F32(s)) => d[at..at + len].copy_from_slice(&s[from..from + len]),
        (Vals::F16(d), Vals::F16(s)) => d[at..at + len].copy_from_slice(&s[from..from + len]),
        (Vals::Q8_0(dq, dd), Vals::Q8_0(sq, sd)) => {
            dq[at..at + len].copy_from_slice(&sq[from..from + len]);
            dd[sat..sat + slen].copy_from_slice(&sd[sfrom..sfrom + slen]);
        }
        _ => unreachable!("copy_vals is called for stores of one type"),
    }
}

/// One layer of a [`KvStore`]: what attention reads.
#[derive(Clone, Copy)]
pub struct KvLayer<'a> {
    pub(crate) n_head_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) hdv: usize,
    pub(crate) n_tiles: usize,
    pub(crate) k: ValsRef<'a>,
    pub(crate) v: ValsRef<'a>,
}

impl KvLayer<'_> {
    /// Positions held.
    pub fn capacity(&self) -> usize {
        self.n_tiles * TILE
    }

    pub fn n_head_kv(&self) -> usize {
        self.n_head_kv
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Position `pos`'s K and V of head `h` as f32 (tests, and readers that want values).
    pub fn get(&self, h: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let (hd, hdv) = (self.head_dim, self.hdv);
        assert!(h < self.n_head_kv && pos < self.capacity());
        let t = h * self.n_tiles + pos / TILE;
        let lane = pos % TILE;
        let nb = hd / QK8_0;
        let kat = |d: usize| t * TILE * hd + d * TILE + lane;
        let vat = t * TILE * hdv + lane * hdv;
        match (self.k, self.v) {
            (ValsRef::F32(k), ValsRef::F32(v)) => (
                (0..hd).map(|d| k[kat(d)]).collect(),
                v[vat..vat + hd].to_vec(),
            ),
            (ValsRef::F16(k), ValsRef::F16(v)) => (
                (0..hd).map(|d| k[kat(d)].to_f32()).collect(),
                v[vat..vat + hd].iter().map(|x| x.to_f32()).collect(),
            ),
            (ValsRef::Q8_0(kq, kd), ValsRef::Q8_0(vq, vd)) => (
                (0..hd)
                    .map(|d| {
                        kq[kat(d)] as f32 * kd[t * TILE * nb + (d / QK8_0) * TILE + lane].to_f32()
                    })
                    .collect(),
                (0..hd)
                    .map(|d| {
                        vq[vat + d] as f32 * vd[t * TILE * nb + lane * nb + d / QK8_0].to_f32()
                    })
                    .collect(),
            ),
            _ => unreachable!("K and V are built with the same type"),
        }
    }
}
