use std::fmt;

use crate::types::GgmlType;

/// Errors from the byte-level entry points. The typed per-format functions
/// panic on misuse instead: a wrong length there is a bug in the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// The operation is not implemented for this type.
    Unsupported { ty: GgmlType, op: &'static str },
    /// An element count that is not a whole number of blocks.
    NotBlockMultiple { ty: GgmlType, n: u64 },
    /// A buffer whose length does not match the shape.
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A shape whose byte or element count does not fit in usize.
    Overflow { what: &'static str },
    /// The instruction-set path asked for (`AIRLOCK_SIMD`) is unknown or
    /// not supported by this CPU; the message says which and what is.
    Simd(String),
    /// Memory for a buffer could not be obtained.
    Alloc { bytes: usize, reason: String },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Unsupported { ty, op } => {
                write!(f, "{op} is not supported for type {}", ty.name())
            }
            KernelError::NotBlockMultiple { ty, n } => write!(
                f,
                "{n} elements is not a multiple of the {} block size {}",
                ty.name(),
                ty.block_size()
            ),
            KernelError::LengthMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected length {expected}, got {actual}"),
            KernelError::Overflow { what } => write!(f, "{what}: size overflows"),
            KernelError::Simd(msg) => f.write_str(msg),
            KernelError::Alloc { bytes, reason } => {
                write!(f, "cannot allocate {bytes} bytes: {reason}")
            }
        }
    }
}

impl std::error::Error for KernelError {}
