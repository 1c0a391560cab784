//! Bounded GGUF header parser. Files come from strangers, so every length and
//! count is checked against the bytes that remain before anything is allocated,
//! and all offset arithmetic is checked.

use std::collections::HashSet;

use super::value::code;
use super::{shown, Array, GgmlType, GgufError, TensorInfo, Value};

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides [`DEFAULT_ALIGNMENT`]; must be a `u32` power of two.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Arrays of arrays may nest this deep (a flat array is depth 1). Real files use 1.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Longest tensor name ggml accepts (`GGML_MAX_NAME` minus the NUL).
pub const MAX_TENSOR_NAME_LEN: usize = 63;
/// ggml keeps tensor shapes in four dimensions.
pub const MAX_DIMS: usize = 4;

const MAGIC: &[u8; 4] = b"GGUF";
/// Smallest possible encoding of one metadata pair: empty key length, type, one byte.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor info: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Everything before the data section, validated against the file's length.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset where the data section (tensor offset 0) begins.
    pub data_offset: u64,
    /// Metadata pairs in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
}

/// Parse and validate the header of a whole GGUF file held in `bytes`.
///
/// Checks that every tensor lies inside `bytes`, is aligned and overlaps no other.
/// Never panics and allocates at most a small multiple of `bytes.len()`.
pub fn parse_header(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut r = Reader { bytes, pos: 0 };

    let magic = r.take(4, || "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = r.u32(|| "version".into())?;
    if version & 0xFFFF == 0 && version != 0 {
        return Err(GgufError::BigEndian { raw: version });
    }
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.count(MIN_TENSOR_INFO_BYTES, || "tensor count".into())?;
    let n_kv = r.count(MIN_KV_BYTES, || "metadata count".into())?;

    let metadata = read_metadata(&mut r, n_kv)?;
    let alignment = alignment_of(&metadata)?;
    let mut tensors = read_tensor_infos(&mut r, n_tensors, alignment)?;

    let header_end = r.pos as u64;
    let file_len = bytes.len() as u64;
    let aligned = align_up(header_end, alignment).ok_or(GgufError::Truncated {
        what: "data section padding".into(),
        offset: header_end,
        needed: alignment,
        available: file_len - header_end,
    })?;
    let data_offset = if aligned <= file_len {
        aligned
    } else if tensors.is_empty() {
        // Writers pad even a tensor-less file, but a file cut right after its
        // metadata still has everything a reader needs.
        file_len
    } else {
        return Err(GgufError::Truncated {
            what: "data section padding".into(),
            offset: header_end,
            needed: aligned - header_end,
            available: file_len - header_end,
        });
    };
    check_tensor_placement(&mut tensors, file_len - data_offset)?;

    Ok(Header {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

/// `v` rounded up to a multiple of the power of two `alignment`, if it fits.
pub(crate) fn align_up(v: u64, alignment: u64) -> Option<u64> {
    Some(v.checked_add(alignment - 1)? & !(alignment - 1))
}

/// The alignment the metadata asks for, validated the way ggml validates it.
pub(crate) fn alignment_of(metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let Value::U32(a) = *value else {
        return Err(GgufError::WrongType {
            key: ALIGNMENT_KEY.into(),
            expected: "u32",
            found: value.type_name(),
        });
    };
    if !a.is_power_of_two() {
        return Err(GgufError::BadAlignment(a.into()));
    }
    Ok(a.into())
}

fn read_metadata(r: &mut Reader<'_>, n_kv: u64) -> Result<Vec<(String, Value)>, GgufError> {
    // `count` bounded n_kv by the remaining bytes, so this allocation is too.
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut seen = HashSet::new();
    for index in 0..n_kv {
        let key_offset = r.pos as u64;
        let key = r.string(|| format!("metadata key #{index}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey {
                index,
                offset: key_offset,
            });
        }
        if !seen.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        let type_offset = r.pos as u64;
        let type_code = r.u32(|| format!("type of metadata key '{}'", shown(&key)))?;
        let value = match type_code {
            code::ARRAY => Value::Array(read_array(r, &key, 1)?),
            _ => read_scalar(r, type_code, &key, type_offset)?,
        };
        metadata.push((key, value));
    }
    Ok(metadata)
}

fn read_scalar(
    r: &mut Reader<'_>,
    type_code: u32,
    key: &str,
    type_offset: u64,
) -> Result<Value, GgufError> {
    let what = || format!("value of metadata key '{}'", shown(key));
    Ok(match type_code {
        code::U8 => Value::U8(r.u8(what)?),
        code::I8 => Value::I8(r.u8(what)? as i8),
        code::U16 => Value::U16(u16::from_le_bytes(r.array(what)?)),
        code::I16 => Value::I16(i16::from_le_bytes(r.array(what)?)),
        code::U32 => Value::U32(r.u32(what)?),
        code::I32 => Value::I32(i32::from_le_bytes(r.array(what)?)),
        code::F32 => Value::F32(f32::from_le_bytes(r.array(what)?)),
        code::BOOL => Value::Bool(r.bool(key)?),
        code::STRING => Value::String(r.string(what)?),
        code::U64 => Value::U64(r.u64(what)?),
        code::I64 => Value::I64(i64::from_le_bytes(r.array(what)?)),
        code::F64 => Value::F64(f64::from_le_bytes(r.array(what)?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.into(),
                code: type_code,
                offset: type_offset,
            })
        }
    })
}

/// Reads an array's element type, count and elements; `depth` is 1 for a top-level array.
fn read_array(r: &mut Reader<'_>, key: &str, depth: usize) -> Result<Array, GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: key.into(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    let type_offset = r.pos as u64;
    let elem = r.u32(|| format!("element type of array '{}'", shown(key)))?;
    let min_elem_bytes = match elem {
        code::U8 | code::I8 | code::BOOL => 1,
        code::U16 | code::I16 => 2,
        code::U32 | code::I32 | code::F32 => 4,
        code::U64 | code::I64 | code::F64 => 8,
        // A string is at least its length; a nested array at least its type and count.
        code::STRING => 8,
        code::ARRAY => 4 + 8,
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.into(),
                code: elem,
                offset: type_offset,
            })
        }
    };
    let n = r.count(min_elem_bytes, || {
        format!("length of array '{}'", shown(key))
    })? as usize;
    let what = || format!("elements of array '{}'", shown(key));

    fn fixed<const N: usize, T>(
        r: &mut Reader<'_>,
        n: usize,
        what: impl FnOnce() -> String,
        decode: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        // n * N <= remaining bytes: `count` checked it.
        let raw = r.take(n * N, what)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                decode(b)
            })
            .collect())
    }

    Ok(match elem {
        code::U8 => Array::U8(r.take(n, what)?.to_vec()),
        code::I8 => Array::I8(fixed(r, n, what, i8::from_le_bytes)?),
        code::U16 => Array::U16(fixed(r, n, what, u16::from_le_bytes)?),
        code::I16 => Array::I16(fixed(r, n, what, i16::from_le_bytes)?),
        code::U32 => Array::U32(fixed(r, n, what, u32::from_le_bytes)?),
        code::I32 => Array::I32(fixed(r, n, what, i32::from_le_bytes)?),
        code::F32 => Array::F32(fixed(r, n, what, f32::from_le_bytes)?),
        code::U64 => Array::U64(fixed(r, n, what, u64::from_le_bytes)?),
        code::I64 => Array::I64(fixed(r, n, what, i64::from_le_bytes)?),
        code::F64 => Array::F64(fixed(r, n, what, f64::from_le_bytes)?),
        code::BOOL => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(r.bool(key)?);
            }
            Array::Bool(v)
        }
        code::STRING => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(r.string(|| format!("element {i} of array '{}'", shown(key)))?);
            }
            Array::String(v)
        }
        _ => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(r, key, depth + 1)?);
            }
            Array::Array(v)
        }
    })
}

