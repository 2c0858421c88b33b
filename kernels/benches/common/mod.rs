//! What the kernel benches share: the unit tests' value generator (the same
//! file, so there is one) and random quantized weights.

#[path = "../../src/test_util.rs"]
mod test_util;

pub(crate) use test_util::values;

use airlock_kernels::{quantize_row, GgmlType};

/// `rows x cols` of `ty`, quantized from random values. One random row
/// pattern per 64 rows keeps setup fast at 8B shapes.
// The attention bench uses only `values`.
#[allow(dead_code)]
pub(crate) fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * rb];
    let src = values(64 * cols, ty.id() as u64 + 1);
    for (r, dst) in data.chunks_exact_mut(rb).enumerate() {
        quantize_row(ty, &src[(r % 64) * cols..][..cols], dst).unwrap();
    }
    data
}
