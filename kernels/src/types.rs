//! The ggml type table: one row per type, ids exactly as ggml's `enum ggml_type`.
//!
//! Block sizes and bytes per block checked against ggml/src/ggml.c `type_traits`
//! and gguf-py `GGML_QUANT_SIZES` (gguf 0.19.0, which agrees on every row
//! except Q8_1: it still says 40 bytes, the size from when `d` and `s` were
//! f32; ggml-common.h asserts `sizeof(block_q8_1) == 2*sizeof(ggml_half) + 32`,
//! so 36). `vec_dot_type` checked against ggml-cpu.c `type_traits_cpu`.

/// A ggml tensor element type. Ids 4, 5, 31-33 and 36-38 were removed from
/// ggml and are rejected by [`GgmlType::from_id`]. NVFP4 (40) and Q1_0 (41)
/// are newer than MXFP4; they are listed so a file using them is named and
/// sized correctly even though airlock cannot compute with them.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

struct Traits {
    id: u32,
    name: &'static str,
    block_size: usize,
    type_size: usize,
    is_quantized: bool,
    vec_dot_type: GgmlType,
}

const fn row(
    id: u32,
    name: &'static str,
    block_size: usize,
    type_size: usize,
    is_quantized: bool,
    vec_dot_type: GgmlType,
) -> Traits {
    Traits {
        id,
        name,
        block_size,
        type_size,
        is_quantized,
        vec_dot_type,
    }
}

static ALL: [GgmlType; 34] = {
    use GgmlType::*;
    [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS,
        IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16,
        TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0,
    ]
};

/// Every type ggml still defines, in id order.
pub fn all() -> &'static [GgmlType] {
    &ALL
}

impl GgmlType {
    /// The table. Types that ggml-cpu gives no `vec_dot_type` (Q8_K, the
    /// integer types, F64) get F32, which is what ggml's zero-initialised
    /// table entry means.
    const fn traits(self) -> Traits {
        use GgmlType::*;
        match self {
            //          id  name       block bytes  quant  vec_dot_type
            F32 => row(0, "F32", 1, 4, false, F32),
            F16 => row(1, "F16", 1, 2, false, F16),
            Q4_0 => row(2, "Q4_0", 32, 18, true, Q8_0),
            Q4_1 => row(3, "Q4_1", 32, 20, true, Q8_1),
            Q5_0 => row(6, "Q5_0", 32, 22, true, Q8_0),
            Q5_1 => row(7, "Q5_1", 32, 24, true, Q8_1),
            Q8_0 => row(8, "Q8_0", 32, 34, true, Q8_0),
            Q8_1 => row(9, "Q8_1", 32, 36, true, Q8_1),
            Q2_K => row(10, "Q2_K", 256, 84, true, Q8_K),
            Q3_K => row(11, "Q3_K", 256, 110, true, Q8_K),
            Q4_K => row(12, "Q4_K", 256, 144, true, Q8_K),
            Q5_K => row(13, "Q5_K", 256, 176, true, Q8_K),
            Q6_K => row(14, "Q6_K", 256, 210, true, Q8_K),
            Q8_K => row(15, "Q8_K", 256, 292, true, F32),
            IQ2_XXS => row(16, "IQ2_XXS", 256, 66, true, Q8_K),
            IQ2_XS => row(17, "IQ2_XS", 256, 74, true, Q8_K),
            IQ3_XXS => row(18, "IQ3_XXS", 256, 98, true, Q8_K),
            IQ1_S => row(19, "IQ1_S", 256, 50, true, Q8_K),
            IQ4_NL => row(20, "IQ4_NL", 32, 18, true, Q8_0),
            IQ3_S => row(21, "IQ3_S", 256, 110, true, Q8_K),
            IQ2_S => row(22, "IQ2_S", 256, 82, true, Q8_K),
            IQ4_XS => row(23, "IQ4_XS", 256, 136, true, Q8_K),
            I8 => row(24, "I8", 1, 1, false, F32),
            I16 => row(25, "I16", 1, 2, false, F32),
            I32 => row(26, "I32", 1, 4, false, F32),
            I64 => row(27, "I64", 1, 8, false, F32),
            F64 => row(28, "F64", 1, 8, false, F32),
            IQ1_M => row(29, "IQ1_M", 256, 56, true, Q8_K),
            BF16 => row(30, "BF16", 1, 2, false, BF16),
            TQ1_0 => row(34, "TQ1_0", 256, 54, true, Q8_K),
            TQ2_0 => row(35, "TQ2_0", 256, 66, true, Q8_K),
            MXFP4 => row(39, "MXFP4", 32, 17, true, Q8_0),
            NVFP4 => row(40, "NVFP4", 64, 36, true, Q8_0),
            Q1_0 => row(41, "Q1_0", 128, 18, true, Q8_0),
        }
    }