fn read_tensor_infos(
    r: &mut Reader<'_>,
    n_tensors: u64,
    alignment: u64,
) -> Result<Vec<TensorInfo>, GgufError> {
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::new();
    for index in 0..n_tensors {
        let name_offset = r.pos as u64;
        let name = r.string(|| format!("name of tensor #{index}"))?;
        if name.is_empty() || name.len() > MAX_TENSOR_NAME_LEN {
            return Err(GgufError::BadTensorName {
                index,
                offset: name_offset,
                reason: format!(
                    "name is {} bytes, must be 1..={MAX_TENSOR_NAME_LEN}",
                    name.len()
                ),
            });
        }
        if !seen.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        let n_dims = r.u32(|| format!("dimension count of tensor '{}'", shown(&name)))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(bad_tensor(
                &name,
                format!("has {n_dims} dimensions, must be 1..={MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = r.size(|| format!("dimension {d} of tensor '{}'", shown(&name)))?;
            dims.push(dim);
        }
        let type_offset = r.pos as u64;
        let type_code = r.u32(|| format!("type of tensor '{}'", shown(&name)))?;
        let ggml_type =
            GgmlType::from_u32(type_code).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                code: type_code,
                offset: type_offset,
            })?;
        let n_bytes = tensor_bytes(&name, &dims, ggml_type)?;
        let offset = r.size(|| format!("data offset of tensor '{}'", shown(&name)))?;
        if !offset.is_multiple_of(alignment) {
            return Err(bad_tensor(
                &name,
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        });
    }
    Ok(tensors)
}

/// Validates a shape for `ty` and returns its size in bytes.
pub(crate) fn tensor_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(bad_tensor(
            name,
            format!("has {} dimensions, must be 1..={MAX_DIMS}", dims.len()),
        ));
    }
    if let Some(d) = dims.iter().position(|&d| d == 0) {
        return Err(bad_tensor(name, format!("dimension {d} is zero")));
    }
    // ggml counts elements in int64_t.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad_tensor(name, format!("shape {dims:?} has too many elements")))?;
    let row = ty.row_bytes(dims[0]).ok_or_else(|| {
        bad_tensor(
            name,
            format!(
                "row length {} is not a multiple of the {} block size {}",
                dims[0],
                ty.name(),
                ty.block_size()
            ),
        )
    })?;
    let rows = n_elements / dims[0];
    row.checked_mul(rows)
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| {
            bad_tensor(
                name,
                format!("shape {dims:?} of type {ty} is too many bytes"),
            )
        })
}

