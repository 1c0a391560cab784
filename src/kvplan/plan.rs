//! The KV memory plan (format version 2): where every layer reads its keys and its
//! values (two resolved `ShareMap`s, one per half), and the cache type of every
//! owned slot. A whole-layer map with one cache type is the special case
//! `KvPlan::uniform`.

use std::fmt;

use super::map::{ShareMap, ShareMapError};
use crate::gguf::GgmlType;

/// Types a plan's slot may hold: the cache types llama.cpp offers (`-ctk/-ctv`)
/// that ggml's CPU flash attention reads, highest precision first within a size.
pub const PLAN_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q5_1,
    GgmlType::Q5_0,
    GgmlType::Q4_1,
    GgmlType::IQ4_NL,
    GgmlType::Q4_0,
];

/// One half of a layer's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Half {
    #[serde(rename = "k")]
    Keys,
    #[serde(rename = "v")]
    Values,
}

impl Half {
    pub const BOTH: [Half; 2] = [Half::Keys, Half::Values];

    pub fn letter(self) -> char {
        match self {
            Half::Keys => 'K',
            Half::Values => 'V',
        }
    }
}

/// Why a plan was refused; each names the layer and half at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvPlanError {
    #[error("KV plan, {half} sources: {source}", half = .half.letter())]
    Sources {
        half: Half,
        #[source]
        source: ShareMapError,
    },
    #[error("KV plan: {half} types have {found} entries but the model has {expected} layers", half = .half.letter())]
    TypeCount {
        half: Half,
        expected: usize,
        found: usize,
    },
    #[error("KV plan: layer {layer}'s {half} slot has type {ty}, which a KV cache cannot hold (use f16, q8_0 or q4_0)", half = .half.letter())]
    Type {
        layer: usize,
        half: Half,
        ty: String,
    },
}

/// Keys and values apart, each with its own sources and per-slot types. `k_type[i]`
/// is the type of layer `i`'s own K slot; it is meaningful only where `i` owns its
/// keys (a reader reads its source's slot in the source's type).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KvPlan {
    k_source: ShareMap,
    v_source: ShareMap,
    k_type: Vec<GgmlType>,
    v_type: Vec<GgmlType>,
}

impl KvPlan {
    /// Every layer owns both halves, all of them of the given types.
    pub fn unshared(n_layers: usize, type_k: GgmlType, type_v: GgmlType) -> Self {
        Self::uniform(&ShareMap::identity(n_layers), type_k, type_v)
    }

    /// The version-1 plan: keys and values both follow `map`, one type per half.
    pub fn uniform(map: &ShareMap, type_k: GgmlType, type_v: GgmlType) -> Self {
        let n = map.n_layers();
        KvPlan {
            k_source: map.clone(),
            v_source: map.clone(),
            k_type: vec![type_k; n],
            v_type: vec![type_v; n],
        }
    }