    /// The type with ggml id `id`; `None` for unknown and removed ids.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        ALL.iter().copied().find(|t| t.id() == id)
    }

    /// ggml's numeric id, as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.traits().id
    }

    /// Upper-case name as gguf-py spells it ("Q4_0", "F16", "Q4_K"); ggml's
    /// own `type_name` is the lower-case form.
    pub fn name(self) -> &'static str {
        self.traits().name
    }

    /// Elements per block (1 for the plain scalar types).
    pub const fn block_size(self) -> usize {
        self.traits().block_size
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        self.traits().type_size
    }

    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }

    /// True for block-quantized formats (ggml's `is_quantized`).
    pub fn is_quantized(self) -> bool {
        self.traits().is_quantized
    }

    /// Types [`crate::matmul::matmul`] can run as weights (each named: a
    /// new type does not compile until someone decides).
    pub const fn can_compute(self) -> bool {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K
            | Q6_K => true,
            // Activation-only formats (ggml has no dot product with them as weights).
            Q8_1 | Q8_K => false,
            IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL | IQ3_S | IQ2_S | IQ4_XS | IQ1_M
            | TQ1_0 | TQ2_0 | MXFP4 | NVFP4 | Q1_0 | I8 | I16 | I32 | I64 | F64 => false,
        }
    }

    /// Bytes taken by `n_elements` values; `None` when `n_elements` is not a
    /// whole number of blocks or the size overflows.
    pub fn row_bytes(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }

    /// The type activations are converted to before a dot product with
    /// weights of this type, as in ggml-cpu.
    pub fn vec_dot_type(self) -> GgmlType {
        self.traits().vec_dot_type
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &t in all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert!(seen.insert(t.id()), "duplicate id {}", t.id());
        }
        assert_eq!(seen.len(), 34);
    }

    #[test]
    fn removed_and_unknown_ids_are_rejected() {
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 42, 43, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
    }

    #[test]
    fn spot_check_ids_against_ggml_enum() {
        // Values written out from ggml.h's enum ggml_type, not from the table.
        let expect = [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (3, "Q4_1"),
            (6, "Q5_0"),
            (7, "Q5_1"),
            (8, "Q8_0"),
            (9, "Q8_1"),
            (10, "Q2_K"),
            (14, "Q6_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (23, "IQ4_XS"),
            (24, "I8"),
            (28, "F64"),
            (29, "IQ1_M"),
            (30, "BF16"),
            (34, "TQ1_0"),
            (35, "TQ2_0"),
            (39, "MXFP4"),
            (40, "NVFP4"),
            (41, "Q1_0"),
        ];
        for (id, name) in expect {
            assert_eq!(GgmlType::from_id(id).unwrap().name(), name);
        }
    }

    #[test]
    fn bits_per_weight_of_common_types() {
        assert_eq!(GgmlType::Q4_0.bits_per_weight(), 4.5);
        assert_eq!(GgmlType::Q4_1.bits_per_weight(), 5.0);
        assert_eq!(GgmlType::Q8_0.bits_per_weight(), 8.5);
        assert_eq!(GgmlType::Q4_K.bits_per_weight(), 4.5);
        assert_eq!(GgmlType::Q6_K.bits_per_weight(), 6.5625);
        assert_eq!(GgmlType::F16.bits_per_weight(), 16.0);
        assert_eq!(GgmlType::MXFP4.bits_per_weight(), 4.25);
    }

    #[test]
    fn row_bytes_checks_blocks_and_overflow() {
        assert_eq!(GgmlType::Q4_0.row_bytes(4096), Some(4096 / 32 * 18));
        assert_eq!(GgmlType::Q4_0.row_bytes(0), Some(0));
        assert_eq!(GgmlType::Q4_0.row_bytes(4097), None);
        assert_eq!(GgmlType::Q4_K.row_bytes(576), None);
        assert_eq!(GgmlType::F32.row_bytes(7), Some(28));
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(u64::MAX / 32 * 32), None);
    }

    #[test]
    fn vec_dot_types_match_ggml_cpu() {
        use GgmlType::*;
        assert_eq!(Q4_0.vec_dot_type(), Q8_0);
        assert_eq!(Q8_0.vec_dot_type(), Q8_0);
        assert_eq!(Q4_1.vec_dot_type(), Q8_1);
        assert_eq!(F16.vec_dot_type(), F16);
        assert_eq!(F32.vec_dot_type(), F32);
        assert_eq!(BF16.vec_dot_type(), BF16);
        assert_eq!(Q4_K.vec_dot_type(), Q8_K);
        assert_eq!(IQ4_NL.vec_dot_type(), Q8_0);
    }

    #[test]
    fn quantized_flag() {
        use GgmlType::*;
        for t in [F32, F16, BF16, I8, I16, I32, I64, F64] {
            assert!(!t.is_quantized(), "{t}");
            assert_eq!(t.block_size(), 1);
        }
        for t in [Q4_0, Q8_0, Q8_K, IQ1_M, TQ2_0, MXFP4] {
            assert!(t.is_quantized(), "{t}");
        }
    }
}
