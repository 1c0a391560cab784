//! The layer-wise KV sharing map (`source[i]` for every layer), its validation and
//! its round trip through GGUF metadata. See `shared/KVSHARER.md` for the semantics.

use std::fmt;

/// Why a sharing map was refused. Each variant names the layer at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareMapError {
    #[error("sharing map has {found} entries but the model has {expected} layers")]
    WrongLength { expected: usize, found: usize },
    #[error("sharing map: layer {layer} reads layer {reads}, which does not exist (model has {n_layers} layers)")]
    OutOfRange {
        layer: usize,
        reads: usize,
        n_layers: usize,
    },
    #[error("sharing map: layer {layer} reads layer {reads}, a later layer; a layer may only reuse the cache of an earlier one")]
    Forward { layer: usize, reads: usize },
    #[error("sharing map: layer {layer} reads layer {reads}, which itself reads layer {next}; maps must be resolved (no chains)")]
    Chain {
        layer: usize,
        reads: usize,
        next: usize,
    },
    #[error("sharing map: layer {layer} is already shared")]
    AlreadyShared { layer: usize },
}

/// `source[i] == i`: layer `i` owns a cache slot; `source[i] == j < i`: layer `i`
/// attends over layer `j`'s slot and computes no keys or values of its own.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ShareMap {
    source: Vec<usize>,
}

impl ShareMap {
    /// Every layer owns its slot: the unshared model.
    pub fn identity(n_layers: usize) -> Self {
        ShareMap {
            source: (0..n_layers).collect(),
        }
    }

    /// Validates a resolved map: every entry `j <= i`, and every source owns its slot.
    pub fn new(source: Vec<usize>) -> Result<Self, ShareMapError> {
        let n = source.len();
        for (i, &j) in source.iter().enumerate() {
            if j >= n {
                return Err(ShareMapError::OutOfRange {
                    layer: i,
                    reads: j,
                    n_layers: n,
                });
            }
            if j > i {
                return Err(ShareMapError::Forward { layer: i, reads: j });
            }
            if source[j] != j {
                return Err(ShareMapError::Chain {
                    layer: i,
                    reads: j,
                    next: source[j],
                });
            }
        }
        Ok(ShareMap { source })
    }

    /// Like `new`, but checks the length against the model's layer count first.
    pub fn for_model(source: Vec<usize>, n_layers: usize) -> Result<Self, ShareMapError> {
        if source.len() != n_layers {
            return Err(ShareMapError::WrongLength {
                expected: n_layers,
                found: source.len(),
            });
        }
        Self::new(source)
    }

    /// A copy where `layer` reads `source`'s slot, with chains resolved: if `source`
    /// itself reads `k`, `layer` reads `k`. Layers that read `layer` follow it too.
    pub fn with_shared(&self, layer: usize, source: usize) -> Result<Self, ShareMapError> {
        let n = self.source.len();
        if layer >= n || source >= n {
            return Err(ShareMapError::OutOfRange {
                layer,
                reads: source,
                n_layers: n,
            });
        }
        if source >= layer {
            return Err(ShareMapError::Forward {
                layer,
                reads: source,
            });
        }
        if self.source[layer] != layer {
            return Err(ShareMapError::AlreadyShared { layer });
        }
        let root = self.source[source];
        let mut next = self.source.clone();
        for s in next.iter_mut() {
            if *s == layer {
                *s = root;
            }
        }
        Self::new(next)
    }

    pub fn n_layers(&self) -> usize {
        self.source.len()
    }

    /// The layer whose cache slot layer `layer` attends over.
    pub fn source(&self, layer: usize) -> usize {
        self.source[layer]
    }

    pub fn sources(&self) -> &[usize] {
        &self.source
    }

    pub fn owns_slot(&self, layer: usize) -> bool {
        self.source[layer] == layer
    }

    /// Layers that read another layer's cache.
    pub fn shared_count(&self) -> usize {
        self.source
            .iter()
            .enumerate()
            .filter(|(i, &j)| *i != j)
            .count()
    }

