//! Typed GGUF metadata values. Each variant keeps the exact on-disk type so a
//! rewritten file carries every key with the type it was read with.

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous metadata array. Nested arrays carry their own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<Array>),
}

/// GGUF's `gguf_type` codes, as written before every value.
pub(crate) mod code {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// The short name used in error messages and `type_name`.
    pub fn name(code: u32) -> &'static str {
        match code {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            BOOL => "bool",
            STRING => "string",
            ARRAY => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
            _ => "unknown",
        }
    }
}

impl Value {
    pub(crate) fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => code::U8,
            Value::I8(_) => code::I8,
            Value::U16(_) => code::U16,
            Value::I16(_) => code::I16,
            Value::U32(_) => code::U32,
            Value::I32(_) => code::I32,
            Value::F32(_) => code::F32,
            Value::Bool(_) => code::BOOL,
            Value::String(_) => code::STRING,
            Value::Array(_) => code::ARRAY,
            Value::U64(_) => code::U64,
            Value::I64(_) => code::I64,
            Value::F64(_) => code::F64,
        }
    }

    /// GGUF's name for this value's type ("u32", "string", "array", ...).
    pub fn type_name(&self) -> &'static str {
        code::name(self.type_code())
    }

    /// Any integer type holding a signed-widened value; `None` for non-integers.
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Whether this is one of the eight integer types.
    pub fn is_integer(&self) -> bool {
        self.as_i128().is_some()
    }

    /// Any non-negative integer, whatever its stored width.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer in `0..=u32::MAX`, whatever its stored width.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_i128().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer in i64's range, whatever its stored width.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// An `F32`, or an `F64` narrowed to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    pub(crate) fn element_code(&self) -> u32 {
        match self {
            Array::U8(_) => code::U8,
            Array::I8(_) => code::I8,
            Array::U16(_) => code::U16,
            Array::I16(_) => code::I16,
            Array::U32(_) => code::U32,
            Array::I32(_) => code::I32,
            Array::F32(_) => code::F32,
            Array::Bool(_) => code::BOOL,
            Array::String(_) => code::STRING,
            Array::U64(_) => code::U64,
            Array::I64(_) => code::I64,
            Array::F64(_) => code::F64,
            Array::Array(_) => code::ARRAY,
        }
    }

    /// GGUF's name for the element type ("string", "i32", "array", ...).
    pub fn element_type_name(&self) -> &'static str {
        code::name(self.element_code())
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// Every element of an integer array, widened; `None` for other arrays.
    fn to_i128_vec(&self) -> Option<Vec<i128>> {
        fn widen<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Array::U8(v) => widen(v),
            Array::I8(v) => widen(v),
            Array::U16(v) => widen(v),
            Array::I16(v) => widen(v),
            Array::U32(v) => widen(v),
            Array::I32(v) => widen(v),
            Array::U64(v) => widen(v),
            Array::I64(v) => widen(v),
            _ => return None,
        })
    }

    /// Any integer array whose every element fits in u32.
    pub fn to_u32_vec(&self) -> Option<Vec<u32>> {
        if let Array::U32(v) = self {
            return Some(v.clone());
        }
        self.to_i128_vec()?
            .into_iter()
            .map(|x| u32::try_from(x).ok())
            .collect()
    }

    /// Any integer array whose every element fits in i32.
    pub fn to_i32_vec(&self) -> Option<Vec<i32>> {
        if let Array::I32(v) = self {
            return Some(v.clone());
        }
        self.to_i128_vec()?
            .into_iter()
            .map(|x| i32::try_from(x).ok())
            .collect()
    }

    /// An `F32` array, or an `F64` array narrowed to f32.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }

    /// How deeply arrays nest inside this one (a flat array has depth 1).
    pub(crate) fn depth(&self) -> usize {
        match self {
            Array::Array(inner) => 1 + inner.iter().map(Array::depth).max().unwrap_or(0),
            _ => 1,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(v)
            }
        }
    )*};
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, Array => Array, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_accessors_respect_range() {
        assert_eq!(Value::I32(-1).as_u64(), None);
        assert_eq!(Value::I32(-1).as_i64(), Some(-1));
        assert_eq!(Value::U64(u64::MAX).as_i64(), None);
        assert_eq!(Value::U64(u64::MAX).as_u64(), Some(u64::MAX));
        assert_eq!(Value::U64(1 << 32).as_u32(), None);
        assert_eq!(Value::U64(7).as_u32(), Some(7));
        assert_eq!(Value::I8(5).as_u32(), Some(5));
        assert_eq!(Value::F32(1.0).as_u32(), None);
        assert_eq!(Value::Bool(true).as_u64(), None);
        assert_eq!(Value::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(Value::U32(1).as_f32(), None);
        assert_eq!(Value::from("x").as_str(), Some("x"));
        assert_eq!(Value::U8(1).type_name(), "u8");
        assert_eq!(Value::Array(Array::Bool(vec![])).type_name(), "array");
    }

    #[test]
    fn array_conversions_respect_range() {
        assert_eq!(Array::I64(vec![1, 2]).to_u32_vec(), Some(vec![1, 2]));
        assert_eq!(Array::I64(vec![1, -2]).to_u32_vec(), None);
        assert_eq!(Array::U64(vec![1 << 40]).to_i32_vec(), None);
        assert_eq!(Array::I16(vec![-3]).to_i32_vec(), Some(vec![-3]));
        assert_eq!(Array::F32(vec![1.0]).to_u32_vec(), None);
        assert_eq!(Array::F64(vec![0.25]).to_f32_vec(), Some(vec![0.25]));
        assert_eq!(Array::String(vec!["a".into()]).len(), 1);
        assert!(Array::Array(vec![]).is_empty());
        let nested = Array::Array(vec![
            Array::U8(vec![]),
            Array::Array(vec![Array::I8(vec![])]),
        ]);
        assert_eq!(nested.depth(), 3);
    }
}
