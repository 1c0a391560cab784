//! Writing GGUF files: a builder for new files and a metadata-editing copy.
//! Both write to a temporary file beside the destination and rename it into
//! place, so a reader never sees a half-written model.

use std::collections::HashSet;
use std::fs::{self, Permissions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::parse::{align_up, alignment_of, tensor_bytes, MAX_ARRAY_DEPTH, MAX_TENSOR_NAME_LEN};
use super::{file_identity, Array, GgmlType, GgufError, GgufFile, Value};

/// The version this crate writes for new files.
const NEW_FILE_VERSION: u32 = 3;
/// Padding bytes are zero, as ggml writes them.
const ZEROS: [u8; 256] = [0; 256];

/// Assembles a new GGUF file in memory (metadata and tensor data) and writes it.
#[derive(Clone, Debug, Default)]
pub struct GgufBuilder {
    metadata: Vec<(String, Value)>,
    tensors: Vec<BuiltTensor>,
}

#[derive(Clone, Debug)]
struct BuiltTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl GgufBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key`, replacing an existing value in place or appending a new key.
    pub fn set(&mut self, key: &str, v: Value) {
        set_in_place(&mut self.metadata, key, v);
    }

    pub fn remove(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Adds a tensor; `data` must be exactly the bytes `dims` of type `ty` take.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let taken = self.tensors.iter().any(|t| t.name == name);
        check_new_tensor(name, dims, ty, data.len(), taken)?;
        self.tensors.push(BuiltTensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Writes a GGUF v3 file atomically (temp file, fsync, rename, fsync dir).
    pub fn write_to(&self, path: &Path) -> Result<(), GgufError> {
        let tensors: Vec<TensorToWrite<'_>> = self
            .tensors
            .iter()
            .map(|t| TensorToWrite {
                name: &t.name,
                dims: &t.dims,
                ty: t.ty,
                data: &t.data,
            })
            .collect();
        let perms = default_permissions();
        write_gguf(path, NEW_FILE_VERSION, &self.metadata, &tensors, perms)
    }
}

/// Copy `src` to `out` with metadata `updates` applied (replace keys that exist,
/// in place; append new ones), after dropping keys that start with any of
/// `remove_prefixes`. Tensor infos keep their order and every tensor byte is
/// copied unchanged; offsets are laid out afresh with the (possibly updated)
/// alignment, which reproduces the source offsets for any canonically laid-out
/// file. Tensor data streams from the source map. Atomic: written to a temp file
/// in `out`'s directory, fsynced and renamed; the temp file is removed on error.
/// Refuses when `out` is `src`'s file (same path, symlink or hard link).
pub fn write_with_metadata(
    src: &GgufFile,
    updates: &[(String, Value)],
    remove_prefixes: &[&str],
    out: &Path,
) -> Result<(), GgufError> {
    write_with_tensors(src, updates, remove_prefixes, &|_| false, &[], out)
}

/// A tensor to add to a copy (`write_with_tensors`).
#[derive(Clone, Debug)]
pub struct NewTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

/// [`write_with_metadata`] that also leaves out the source's tensors `drop` names
/// and appends `extra` (after checking their sizes and that no name repeats).
pub fn write_with_tensors(
    src: &GgufFile,
    updates: &[(String, Value)],
    remove_prefixes: &[&str],
    drop: &dyn Fn(&str) -> bool,
    extra: &[NewTensor],
    out: &Path,
) -> Result<(), GgufError> {
    refuse_same_file(src, out)?;
    let mut metadata: Vec<(String, Value)> = src
        .metadata()
        .iter()
        .filter(|(k, _)| !remove_prefixes.iter().any(|p| k.starts_with(p)))
        .cloned()
        .collect();
    for (key, value) in updates {
        set_in_place(&mut metadata, key, value.clone());
    }
    let mut tensors: Vec<TensorToWrite<'_>> = src
        .tensors()
        .iter()
        .filter(|t| !drop(&t.name))
        .map(|t| TensorToWrite {
            name: &t.name,
            dims: &t.dims,
            ty: t.ggml_type,
            data: src.tensor_data(t),
        })
        .collect();
    for t in extra {
        let taken = tensors.iter().any(|w| w.name == t.name);
        check_new_tensor(&t.name, &t.dims, t.ty, t.data.len(), taken)?;
        tensors.push(TensorToWrite {
            name: &t.name,
            dims: &t.dims,
            ty: t.ty,
            data: &t.data,
        });
    }
    let perms = fs::metadata(src.path()).ok().map(|m| m.permissions());
    write_gguf(out, src.version(), &metadata, &tensors, perms)
}

fn set_in_place(metadata: &mut Vec<(String, Value)>, key: &str, v: Value) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some((_, slot)) => *slot = v,
        None => metadata.push((key.to_owned(), v)),
    }
}

fn refuse_same_file(src: &GgufFile, out: &Path) -> Result<(), GgufError> {
    let same = || GgufError::SameFile {
        path: out.to_path_buf(),
    };
    let Ok(out_meta) = fs::metadata(out) else {
        // Nothing there (or unreadable, which the write itself will report).
        return Ok(());
    };
    if src.file_id().is_some() && file_identity(&out_meta) == src.file_id() {
        return Err(same());
    }
    if let (Ok(a), Ok(b)) = (fs::canonicalize(src.path()), fs::canonicalize(out)) {
        if a == b {
            return Err(same());
        }
    }
    Ok(())
}

/// A tensor about to be added: a valid name not `taken` yet, and exactly the bytes
/// `dims` of `ty` take.
fn check_new_tensor(
    name: &str,
    dims: &[u64],
    ty: GgmlType,
    len: usize,
    taken: bool,
) -> Result<(), GgufError> {
    check_tensor_name(name)?;
    if taken {
        return Err(GgufError::DuplicateTensor(name.into()));
    }
    let expected = tensor_bytes(name, dims, ty)?;
    if len as u64 != expected {
        return Err(GgufError::TensorDataSize {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            expected,
            actual: len as u64,
        });
    }
    Ok(())
}

fn check_tensor_name(name: &str) -> Result<(), GgufError> {
    if name.is_empty() || name.len() > MAX_TENSOR_NAME_LEN {
        return Err(GgufError::BadTensor {
            name: name.into(),
            reason: format!(
                "name is {} bytes, must be 1..={MAX_TENSOR_NAME_LEN}",
                name.len()
            ),
        });
    }
    Ok(())
}

struct TensorToWrite<'a> {
    name: &'a str,
    dims: &'a [u64],
    ty: GgmlType,
    data: &'a [u8],
}

/// Validates everything a reader would check, then writes atomically.
fn write_gguf(
    out: &Path,
    version: u32,
    metadata: &[(String, Value)],
    tensors: &[TensorToWrite<'_>],
    perms: Option<Permissions>,
) -> Result<(), GgufError> {
    let alignment = alignment_of(metadata)?;
    let mut keys = HashSet::new();
    for (index, (key, value)) in metadata.iter().enumerate() {
        if key.is_empty() {
            return Err(GgufError::EmptyKey {
                index: index as u64,
                offset: 0,
            });
        }
        if !keys.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey(key.clone()));
        }
        if let Value::Array(a) = value {
            if a.depth() > MAX_ARRAY_DEPTH {
                return Err(GgufError::ArrayTooDeep {
                    key: key.clone(),
                    max: MAX_ARRAY_DEPTH,
                });
            }
        }
    }
    let mut names = HashSet::new();
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut next_offset = 0u64;
    for t in tensors {
        check_tensor_name(t.name)?;
        if !names.insert(t.name) {
            return Err(GgufError::DuplicateTensor(t.name.into()));
        }
        let n_bytes = tensor_bytes(t.name, t.dims, t.ty)?;
        if t.data.len() as u64 != n_bytes {
            return Err(GgufError::TensorDataSize {
                name: t.name.into(),
                dims: t.dims.to_vec(),
                ty: t.ty,
                expected: n_bytes,
                actual: t.data.len() as u64,
            });
        }
        offsets.push(next_offset);
        next_offset = next_offset
            .checked_add(n_bytes)
            .and_then(|end| align_up(end, alignment))
            .ok_or_else(|| GgufError::BadTensor {
                name: t.name.into(),
                reason: "ends past the largest representable file offset".into(),
            })?;
    }

    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&version.to_le_bytes());
    put_u64(&mut header, tensors.len() as u64);
    put_u64(&mut header, metadata.len() as u64);
    for (key, value) in metadata {
        put_str(&mut header, key);
        header.extend_from_slice(&value.type_code().to_le_bytes());
        put_value(&mut header, value);
    }
    for (t, offset) in tensors.iter().zip(&offsets) {
        put_str(&mut header, t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims {
            put_u64(&mut header, d);
        }
        header.extend_from_slice(&(t.ty as u32).to_le_bytes());
        put_u64(&mut header, *offset);
    }

    write_atomically(out, perms, |w| {
        w.write_all(&header)?;
        write_padding(w, header.len() as u64, alignment)?;
        for t in tensors {
            w.write_all(t.data)?;
            write_padding(w, t.data.len() as u64, alignment)?;
        }
        Ok(())
    })
}

fn write_padding(w: &mut impl Write, written: u64, alignment: u64) -> std::io::Result<()> {
    let mut pad = (alignment - written % alignment) % alignment;
    while pad > 0 {
        let n = pad.min(ZEROS.len() as u64);
        w.write_all(&ZEROS[..n as usize])?;
        pad -= n;
    }
    Ok(())
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::Array(a) => put_array(buf, a),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(buf: &mut Vec<u8>, a: &Array) {
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    buf.extend_from_slice(&a.element_code().to_le_bytes());
    put_u64(buf, a.len() as u64);
    match a {
        Array::U8(v) => buf.extend_from_slice(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::Bool(v) => buf.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(buf, s)),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Array(v) => v.iter().for_each(|inner| put_array(buf, inner)),
    }
}

/// Files we create are readable by everyone, as `cp` would leave them (umask applies).
fn default_permissions() -> Option<Permissions> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(Permissions::from_mode(0o644))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Writes `out` through a temp file in the same directory: write, flush, fsync,
/// rename over `out`, fsync the directory. On any error the temp file is dropped,
/// which deletes it.
fn write_atomically(
    out: &Path,
    perms: Option<Permissions>,
    body: impl FnOnce(&mut BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<(), GgufError> {
    if out.is_dir() {
        return Err(GgufError::OutputIsDirectory {
            path: out.to_path_buf(),
        });
    }
    let dir: PathBuf = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GgufError::Write { path, source }
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kvsharer-").suffix(".gguf.tmp");
    if let Some(p) = perms {
        builder.permissions(p);
    }
    let tmp = builder.tempfile_in(&dir).map_err(write_err(&dir))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        body(&mut w).map_err(write_err(tmp.path()))?;
        w.flush().map_err(write_err(tmp.path()))?;
    }
    tmp.as_file().sync_all().map_err(write_err(tmp.path()))?;
    tmp.persist(out).map_err(|e| GgufError::Write {
        path: out.to_path_buf(),
        source: e.error,
    })?;
    #[cfg(unix)]
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(&dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn failure_mid_write_removes_temp_and_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.gguf");
        fs::write(&out, b"previous contents").unwrap();
        let mut saw_temp = false;
        let err = write_atomically(&out, None, |w| {
            w.write_all(&[7u8; 3 << 20])?;
            w.flush()?;
            // The partial file exists beside the destination while writing...
            saw_temp = entries(dir.path()).iter().any(|n| n.ends_with(".gguf.tmp"));
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(saw_temp);
        // ...and is gone after the failure, with the old file untouched.
        assert!(matches!(&err, GgufError::Write { .. }), "{err}");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(entries(dir.path()), ["model.gguf"]);
        assert_eq!(fs::read(&out).unwrap(), b"previous contents");
    }

    #[test]
    fn successful_write_replaces_file_with_requested_mode() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.gguf");
        fs::write(&out, b"old").unwrap();
        write_atomically(&out, default_permissions(), |w| w.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["model.gguf"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o600, 0o600, "owner can read and write: {mode:o}");
            assert_eq!(mode & 0o133, 0, "no exec or group/other write: {mode:o}");
        }
    }

    #[test]
    fn padding_reaches_the_next_multiple() {
        for (written, alignment, expected) in [
            (0, 32, 0),
            (1, 32, 31),
            (32, 32, 0),
            (300, 256, 212),
            (5, 1, 0),
        ] {
            let mut v = Vec::new();
            write_padding(&mut v, written, alignment).unwrap();
            assert_eq!(v.len() as u64, expected);
            assert!(v.iter().all(|&b| b == 0));
        }
    }
}