    /// A plan from its four per-layer lists, validated: both source lists resolved
    /// maps of `n_layers` entries, every type one a cache can hold.
    pub fn new(
        k_source: Vec<usize>,
        v_source: Vec<usize>,
        k_type: Vec<GgmlType>,
        v_type: Vec<GgmlType>,
        n_layers: usize,
    ) -> Result<Self, KvPlanError> {
        let k_source =
            ShareMap::for_model(k_source, n_layers).map_err(|source| KvPlanError::Sources {
                half: Half::Keys,
                source,
            })?;
        let v_source =
            ShareMap::for_model(v_source, n_layers).map_err(|source| KvPlanError::Sources {
                half: Half::Values,
                source,
            })?;
        for (half, types) in [(Half::Keys, &k_type), (Half::Values, &v_type)] {
            if types.len() != n_layers {
                return Err(KvPlanError::TypeCount {
                    half,
                    expected: n_layers,
                    found: types.len(),
                });
            }
            if let Some((layer, ty)) = types
                .iter()
                .enumerate()
                .find(|(_, t)| !PLAN_TYPES.contains(t))
            {
                return Err(KvPlanError::Type {
                    layer,
                    half,
                    ty: ty.name().to_string(),
                });
            }
        }
        Ok(KvPlan {
            k_source,
            v_source,
            k_type,
            v_type,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.k_source.n_layers()
    }

    /// The map of one half.
    pub fn sources(&self, half: Half) -> &ShareMap {
        match half {
            Half::Keys => &self.k_source,
            Half::Values => &self.v_source,
        }
    }

    /// Per-layer types of one half (owners' entries are the ones in use).
    pub fn types(&self, half: Half) -> &[GgmlType] {
        match half {
            Half::Keys => &self.k_type,
            Half::Values => &self.v_type,
        }
    }

    /// The layer whose `half` slot `layer` reads.
    pub fn source(&self, half: Half, layer: usize) -> usize {
        self.sources(half).source(layer)
    }

    pub fn owns(&self, half: Half, layer: usize) -> bool {
        self.sources(half).owns_slot(layer)
    }

    /// The type of the `half` slot `layer` reads (its source's).
    pub fn read_type(&self, half: Half, layer: usize) -> GgmlType {
        self.types(half)[self.source(half, layer)]
    }

    /// The whole-layer map, when keys and values follow the same sources.
    pub fn as_map(&self) -> Option<&ShareMap> {
        (self.k_source == self.v_source).then_some(&self.k_source)
    }

    /// The cache types, when every owned slot of each half has the same one.
    pub fn uniform_types(&self) -> Option<(GgmlType, GgmlType)> {
        let one = |half: Half| {
            let mut owned = (0..self.n_layers())
                .filter(|&l| self.owns(half, l))
                .map(|l| self.types(half)[l]);
            let first = owned.next()?;
            owned.all(|t| t == first).then_some(first)
        };
        Some((one(Half::Keys)?, one(Half::Values)?))
    }

    /// A copy where `layer`'s `half` reads `source`'s (chains resolved as
    /// `ShareMap::with_shared` does).
    pub fn with_shared(
        &self,
        half: Half,
        layer: usize,
        source: usize,
    ) -> Result<Self, KvPlanError> {
        let map = self
            .sources(half)
            .with_shared(layer, source)
            .map_err(|source| KvPlanError::Sources { half, source })?;
        let mut next = self.clone();
        match half {
            Half::Keys => next.k_source = map,
            Half::Values => next.v_source = map,
        }
        Ok(next)
    }

    /// A copy where `layer`'s own `half` slot holds `ty`.
    pub fn with_type(&self, half: Half, layer: usize, ty: GgmlType) -> Self {
        let mut next = self.clone();
        match half {
            Half::Keys => next.k_type[layer] = ty,
            Half::Values => next.v_type[layer] = ty,
        }
        next
    }

    /// The same types, with both halves following `map` (of as many layers).
    pub fn with_map(&self, map: &ShareMap) -> Result<Self, KvPlanError> {
        if map.n_layers() != self.n_layers() {
            return Err(KvPlanError::Sources {
                half: Half::Keys,
                source: ShareMapError::WrongLength {
                    expected: self.n_layers(),
                    found: map.n_layers(),
                },
            });
        }
        Ok(KvPlan {
            k_source: map.clone(),
            v_source: map.clone(),
            ..self.clone()
        })
    }

    /// Every owned slot of both halves set to the given types (the CLI's
    /// `--cache-type-k/-v` override a stored plan's).
    pub fn with_uniform_types(&self, type_k: GgmlType, type_v: GgmlType) -> Self {
        let n = self.n_layers();
        KvPlan {
            k_type: vec![type_k; n],
            v_type: vec![type_v; n],
            ..self.clone()
        }
    }

    /// Owned slots of one half.
    pub fn owner_count(&self, half: Half) -> usize {
        self.sources(half).owner_count()
    }

    /// Halves that read another layer's slot, over both halves (`2 L` at most).
    pub fn shared_halves(&self) -> usize {
        self.k_source.shared_count() + self.v_source.shared_count()
    }

    pub fn is_unshared(&self) -> bool {
        self.shared_halves() == 0
    }

    /// KV bytes per token of context: every owned slot holds one row of
    /// `n_embd_kv` elements in its type.
    pub fn bytes_per_token(&self, n_embd_kv: usize) -> usize {
        Half::BOTH
            .iter()
            .flat_map(|&h| {
                (0..self.n_layers())
                    .filter(move |&l| self.owns(h, l))
                    .map(move |l| row_bytes(self.types(h)[l], n_embd_kv))
            })
            .sum()
    }

    /// What the same cache takes per token with every layer owning both halves,
    /// each in the type it reads now: what sharing saves against.
    pub fn unshared_bytes_per_token(&self, n_embd_kv: usize) -> usize {
        (0..self.n_layers())
            .map(|l| {
                row_bytes(self.read_type(Half::Keys, l), n_embd_kv)
                    + row_bytes(self.read_type(Half::Values, l), n_embd_kv)
            })
            .sum()
    }

    /// What the same number of layers takes per token unshared in f16: the unit
    /// budgets are fractions of.
    pub fn f16_bytes_per_token(&self, n_embd_kv: usize) -> usize {
        2 * self.n_layers() * row_bytes(GgmlType::F16, n_embd_kv)
    }

    /// `bytes_per_token` as a fraction of the unshared f16 cache.
    pub fn fraction_of_f16(&self, n_embd_kv: usize) -> f64 {
        self.bytes_per_token(n_embd_kv) as f64 / self.f16_bytes_per_token(n_embd_kv) as f64
    }

    /// Each layer's entry for a table: `(k_from, v_from, k_type, v_type)`, types
    /// being those of the slots read.
    pub fn rows(&self) -> Vec<(usize, usize, GgmlType, GgmlType)> {
        (0..self.n_layers())
            .map(|l| {
                (
                    self.source(Half::Keys, l),
                    self.source(Half::Values, l),
                    self.read_type(Half::Keys, l),
                    self.read_type(Half::Values, l),
                )
            })
            .collect()
    }
}

fn row_bytes(ty: GgmlType, n: usize) -> usize {
    ty.row_bytes(n as u64).unwrap_or(0) as usize
}

impl fmt::Debug for KvPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KvPlan({self})")
    }
}