/// Checks every tensor lies inside the data section and none overlap.
fn check_tensor_placement(tensors: &mut [TensorInfo], data_len: u64) -> Result<(), GgufError> {
    for t in tensors.iter() {
        let end = t.offset.checked_add(t.n_bytes);
        if end.is_none_or(|end| end > data_len) {
            return Err(bad_tensor(
                &t.name,
                format!(
                    "data at offset {} with {} bytes extends past the end of the data section ({data_len} bytes)",
                    t.offset, t.n_bytes
                ),
            ));
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        // In bounds above, so this sum cannot overflow.
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(GgufError::TensorOverlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

fn bad_tensor(name: &str, reason: String) -> GgufError {
    GgufError::BadTensor {
        name: name.into(),
        reason,
    }
}

/// A cursor over the file that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        let rest = &self.bytes[self.pos..];
        if n > rest.len() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                available: rest.len() as u64,
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: impl FnOnce() -> String) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A bool stored as one byte; anything but 0 or 1 would not survive a rewrite.
    fn bool(&mut self, key: &str) -> Result<bool, GgufError> {
        let offset = self.pos as u64;
        match self.u8(|| format!("bool value of metadata key '{}'", shown(key)))? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::BadBool {
                key: key.into(),
                byte,
                offset,
            }),
        }
    }

    /// A u64 that ggml treats as int64_t (dims, offsets): the top bit set means corruption.
    fn size(&mut self, what: impl Fn() -> String) -> Result<u64, GgufError> {
        let offset = self.pos as u64;
        let value = self.u64(&what)?;
        if value > i64::MAX as u64 {
            return Err(GgufError::NegativeSize {
                what: what(),
                offset,
                value,
            });
        }
        Ok(value)
    }

    /// A count of items each taking at least `min_item_bytes`, bounded by what remains.
    fn count(&mut self, min_item_bytes: u64, what: impl Fn() -> String) -> Result<u64, GgufError> {
        let offset = self.pos as u64;
        let count = self.size(&what)?;
        let available = self.remaining();
        if count > available / min_item_bytes {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset,
                count,
                available,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.count(1, &what)? as usize;
        let offset = self.pos as u64;
        let raw = self.take(len, &what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset,
            }),
        }
    }
}
