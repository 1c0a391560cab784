//! KV cache sharing: the map (`ShareMap`) and, in `calibrate`, the search that finds it.

pub mod map;

pub use map::{ShareMap, ShareMapError};
