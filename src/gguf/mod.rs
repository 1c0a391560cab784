//! GGUF (v2 and v3, little-endian) reading and writing, without ggml.
//!
//! Reading memory-maps the file and parses its header with a bounded parser
//! ([`parse_header`]) that treats the file as hostile: it is this crate's
//! security boundary. Metadata keeps its exact on-disk types and order, so
//! [`write_with_metadata`] can copy a model with a few keys changed while every
//! other key and every tensor byte stays as it was.

mod parse;
pub mod types;
mod value;
mod write;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use parse::{
    parse_header, Header, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS,
    MAX_TENSOR_NAME_LEN,
};
pub use types::GgmlType;
pub use value::{Array, Value};
pub use write::{write_with_metadata, write_with_tensors, GgufBuilder, NewTensor};

/// Everything that can go wrong reading or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot read {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file: starts with \"{found}\", expected \"GGUF\"")]
    BadMagic { found: String },
    #[error(
        "big-endian GGUF (version field reads {raw:#010x}); only little-endian files are supported"
    )]
    BigEndian { raw: u32 },
    #[error("unsupported GGUF version {0}; only versions 2 and 3 are supported")]
    UnsupportedVersion(u32),
    #[error("file truncated: {what} at offset {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what} at offset {offset} is {value:#x}, which looks like a negative size ({signed}); the file is corrupt", signed = *value as i64)]
    NegativeSize {
        what: String,
        offset: u64,
        value: u64,
    },
    #[error(
        "{what} at offset {offset} is {count}, more than the {available} remaining bytes can hold"
    )]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        available: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key #{index} at offset {offset} is empty")]
    EmptyKey { index: u64, offset: u64 },
    #[error("duplicate metadata key '{}'", shown(.0))]
    DuplicateKey(String),
    #[error("metadata key '{}' has unknown value type {code} at offset {offset}", shown(.key))]
    UnknownValueType { key: String, code: u32, offset: u64 },
    #[error("metadata key '{}' nests arrays more than {max} deep", shown(.key))]
    ArrayTooDeep { key: String, max: usize },
    #[error("metadata key '{}' has bool byte {byte} at offset {offset}, neither 0 nor 1", shown(.key))]
    BadBool { key: String, byte: u8, offset: u64 },
    #[error("general.alignment is {0}, which is not a power of two")]
    BadAlignment(u64),
    #[error("missing metadata key '{}'", shown(.0))]
    MissingKey(String),
    #[error("metadata key '{}' has type {found}, expected {expected}", shown(.key))]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key '{}' holds {value}, which does not fit in {expected}", shown(.key))]
    OutOfRange {
        key: String,
        expected: &'static str,
        value: String,
    },
    #[error("tensor #{index} at offset {offset}: {reason}")]
    BadTensorName {
        index: u64,
        offset: u64,
        reason: String,
    },
    #[error("tensor '{}' {reason}", shown(.name))]
    BadTensor { name: String, reason: String },
    #[error("tensor '{}' has unknown ggml type {code} at offset {offset}", shown(.name))]
    UnknownTensorType {
        name: String,
        code: u32,
        offset: u64,
    },
    #[error("duplicate tensor name '{}'", shown(.0))]
    DuplicateTensor(String),
    #[error("tensors '{}' and '{}' overlap in the data section", shown(.first), shown(.second))]
    TensorOverlap { first: String, second: String },
    #[error("tensor '{}' data is {actual} bytes, but shape {dims:?} of type {ty} needs {expected}", shown(.name))]
    TensorDataSize {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        expected: u64,
        actual: u64,
    },
    #[error("refusing to write {}: it is the input file", path.display())]
    SameFile { path: PathBuf },
    #[error("output path {} is a directory", path.display())]
    OutputIsDirectory { path: PathBuf },
}

/// Where one tensor's bytes are and how to read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Validated against overflow when the tensor was parsed or added.
        self.dims.iter().product()
    }
}

/// An opened, validated GGUF file whose bytes stay memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    header: Header,
    key_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
    /// (device, inode) of the opened file, so a writer can refuse to replace it
    /// even through another path or a hard link.
    file_id: Option<(u64, u64)>,
    map: Option<Mmap>,
}

impl std::fmt::Debug for GgufFile {
    // Metadata holds whole vocabularies; a summary is what a reader wants.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("n_metadata", &self.header.metadata.len())
            .field("n_tensors", &self.header.tensors.len())
            .field("file_size", &self.file_size())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps `path` and validates its header and tensor layout.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(open_err(std::io::Error::other("is a directory")));
        }
        // An empty file can't be mapped on every platform; it is simply not GGUF.
        let map = if meta.len() == 0 {
            None
        } else {
            // SAFETY: the map is read-only and lives as long as `self`. Another
            // process truncating or rewriting the file while it is mapped would
            // invalidate the slices we hand out; like every mmap-based model
            // loader we accept that, and our own writer never modifies a file in
            // place (it renames a new file over the path).
            Some(unsafe { Mmap::map(&file) }.map_err(open_err)?)
        };
        let bytes = map.as_deref().unwrap_or(&[]);
        let header = parse_header(bytes)?;
        Ok(Self::from_parts(path, header, file_identity(&meta), map))
    }

    fn from_parts(
        path: &Path,
        header: Header,
        file_id: Option<(u64, u64)>,
        map: Option<Mmap>,
    ) -> Self {
        let key_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        GgufFile {
            path: path.to_path_buf(),
            header,
            key_index,
            tensor_index,
            file_id,
            map,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    pub fn file_size(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Metadata pairs in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.header.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.header.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    /// An integer key that fits in u32, whatever integer width it was stored with.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        if !v.is_integer() {
            return Err(wrong_type(key, "u32", v));
        }
        v.as_u32().ok_or_else(|| GgufError::OutOfRange {
            key: key.into(),
            expected: "u32",
            value: format!("{v:?}"),
        })
    }

    /// A non-negative integer key, whatever integer width it was stored with.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        if !v.is_integer() {
            return Err(wrong_type(key, "u64", v));
        }
        v.as_u64().ok_or_else(|| GgufError::OutOfRange {
            key: key.into(),
            expected: "u64",
            value: format!("{v:?}"),
        })
    }

    /// An f32 key, or an f64 one narrowed.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| wrong_type(key, "f32", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "bool", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.header.tensors[i])
    }

    /// The bytes of a tensor of this file. Bounds were validated at open; a
    /// `TensorInfo` from some other file that falls outside this one gives an
    /// empty slice rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = self
            .header
            .data_offset
            .checked_add(t.offset)
            .and_then(|start| Some((start, start.checked_add(t.n_bytes)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range.and_then(|r| self.bytes().get(r)).unwrap_or(&[])
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub(crate) fn file_id(&self) -> Option<(u64, u64)> {
        self.file_id
    }
}

/// File-supplied text as error messages show it: control characters escaped (so
/// a hostile key can't make a message span lines or drive the terminal) and
/// long strings cut short.
pub(crate) fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 96;
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(MAX_CHARS).collect();
    let ellipsis = if chars.next().is_some() { "…" } else { "" };
    format!("{}{ellipsis}", head.escape_debug())
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.into(),
        expected,
        found: found.type_name(),
    }
}

/// (device, inode) on Unix; elsewhere callers fall back to comparing canonical paths.
pub(crate) fn file_identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

#[cfg(test)]
mod tests;
