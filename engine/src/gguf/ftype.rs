//! llama.cpp's `llama_ftype` (llama.h): the value of `general.file_type`, which names a file's
//! quantization recipe. One table, read by `inspect`, `bench`, the converter and the synthetic
//! models, so a new type is one row.

use airlock_kernels::GgmlType;

/// One `llama_ftype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileType {
    /// The value of `general.file_type`.
    pub id: u32,
    /// The `LLAMA_FTYPE_` suffix, e.g. `MOSTLY_Q4_K_M`.
    pub name: &'static str,
    /// llama.cpp's `llama_model_ftype_name`, which llama-bench prints in `model_type`.
    pub label: &'static str,
    /// The type of every 2-D tensor when the recipe uses one alone (1-D tensors stay F32);
    /// None for mixes such as the K-quant recipes.
    pub single: Option<GgmlType>,
}

const fn ft(
    id: u32,
    name: &'static str,
    label: &'static str,
    single: Option<GgmlType>,
) -> FileType {
    FileType {
        id,
        name,
        label,
        single,
    }
}

/// Every `llama_ftype` of llama.h (ids 5 and 6 were removed there).
pub const FILE_TYPES: &[FileType] = &[
    ft(0, "ALL_F32", "all F32", Some(GgmlType::F32)),
    ft(1, "MOSTLY_F16", "F16", Some(GgmlType::F16)),
    ft(2, "MOSTLY_Q4_0", "Q4_0", Some(GgmlType::Q4_0)),
    ft(3, "MOSTLY_Q4_1", "Q4_1", Some(GgmlType::Q4_1)),
    ft(4, "MOSTLY_Q4_1_SOME_F16", "Q4_1, some F16", None),
    ft(7, "MOSTLY_Q8_0", "Q8_0", Some(GgmlType::Q8_0)),
    ft(8, "MOSTLY_Q5_0", "Q5_0", Some(GgmlType::Q5_0)),
    ft(9, "MOSTLY_Q5_1", "Q5_1", Some(GgmlType::Q5_1)),
    ft(10, "MOSTLY_Q2_K", "Q2_K - Medium", None),
    ft(11, "MOSTLY_Q3_K_S", "Q3_K - Small", None),
    ft(12, "MOSTLY_Q3_K_M", "Q3_K - Medium", None),
    ft(13, "MOSTLY_Q3_K_L", "Q3_K - Large", None),
    ft(14, "MOSTLY_Q4_K_S", "Q4_K - Small", None),
    ft(15, "MOSTLY_Q4_K_M", "Q4_K - Medium", None),
    ft(16, "MOSTLY_Q5_K_S", "Q5_K - Small", None),
    ft(17, "MOSTLY_Q5_K_M", "Q5_K - Medium", None),
    ft(18, "MOSTLY_Q6_K", "Q6_K", None),
    ft(19, "MOSTLY_IQ2_XXS", "IQ2_XXS - 2.0625 bpw", None),
    ft(20, "MOSTLY_IQ2_XS", "IQ2_XS - 2.3125 bpw", None),
    ft(21, "MOSTLY_Q2_K_S", "Q2_K - Small", None),
    ft(22, "MOSTLY_IQ3_XS", "IQ3_XS - 3.3 bpw", None),
    ft(23, "MOSTLY_IQ3_XXS", "IQ3_XXS - 3.0625 bpw", None),
    ft(24, "MOSTLY_IQ1_S", "IQ1_S - 1.5625 bpw", None),
    ft(25, "MOSTLY_IQ4_NL", "IQ4_NL - 4.5 bpw", None),
    ft(26, "MOSTLY_IQ3_S", "IQ3_S - 3.4375 bpw", None),
    ft(27, "MOSTLY_IQ3_M", "IQ3_M - 3.66 bpw", None),
    ft(28, "MOSTLY_IQ2_S", "IQ2_S - 2.5 bpw", None),
    ft(29, "MOSTLY_IQ2_M", "IQ2_M - 2.7 bpw", None),
    ft(30, "MOSTLY_IQ4_XS", "IQ4_XS - 4.25 bpw", None),
    ft(31, "MOSTLY_IQ1_M", "IQ1_M - 1.75 bpw", None),
    ft(32, "MOSTLY_BF16", "BF16", Some(GgmlType::BF16)),
    ft(36, "MOSTLY_TQ1_0", "TQ1_0 - 1.69 bpw ternary", None),
    ft(37, "MOSTLY_TQ2_0", "TQ2_0 - 2.06 bpw ternary", None),
    ft(38, "MOSTLY_MXFP4_MOE", "MXFP4 MoE", None),
    ft(39, "MOSTLY_NVFP4", "NVFP4", None),
    ft(40, "MOSTLY_Q1_0", "Q1_0", None),
];

impl FileType {
    /// The entry of `general.file_type` = `id`, if llama.h defines it.
    pub fn from_id(id: u32) -> Option<&'static FileType> {
        FILE_TYPES.iter().find(|f| f.id == id)
    }

    /// The recipe that puts every 2-D tensor in `ty`, if llama.h has one.
    pub fn single(ty: GgmlType) -> Option<&'static FileType> {
        FILE_TYPES.iter().find(|f| f.single == Some(ty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_single_types_are_unique() {
        for (i, a) in FILE_TYPES.iter().enumerate() {
            for b in &FILE_TYPES[i + 1..] {
                assert_ne!(a.id, b.id, "{} and {}", a.name, b.name);
                assert!(a.single.is_none() || a.single != b.single, "{}", b.name);
            }
        }
    }

    #[test]
    fn the_ids_llama_cpp_writes_for_our_output_types() {
        let id = |ty| FileType::single(ty).map(|f| f.id);
        assert_eq!(id(GgmlType::F32), Some(0));
        assert_eq!(id(GgmlType::F16), Some(1));
        assert_eq!(id(GgmlType::Q4_0), Some(2));
        assert_eq!(id(GgmlType::Q4_1), Some(3));
        assert_eq!(id(GgmlType::Q8_0), Some(7));
        assert_eq!(id(GgmlType::BF16), Some(32));
        assert_eq!(
            FileType::from_id(15).map(|f| f.label),
            Some("Q4_K - Medium")
        );
        assert!(FileType::from_id(5).is_none());
    }
}