    pub fn owner_count(&self) -> usize {
        self.n_layers() - self.shared_count()
    }

    pub fn is_identity(&self) -> bool {
        self.shared_count() == 0
    }

    /// Cache slot index of every layer: owners are numbered in layer order, a shared
    /// layer gets its source's slot. This is the only link between layers' caches.
    pub fn slot_of_layers(&self) -> Vec<usize> {
        let mut slot_of_owner = vec![usize::MAX; self.n_layers()];
        let mut next = 0;
        for (i, slot) in slot_of_owner.iter_mut().enumerate() {
            if self.source[i] == i {
                *slot = next;
                next += 1;
            }
        }
        (0..self.n_layers())
            .map(|i| slot_of_owner[self.source[i]])
            .collect()
    }

    /// Shared pairs `(layer, source)` in layer order.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        self.source
            .iter()
            .enumerate()
            .filter(|(i, &j)| *i != j)
            .map(|(i, &j)| (i, j))
            .collect()
    }
}

impl fmt::Debug for ShareMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShareMap({self})")
    }
}

impl fmt::Display for ShareMap {
    /// `identity` or `5<-2 9<-4 ...` (layer <- source).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs = self.pairs();
        if pairs.is_empty() {
            return write!(f, "identity ({} layers)", self.n_layers());
        }
        let text: Vec<String> = pairs.iter().map(|(i, j)| format!("{i}<-{j}")).collect();
        write!(f, "{}", text.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_owns_every_slot() {
        let m = ShareMap::identity(4);
        assert!(m.is_identity());
        assert_eq!(m.slot_of_layers(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn rejects_forward_out_of_range_chain_and_wrong_length() {
        assert_eq!(
            ShareMap::new(vec![0, 2, 2]).unwrap_err(),
            ShareMapError::Forward { layer: 1, reads: 2 }
        );
        assert!(matches!(
            ShareMap::new(vec![0, 1, 7]).unwrap_err(),
            ShareMapError::OutOfRange { layer: 2, .. }
        ));
        assert_eq!(
            ShareMap::new(vec![0, 0, 1]).unwrap_err(),
            ShareMapError::Chain {
                layer: 2,
                reads: 1,
                next: 0
            }
        );
        assert!(matches!(
            ShareMap::for_model(vec![0, 1], 3).unwrap_err(),
            ShareMapError::WrongLength {
                expected: 3,
                found: 2
            }
        ));
        let msg = ShareMap::new(vec![0, 0, 1]).unwrap_err().to_string();
        assert!(msg.contains("layer 2") && msg.contains("chains"), "{msg}");
    }

    #[test]
    fn with_shared_resolves_chains_both_ways() {
        // 2 reads 1, then 1 reads 0: 2 must follow to 0.
        let m = ShareMap::identity(4).with_shared(2, 1).unwrap();
        let m = m.with_shared(1, 0).unwrap();
        assert_eq!(m.sources(), &[0, 0, 0, 3]);
        // 3 reads 2, which reads 0: 3 reads 0.
        let m = m.with_shared(3, 2).unwrap();
        assert_eq!(m.sources(), &[0, 0, 0, 0]);
        assert_eq!(m.owner_count(), 1);
        assert_eq!(
            m.with_shared(3, 1).unwrap_err(),
            ShareMapError::AlreadyShared { layer: 3 }
        );
    }

    #[test]
    fn with_shared_follows_source_chain() {
        let m = ShareMap::identity(4).with_shared(1, 0).unwrap();
        let m = m.with_shared(3, 1).unwrap();
        assert_eq!(m.sources(), &[0, 0, 2, 0]);
        assert_eq!(m.shared_count(), 2);
        assert_eq!(m.slot_of_layers(), vec![0, 0, 1, 0]);
        assert!(m.with_shared(1, 0).is_err());
        assert!(m.with_shared(2, 3).is_err());
    }
}
