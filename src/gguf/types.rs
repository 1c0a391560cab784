//! ggml tensor element types as they appear in GGUF tensor infos.
//!
//! Block and byte sizes mirror ggml's `type_traits` table (ggml/src/ggml.c) and
//! the block structs in ggml/src/ggml-common.h; a unit test checks every entry
//! against the linked ggml library.

/// A ggml tensor type, numbered as in `enum ggml_type`. Ids that ggml retired
/// (4, 5, 31..=33, 36..=38) are deliberately absent: no current loader accepts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
    Q2_0 = 42,
}

/// Elements per super-block of the k-quants and i-quants (`QK_K`).
const QK_K: u64 = 256;

impl GgmlType {
    /// Every type this crate knows, in id order.
    pub const ALL: [GgmlType; 35] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
    ];

    /// The type with ggml id `v`, or `None` for ids that are unknown or retired.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u32 == v)
    }

    /// The type whose ggml name (as [`GgmlType::name`] spells it) is `name`.
    /// Case-insensitive, because users type "Q4_K" as often as ggml's "q4_K".
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Number of elements stored together in one block.
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 | Q2_0 => 64,
            Q1_0 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_xxx)` in ggml-common.h).
    pub fn type_size(self) -> u64 {
        use GgmlType::*;
        // Each arm spells out the block struct's fields so the number can be
        // checked against ggml-common.h by eye; a lone 2 is one ggml_half.
        match self {
            I8 => 1,
            F16 | BF16 | I16 => 2,
            F32 | I32 => 4,
            F64 | I64 => 8,
            Q1_0 => 2 + 128 / 8,                                 // d, qs
            Q2_0 => 2 + 64 / 4,                                  // d, qs
            Q4_0 => 2 + 32 / 2,                                  // d, qs
            Q4_1 => 2 * 2 + 32 / 2,                              // d, m, qs
            Q5_0 => 2 + 4 + 32 / 2,                              // d, qh, qs
            Q5_1 => 2 * 2 + 4 + 32 / 2,                          // d, m, qh, qs
            Q8_0 => 2 + 32,                                      // d, qs
            Q8_1 => 2 * 2 + 32,                                  // d, s, qs
            MXFP4 => 1 + 32 / 2,                                 // e, qs
            NVFP4 => 64 / 16 + 64 / 2,                           // d[4], qs
            IQ4_NL => 2 + 32 / 2,                                // d, qs
            Q2_K => 2 * 2 + QK_K / 16 + QK_K / 4,                // d, dmin, scales, qs
            Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,                // d, qs, hmask, scales
            Q4_K => 2 * 2 + 12 + QK_K / 2,                       // d, dmin, scales, qs
            Q5_K => 2 * 2 + 12 + QK_K / 2 + QK_K / 8,            // d, dmin, scales, qs, qh
            Q6_K => 2 + QK_K / 16 + 3 * QK_K / 4,                // d, scales, ql+qh
            Q8_K => 4 + QK_K + QK_K / 16 * 2,                    // f32 d, qs, bsums
            IQ2_XXS => 2 + QK_K / 8 * 2,                         // d, qs
            IQ2_XS => 2 + QK_K / 8 * 2 + QK_K / 32,              // d, qs, scales
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,                   // d, qs, qh+scales
            IQ3_XXS => 2 + 3 * (QK_K / 8),                       // d, qs
            IQ3_S => 2 + 13 * (QK_K / 32) + QK_K / 64,           // d, qs+qh+signs, scales
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,                   // d, qs, qh
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,           // qs, qh, scales
            IQ4_XS => 2 + 2 + QK_K / 64 + QK_K / 2,              // d, scales_h, scales_l, qs
            TQ1_0 => 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5, // d, qh, qs
            TQ2_0 => 2 + QK_K / 4,                               // d, qs
        }
    }

    /// ggml's name for the type (`ggml_type_name`), e.g. "q4_1", "q4_K", "iq2_xxs".
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2_K => "q2_K",
            Q3_K => "q3_K",
            Q4_K => "q4_K",
            Q5_K => "q5_K",
            Q6_K => "q6_K",
            Q8_K => "q8_K",
            IQ2_XXS => "iq2_xxs",
            IQ2_XS => "iq2_xs",
            IQ3_XXS => "iq3_xxs",
            IQ1_S => "iq1_s",
            IQ4_NL => "iq4_nl",
            IQ3_S => "iq3_s",
            IQ2_S => "iq2_s",
            IQ4_XS => "iq4_xs",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            IQ1_M => "iq1_m",
            BF16 => "bf16",
            TQ1_0 => "tq1_0",
            TQ2_0 => "tq2_0",
            MXFP4 => "mxfp4",
            NVFP4 => "nvfp4",
            Q1_0 => "q1_0",
            Q2_0 => "q2_0",
        }
    }

    /// Bytes taken by `n` consecutive elements, or `None` when `n` is not a
    /// whole number of blocks or the size overflows u64.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
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
    fn sizes_and_names_match_linked_ggml() {
        for id in 0..llama_cpp_sys_2::GGML_TYPE_COUNT {
            let ggml = crate::backend::ggml::raw_type_traits(id);
            match (GgmlType::from_u32(id), ggml) {
                (None, None) => {}
                (None, Some(g)) => panic!("ggml knows type id {id} ({g:?}) but GgmlType does not"),
                (Some(t), None) => panic!("GgmlType {t:?} is not a live ggml type"),
                (Some(t), Some((block, size, name))) => {
                    assert_eq!(t as u32, id);
                    assert_eq!(t.block_size() as i64, block, "block size of {t:?}");
                    assert_eq!(t.type_size(), size as u64, "type size of {t:?}");
                    assert_eq!(t.name(), name, "name of {t:?}");
                }
            }
        }
    }

    #[test]
    fn ids_and_names_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t as u32), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_uppercase()), Some(t));
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_u32(retired), None, "id {retired}");
        }
        assert_eq!(GgmlType::from_name("q4_2"), None);
    }

    #[test]
    fn row_bytes_requires_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(576 / 32 * 20));
        assert_eq!(GgmlType::Q4_1.row_bytes(33), None);
        assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(2 * 210));
        assert_eq!(GgmlType::F32.row_bytes(7), Some(28));
        assert_eq!(GgmlType::F64.row_bytes(u64::MAX), None, "overflow");
    }
}
