//! Which ggml type each output tensor gets.
//!
//! The policy (the same for `convert` and `quantize`, documented in `--help` and the README):
//! - 1-D tensors (norms, `rope_freqs`) stay F32.
//! - The output head (`output.weight`, or `token_embd.weight` when the embeddings are tied, since
//!   it is then the output head too) gets Q8_0 when `--type` is q4_0 or q4_1, as llama-quantize
//!   keeps a higher-precision type there; with q8_0/f16/bf16/f32 it gets `--type`.
//!   `--output-type` sets it explicitly; `--pure` puts it in `--type` like every other 2-D tensor.
//! - Every other 2-D tensor gets `--type`.
//! - A tensor whose row length is not a multiple of its type's block size falls back to F16
//!   (F32 when `--type f32`).

use airlock_kernels::GgmlType;

use crate::error::ConvertError;

/// The element types airlock writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

pub const OUT_TYPE_NAMES: &str = "q8_0, q4_0, q4_1, f16, bf16, f32";

impl OutType {
    pub fn parse(s: &str) -> Result<Self, ConvertError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            "q8_0" => OutType::Q8_0,
            "q4_0" => OutType::Q4_0,
            "q4_1" => OutType::Q4_1,
            _ => {
                return Err(ConvertError::Usage(format!(
                    "unknown type {s:?}; expected one of {OUT_TYPE_NAMES}"
                )))
            }
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::BF16 => GgmlType::BF16,
            OutType::Q8_0 => GgmlType::Q8_0,
            OutType::Q4_0 => GgmlType::Q4_0,
            OutType::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        airlock_engine::gguf::FileType::single(self.ggml())
            .expect("every output type has a single-type llama_ftype (tested)")
            .id
    }

    pub fn name(self) -> &'static str {
        match self {
            OutType::F32 => "f32",
            OutType::F16 => "f16",
            OutType::BF16 => "bf16",
            OutType::Q8_0 => "q8_0",
            OutType::Q4_0 => "q4_0",
            OutType::Q4_1 => "q4_1",
        }
    }
}

impl std::str::FromStr for OutType {
    type Err = ConvertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OutType::parse(s)
    }
}

impl std::fmt::Display for OutType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a tensor is, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `output.weight`, or a tied `token_embd.weight`.
    OutputHead,
    /// Any other tensor (its dimension count decides the rest).
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub ty: OutType,
    pub output_ty: Option<OutType>,
    pub pure: bool,
}

impl Policy {
    pub fn new(ty: OutType) -> Self {
        Policy {
            ty,
            output_ty: None,
            pure: false,
        }
    }

    /// The type of the output head when nothing forces another one.
    pub fn output_head_type(&self) -> OutType {
        match (self.output_ty, self.pure, self.ty) {
            (Some(t), _, _) => t,
            (None, true, t) => t,
            (None, false, OutType::Q4_0 | OutType::Q4_1) => OutType::Q8_0,
            (None, false, t) => t,
        }
    }

    /// The type for a tensor of ggml dims `dims` (row length first).
    pub fn choose(&self, dims: &[u64], role: Role) -> GgmlType {
        if dims.len() <= 1 {
            return GgmlType::F32;
        }
        let t = match role {
            Role::OutputHead => self.output_head_type(),
            Role::Other => self.ty,
        }
        .ggml();
        if !dims[0].is_multiple_of(t.block_size() as u64) {
            return if self.ty == OutType::F32 {
                GgmlType::F32
            } else {
                GgmlType::F16
            };
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_output_type_parses_from_its_name_and_has_a_file_type() {
        for name in OUT_TYPE_NAMES.split(", ") {
            let t = OutType::parse(name).unwrap();
            assert_eq!(t.name(), name);
            assert_eq!(OutType::parse(&name.to_uppercase()).unwrap(), t);
            let ft = airlock_engine::gguf::FileType::from_id(t.file_type()).unwrap();
            assert_eq!(ft.single, Some(t.ggml()), "{name}");
        }
        assert!(OutType::parse("q4_k").is_err());
    }

    #[test]
    fn policy_table() {
        let p = Policy::new(OutType::Q4_0);
        assert_eq!(p.choose(&[576], Role::Other), GgmlType::F32);
        assert_eq!(p.choose(&[576, 10], Role::Other), GgmlType::Q4_0);
        assert_eq!(p.choose(&[576, 10], Role::OutputHead), GgmlType::Q8_0);
        assert_eq!(p.choose(&[577, 10], Role::Other), GgmlType::F16);
        let pure = Policy {
            pure: true,
            ..Policy::new(OutType::Q4_1)
        };
        assert_eq!(pure.choose(&[64, 10], Role::OutputHead), GgmlType::Q4_1);
        let forced = Policy {
            output_ty: Some(OutType::F16),
            ..Policy::new(OutType::Q4_1)
        };
        assert_eq!(forced.choose(&[64, 10], Role::OutputHead), GgmlType::F16);
        let f32p = Policy::new(OutType::F32);
        assert_eq!(f32p.choose(&[7, 3], Role::Other), GgmlType::F32);
        assert_eq!(
            Policy::new(OutType::Q8_0).choose(&[64, 3], Role::OutputHead),
            GgmlType::Q8_0
        );
        assert!(OutType::parse("Q4_K").is_err());
        assert_eq!(OutType::parse("BF16").unwrap(), OutType::BF16);
    }
}