impl fmt::Display for KvPlan {
    /// `K: 5<-2 ... | V: ... | K q8_0 x28, q4_0 x2 | V q4_0 x30` in short.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(map), Some((tk, tv))) = (self.as_map(), self.uniform_types()) {
            return write!(f, "{map}, K {tk}, V {tv}");
        }
        let mut parts = Vec::new();
        for half in Half::BOTH {
            let map = self.sources(half);
            let shared = if map.is_identity() {
                "unshared".to_string()
            } else {
                map.to_string()
            };
            let mut counts: Vec<(GgmlType, usize)> = Vec::new();
            for l in (0..self.n_layers()).filter(|&l| self.owns(half, l)) {
                let t = self.types(half)[l];
                match counts.iter_mut().find(|(c, _)| *c == t) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t, 1)),
                }
            }
            let types: Vec<String> = counts.iter().map(|(t, n)| format!("{t} x{n}")).collect();
            parts.push(format!(
                "{}: {shared} ({})",
                half.letter(),
                types.join(", ")
            ));
        }
        write!(f, "{}", parts.join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F16: GgmlType = GgmlType::F16;
    const Q8: GgmlType = GgmlType::Q8_0;
    const Q4: GgmlType = GgmlType::Q4_0;

    #[test]
    fn uniform_plan_matches_its_map_and_counts_bytes() {
        let map = ShareMap::new(vec![0, 0, 2, 2]).unwrap();
        let p = KvPlan::uniform(&map, Q8, Q4);
        assert_eq!(p.as_map(), Some(&map));
        assert_eq!(p.uniform_types(), Some((Q8, Q4)));
        // 2 owners x (q8_0 row + q4_0 row) of 64 elements: 2 x (68 + 36).
        assert_eq!(p.bytes_per_token(64), 2 * (68 + 36));
        assert_eq!(p.f16_bytes_per_token(64), 4 * 2 * 128);
        assert_eq!(p.shared_halves(), 4);
    }

    #[test]
    fn halves_share_apart_and_types_follow_the_owner() {
        let p = KvPlan::unshared(4, F16, F16)
            .with_shared(Half::Values, 3, 1)
            .unwrap()
            .with_type(Half::Values, 1, Q4);
        assert!(p.owns(Half::Keys, 3) && !p.owns(Half::Values, 3));
        assert_eq!(p.read_type(Half::Values, 3), Q4);
        assert_eq!(p.as_map(), None);
        assert_eq!(p.uniform_types(), None);
        assert_eq!(p.bytes_per_token(32), 4 * 64 + 2 * 64 + 18);
        assert_eq!(p.rows()[3], (3, 1, F16, Q4));
        let text = p.to_string();
        assert!(
            text.contains("V: 3<-1") && text.contains("q4_0 x1"),
            "{text}"
        );
    }

    #[test]
    fn invalid_plans_name_the_half_and_layer() {
        let e = KvPlan::new(vec![0, 1], vec![0, 2], vec![F16; 2], vec![F16; 2], 2).unwrap_err();
        assert!(
            matches!(
                e,
                KvPlanError::Sources {
                    half: Half::Values,
                    ..
                }
            ),
            "{e}"
        );
        let e =
            KvPlan::new(vec![0, 0, 1], vec![0, 1, 2], vec![F16; 3], vec![F16; 3], 3).unwrap_err();
        assert!(
            e.to_string().contains("K sources") && e.to_string().contains("chains"),
            "{e}"
        );
        let e = KvPlan::new(vec![0, 1], vec![0, 1], vec![F16; 1], vec![F16; 2], 2).unwrap_err();
        assert!(
            matches!(
                e,
                KvPlanError::TypeCount {
                    half: Half::Keys,
                    ..
                }
            ),
            "{e}"
        );
        let e = KvPlan::new(
            vec![0, 1],
            vec![0, 1],
            vec![F16; 2],
            vec![F16, GgmlType::Q6_K],
            2,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("layer 1's V slot") && e.to_string().contains("q6_K"),
            "{e}"
        );
        assert!(
            KvPlan::new(vec![0, 1, 2], vec![0, 1], vec![F16; 3], vec![F16; 3], 3).is_err(),
            "wrong length"
        );
    }
}
