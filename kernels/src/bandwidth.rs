//! The machine's read bandwidth, STREAM-style: every thread of the current
//! rayon pool sums its share of one large array. Generating a token reads
//! every weight once and does little arithmetic per byte, so this rate over
//! the bytes of weights read per token is the speed generation cannot pass.

use std::time::Instant;

use crate::buffer::Buffer;
use crate::KernelError;

/// An array to read: `bytes` (rounded down to 8) of non-zero values, so the
/// pages are really mapped and not the shared zero page, in the same
/// huge-page-advised memory as packed weights, so that the read pays for
/// address translation no more than a decode does.
pub struct ReadBuffer(Buffer);

impl ReadBuffer {
    /// Bytes well above any CPU's last-level cache, so every read reaches
    /// DRAM: 512 MiB.
    pub const DEFAULT_BYTES: usize = 512 << 20;

    /// Errors when the memory cannot be mapped.
    pub fn new(bytes: usize) -> Result<ReadBuffer, KernelError> {
        let mut buf = Buffer::zeroed(bytes / 8 * 8)?;
        for (i, v) in buf.bytes_mut().chunks_exact_mut(8).enumerate() {
            v.copy_from_slice(&(i as u64 | 1).to_ne_bytes());
        }
        Ok(ReadBuffer(buf))
    }

    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// The array as u64s (the map is page-aligned, its length a multiple of 8).
    fn values(&self) -> &[u64] {
        bytemuck::cast_slice(self.0.bytes())
    }

    /// Reads the whole array once on every thread of the current pool, each
    /// its own contiguous share; returns (seconds, the sum of all values).
    pub fn read_once(&self) -> (f64, u64) {
        let a = self.values();
        let per = a.len().div_ceil(rayon::current_num_threads());
        let t0 = Instant::now();
        let sums = rayon::broadcast(|ctx| {
            let lo = (ctx.index() * per).min(a.len());
            sum(&a[lo..(lo + per).min(a.len())])
        });
        let secs = t0.elapsed().as_secs_f64();
        (secs, sums.into_iter().fold(0, u64::wrapping_add))
    }

    /// The median of `reps` reads, in bytes per second. Not the best: on a
    /// shared host a single short read now and then runs far above what the
    /// machine sustains (here 50 GB/s once in a few hundred reads whose
    /// median was 33), and a ceiling should be what a seconds-long decode
    /// can have.
    pub fn rate(&self, reps: usize) -> f64 {
        let mut secs: Vec<f64> = (0..reps.max(1)).map(|_| self.read_once().0).collect();
        secs.sort_by(f64::total_cmp);
        self.bytes() as f64 / secs[secs.len() / 2].max(1e-9)
    }
}

/// Eight independent sums, so the loop is bound by loads, not by the
/// latency of one add chain; the compiler vectorises it on every target.
fn sum(a: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = a.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |s, &v| s.wrapping_add(v));
    for c in chunks {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s = s.wrapping_add(v);
        }
    }
    acc.iter().fold(rest, |s, &v| s.wrapping_add(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element is read exactly once whatever the thread count and
    /// however the array splits (a length that no thread count divides).
    #[test]
    fn each_thread_reads_its_own_share_once() {
        let buf = ReadBuffer::new(8 * 100_003 + 5).unwrap();
        let want: u64 = (0..100_003u64).map(|i| i | 1).sum();
        for threads in [1, 2, 3, 7] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (_, got) = pool.install(|| buf.read_once());
            assert_eq!(got, want, "{threads} threads");
        }
        assert_eq!(buf.bytes(), 8 * 100_003);
    }
}
