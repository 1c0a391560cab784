//! The GGUF reader against hostile input: a deterministic corpus of mutated and
//! truncated variants of a small GGUF built here byte by byte (independently of
//! the crate's writer). Every variant must give Ok or Err — never a panic — in
//! bounded time and with allocation bounded by the input's size. Targeted
//! variants also check that the right error is reported. A last test opens the
//! real default model.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use kvsharer::gguf::{
    parse_header, write_with_metadata, Array, GgmlType, GgufError, GgufFile, Header, Value,
    MAX_ARRAY_DEPTH,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

// The integration tests' shared support (for the default model's path). This file
// is a binary of its own, not a module of `tests/it`, because of the counting
// `#[global_allocator]` below: it would replace the allocator of every suite there.
#[path = "it/support/mod.rs"]
mod support;

// ---------------------------------------------------------------------------
// Allocation accounting: a per-thread high-water mark over the system allocator,
// so the corpus can check the parser never allocates what a file merely claims.

struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged
// and only updates const-initialised thread-local counters (no allocation, no
// destructors), so System's guarantees carry over.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract of GlobalAlloc::alloc.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract of GlobalAlloc::alloc_zeroed.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract of GlobalAlloc::dealloc.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract of GlobalAlloc::realloc.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the peak extra bytes it had allocated.
fn with_peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get).saturating_sub(base);
    (out, peak)
}

// ---------------------------------------------------------------------------
// An independent little GGUF encoder that records where every length, count,
// type code, dimension and offset field sits, so mutations can target them.

const T_U8: u32 = 0;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;

#[derive(Clone, Debug)]
enum RawVal {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(u8),
    Str(Vec<u8>),
    /// Element type and elements (written without per-element type tags).
    Arr(u32, Vec<RawVal>),
    /// Any declared type with a hand-made payload.
    Raw(u32, Vec<u8>),
}

impl RawVal {
    fn str(s: &str) -> Self {
        RawVal::Str(s.as_bytes().to_vec())
    }

    fn code(&self) -> u32 {
        match self {
            RawVal::U32(_) => 4,
            RawVal::I32(_) => T_I32,
            RawVal::F32(_) => T_F32,
            RawVal::Bool(_) => T_BOOL,
            RawVal::Str(_) => T_STR,
            RawVal::Arr(..) => T_ARR,
            RawVal::Raw(t, _) => *t,
        }
    }
}

#[derive(Clone, Debug)]
struct RawTensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

#[derive(Clone, Debug)]
struct RawGguf {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kvs: Vec<(Vec<u8>, RawVal)>,
    tensors: Vec<RawTensor>,
    pad_to: u64,
    data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum FieldKind {
    Version,
    Count,
    StrLen,
    TypeCode,
    NDims,
    Dim,
    TensorOffset,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    offset: usize,
    kind: FieldKind,
}

struct Encoded {
    bytes: Vec<u8>,
    /// Offsets where one section or item ends and the next begins.
    boundaries: Vec<usize>,
    fields: Vec<Field>,
}

struct Enc {
    out: Vec<u8>,
    fields: Vec<Field>,
}

impl Enc {
    fn u32(&mut self, v: u32, kind: Option<FieldKind>) {
        if let Some(kind) = kind {
            self.fields.push(Field {
                offset: self.out.len(),
                kind,
            });
        }
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64, kind: Option<FieldKind>) {
        if let Some(kind) = kind {
            self.fields.push(Field {
                offset: self.out.len(),
                kind,
            });
        }
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn str(&mut self, s: &[u8]) {
        self.u64(s.len() as u64, Some(FieldKind::StrLen));
        self.out.extend_from_slice(s);
    }

    fn payload(&mut self, v: &RawVal) {
        match v {
            RawVal::U32(x) => self.u32(*x, None),
            RawVal::I32(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            RawVal::F32(x) => self.out.extend_from_slice(&x.to_le_bytes()),
            RawVal::Bool(b) => self.out.push(*b),
            RawVal::Str(s) => self.str(s),
            RawVal::Arr(elem, items) => {
                self.u32(*elem, Some(FieldKind::TypeCode));
                self.u64(items.len() as u64, Some(FieldKind::Count));
                items.iter().for_each(|i| self.payload(i));
            }
            RawVal::Raw(_, bytes) => self.out.extend_from_slice(bytes),
        }
    }
}

impl RawGguf {
    fn encode(&self) -> Encoded {
        let mut e = Enc {
            out: Vec::new(),
            fields: Vec::new(),
        };
        let mut boundaries = Vec::new();
        e.out.extend_from_slice(&self.magic);
        boundaries.push(e.out.len());
        e.u32(self.version, Some(FieldKind::Version));
        e.u64(
            self.n_tensors.unwrap_or(self.tensors.len() as u64),
            Some(FieldKind::Count),
        );
        e.u64(
            self.n_kv.unwrap_or(self.kvs.len() as u64),
            Some(FieldKind::Count),
        );
        boundaries.push(e.out.len());
        for (key, value) in &self.kvs {
            e.str(key);
            e.u32(value.code(), Some(FieldKind::TypeCode));
            e.payload(value);
            boundaries.push(e.out.len());
        }
        for t in &self.tensors {
            e.str(&t.name);
            e.u32(t.dims.len() as u32, Some(FieldKind::NDims));
            for &d in &t.dims {
                e.u64(d, Some(FieldKind::Dim));
            }
            e.u32(t.ty, Some(FieldKind::TypeCode));
            e.u64(t.offset, Some(FieldKind::TensorOffset));
            boundaries.push(e.out.len());
        }
        while !(e.out.len() as u64).is_multiple_of(self.pad_to) {
            e.out.push(0);
        }
        let data_start = e.out.len();
        boundaries.push(data_start);
        e.out.extend_from_slice(&self.data);
        for t in &self.tensors {
            boundaries.push(data_start + t.offset as usize);
        }
        boundaries.push(e.out.len());
        Encoded {
            bytes: e.out,
            boundaries,
            fields: e.fields,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.encode().bytes
    }

    fn kv_mut(&mut self, key: &str) -> &mut RawVal {
        &mut self
            .kvs
            .iter_mut()
            .find(|(k, _)| k == key.as_bytes())
            .unwrap_or_else(|| panic!("base file has no key {key}"))
            .1
    }
}

/// The small valid model every variant starts from.
fn base_file() -> RawGguf {
    let mut rng = StdRng::seed_from_u64(0x6767_7566);
    let kv = |k: &str, v: RawVal| (k.as_bytes().to_vec(), v);
    let tokens = ["<s>", "</s>", "a", "Ġb", "ü", "✓"];
    let kvs = vec![
        kv("general.architecture", RawVal::str("llama")),
        kv("general.alignment", RawVal::U32(32)),
        kv("llama.block_count", RawVal::U32(2)),
        kv("llama.rope.freq_base", RawVal::F32(10000.0)),
        kv(
            "tokenizer.ggml.tokens",
            RawVal::Arr(T_STR, tokens.iter().map(|t| RawVal::str(t)).collect()),
        ),
        kv(
            "tokenizer.ggml.scores",
            RawVal::Arr(T_F32, (0..6).map(|i| RawVal::F32(-(i as f32))).collect()),
        ),
        kv(
            "tokenizer.ggml.token_type",
            RawVal::Arr(T_I32, (0..6).map(|i| RawVal::I32(i % 3)).collect()),
        ),
        kv("tokenizer.ggml.add_bos_token", RawVal::Bool(1)),
        kv("kvsharer.version", RawVal::U32(1)),
        kv(
            "kvsharer.share_map",
            RawVal::Arr(T_I32, vec![RawVal::I32(-1), RawVal::I32(0)]),
        ),
        kv("kvsharer.note", RawVal::str("calibrated")),
        kv(
            "test.nested",
            RawVal::Arr(
                T_ARR,
                vec![
                    RawVal::Arr(
                        T_U8,
                        vec![RawVal::Raw(T_U8, vec![1]), RawVal::Raw(T_U8, vec![2])],
                    ),
                    RawVal::Arr(T_STR, vec![RawVal::str("x")]),
                ],
            ),
        ),
        kv("test.u64", RawVal::Raw(T_U64, 42u64.to_le_bytes().to_vec())),
    ];
    let specs: [(&str, &[u64], GgmlType); 4] = [
        ("token_embd.weight", &[32, 4], GgmlType::Q8_0),
        ("blk.0.attn_norm.weight", &[32], GgmlType::F32),
        ("blk.1.attn_q.weight", &[32, 2], GgmlType::Q4_1),
        ("output.weight", &[64, 1], GgmlType::F16),
    ];
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    for (name, dims, ty) in specs {
        let n = ty.row_bytes(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
        tensors.push(RawTensor {
            name: name.as_bytes().to_vec(),
            dims: dims.to_vec(),
            ty: ty as u32,
            offset: data.len() as u64,
        });
        data.extend((0..n).map(|_| rng.random::<u8>()));
        while data.len() % 32 != 0 {
            data.push(0);
        }
    }
    RawGguf {
        magic: *b"GGUF",
        version: 3,
        n_tensors: None,
        n_kv: None,
        kvs,
        tensors,
        pad_to: 32,
        data,
    }
}

// ---------------------------------------------------------------------------
// Running one variant.

#[derive(Default)]
struct Tally {
    ok: usize,
    err: usize,
    panics: Vec<String>,
    slowest: Duration,
    worst_alloc_ratio: f64,
    rewritten: usize,
}

/// Allowed parse allocation: a constant factor of the input plus fixed overhead.
fn alloc_budget(input_len: usize) -> usize {
    16 * input_len + 64 * 1024
}

const MAX_PARSE_TIME: Duration = Duration::from_millis(500);

struct Runner {
    tally: Tally,
    dir: tempfile::TempDir,
    index: usize,
}

impl Runner {
    fn new() -> Self {
        Runner {
            tally: Tally::default(),
            dir: tempfile::tempdir().unwrap(),
            index: 0,
        }
    }

    /// Parses `bytes` both in memory and through a file; returns the parse result.
    fn run(&mut self, label: &str, bytes: &[u8]) -> Option<Result<Header, GgufError>> {
        self.index += 1;
        let start = Instant::now();
        let parsed = catch_unwind(AssertUnwindSafe(|| with_peak_alloc(|| parse_header(bytes))));
        let elapsed = start.elapsed();
        let Ok((result, peak)) = parsed else {
            self.tally.panics.push(format!("parse_header: {label}"));
            return None;
        };
        // A busy machine can stall any process for a moment; an input that is really
        // slow to parse is slow again when retried.
        let elapsed = if elapsed >= MAX_PARSE_TIME {
            let again = Instant::now();
            let _ = parse_header(bytes);
            again.elapsed()
        } else {
            elapsed
        };
        self.tally.slowest = self.tally.slowest.max(elapsed);
        assert!(elapsed < MAX_PARSE_TIME, "{label}: parse took {elapsed:?}");
        assert!(
            peak <= alloc_budget(bytes.len()),
            "{label}: parsing {} bytes allocated {peak} bytes",
            bytes.len()
        );
        self.tally.worst_alloc_ratio = self
            .tally
            .worst_alloc_ratio
            .max(peak as f64 / bytes.len().max(1) as f64);

        let path = self.dir.path().join("variant.gguf");
        std::fs::write(&path, bytes).unwrap();
        let opened = catch_unwind(AssertUnwindSafe(|| GgufFile::open(&path)));
        match (&result, opened) {
            (_, Err(_)) => self.tally.panics.push(format!("GgufFile::open: {label}")),
            (Ok(h), Ok(Ok(f))) => {
                self.tally.ok += 1;
                check_accepted_invariants(label, bytes, h, &f);
                // Every accepted file must also survive a rewrite; sample a few.
                if self.index.is_multiple_of(53) {
                    check_rewrite(label, &f, self.dir.path());
                    self.tally.rewritten += 1;
                }
            }
            (Err(e), Ok(Err(e2))) => {
                self.tally.err += 1;
                assert_eq!(e.to_string(), e2.to_string(), "{label}");
                assert!(
                    !e.to_string().contains('\n'),
                    "{label}: multi-line error {e}"
                );
            }
            (Ok(_), Ok(Err(e))) => panic!("{label}: parse_header accepted, open failed: {e}"),
            (Err(e), Ok(Ok(_))) => panic!("{label}: open accepted, parse_header failed: {e}"),
        }
        Some(result)
    }
}

/// What the reader promises about any file it accepts, re-checked independently.
fn check_accepted_invariants(label: &str, bytes: &[u8], h: &Header, f: &GgufFile) {
    assert!(matches!(h.version, 2 | 3), "{label}");
    assert!(h.alignment.is_power_of_two(), "{label}");
    assert!(h.data_offset as usize <= bytes.len(), "{label}");
    let mut spans = Vec::new();
    for t in &h.tensors {
        assert!((1..=4).contains(&t.dims.len()), "{label}: {}", t.name);
        assert!(t.dims.iter().all(|&d| d > 0), "{label}: {}", t.name);
        assert_eq!(t.offset % h.alignment, 0, "{label}: {}", t.name);
        let expect =
            t.ggml_type.row_bytes(t.dims[0]).unwrap() * t.dims[1..].iter().product::<u64>();
        assert_eq!(t.n_bytes, expect, "{label}: {}", t.name);
        let start = h.data_offset + t.offset;
        let end = start + t.n_bytes;
        assert!(end as usize <= bytes.len(), "{label}: {}", t.name);
        assert_eq!(f.tensor_data(t), &bytes[start as usize..end as usize]);
        spans.push((start, end));
    }
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "{label}: overlap"
    );
    let mut keys: Vec<&str> = h.metadata.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        h.metadata.len(),
        "{label}: duplicate key accepted"
    );
}

fn tensor_hashes(f: &GgufFile) -> Vec<(String, Vec<u8>)> {
    f.tensors()
        .iter()
        .map(|t| (t.name.clone(), Sha256::digest(f.tensor_data(t)).to_vec()))
        .collect()
}

fn check_rewrite(label: &str, f: &GgufFile, dir: &Path) {
    let out = dir.join("rewritten.gguf");
    let update = [("kvsharer.test".to_owned(), Value::U32(7))];
    match write_with_metadata(f, &update, &[], &out) {
        Ok(()) => {
            let g = GgufFile::open(&out).unwrap_or_else(|e| panic!("{label}: reopen: {e}"));
            let mut expected = f.metadata().to_vec();
            match expected.iter_mut().find(|(k, _)| k == "kvsharer.test") {
                Some(slot) => slot.1 = Value::U32(7),
                None => expected.push(update[0].clone()),
            }
            assert_eq!(
                format!("{:?}", g.metadata()),
                format!("{expected:?}"),
                "{label}"
            );
            assert_eq!(tensor_hashes(&g), tensor_hashes(f), "{label}");
        }
        // A variant may hold values no writer should repeat (e.g. alignment 2^31
        // leaves no room); refusing them is fine, panicking is not.
        Err(e) => eprintln!("{label}: rewrite refused: {e}"),
    }
}

// ---------------------------------------------------------------------------
// The corpus.

fn interesting_u64(original: u64, file_len: u64) -> Vec<u64> {
    vec![
        0,
        1,
        original.wrapping_add(1),
        original.wrapping_sub(1),
        original.wrapping_mul(2),
        original | 1,
        file_len,
        file_len + 1,
        0xFFFF_FFFF,
        1 << 32,
        1 << 40,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 31,
        u64::MAX,
    ]
}

fn interesting_u32(original: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..=14).collect();
    v.extend([
        original.wrapping_add(1),
        31,
        43,
        100,
        0x0300_0000,
        i32::MAX as u32,
        u32::MAX,
    ]);
    v
}

#[test]
fn hostile_corpus_never_panics() {
    let started = Instant::now();
    let base = base_file();
    let enc = base.encode();
    let mut runner = Runner::new();

    let header = runner
        .run("base", &enc.bytes)
        .unwrap()
        .expect("base file must parse");
    assert_eq!(header.metadata.len(), base.kvs.len());
    assert_eq!(header.tensors.len(), 4);
    assert_eq!(
        header.metadata[0],
        ("general.architecture".to_owned(), Value::from("llama"))
    );
    let data_offset = header.data_offset as usize;

    // 1. Truncation at every byte of the header and every boundary (and either side).
    let mut cuts: Vec<usize> = (0..=data_offset).collect();
    for &b in &enc.boundaries {
        cuts.extend([b.saturating_sub(1), b, b + 1]);
    }
    cuts.sort();
    cuts.dedup();
    for cut in cuts.into_iter().filter(|&c| c < enc.bytes.len()) {
        let r = runner.run(&format!("truncate at {cut}"), &enc.bytes[..cut]);
        if cut < data_offset {
            // Tensors exist, so any cut before the data section loses something.
            assert!(matches!(r, Some(Err(_))), "truncation at {cut} accepted");
        }
    }

    // 2. Every recorded field set to interesting values.
    let file_len = enc.bytes.len() as u64;
    for field in &enc.fields {
        let at = field.offset;
        match field.kind {
            FieldKind::Version | FieldKind::TypeCode | FieldKind::NDims => {
                let orig = u32::from_le_bytes(enc.bytes[at..at + 4].try_into().unwrap());
                for v in interesting_u32(orig) {
                    let mut b = enc.bytes.clone();
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    runner.run(&format!("{:?} at {at} = {v:#x}", field.kind), &b);
                }
            }
            FieldKind::Count | FieldKind::StrLen | FieldKind::Dim | FieldKind::TensorOffset => {
                let orig = u64::from_le_bytes(enc.bytes[at..at + 8].try_into().unwrap());
                let mut values = interesting_u64(orig, file_len);
                if field.kind == FieldKind::TensorOffset {
                    values.extend(base.tensors.iter().map(|t| t.offset));
                    values.extend([16, 32 * 1000, base.data.len() as u64]);
                }
                for v in values {
                    let mut b = enc.bytes.clone();
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    let r = runner.run(&format!("{:?} at {at} = {v:#x}", field.kind), &b);
                    if v > i64::MAX as u64 {
                        assert!(
                            matches!(r, Some(Err(_))),
                            "{:?} {v:#x} accepted",
                            field.kind
                        );
                    }
                }
            }
        }
    }

    // 3. Random bit flips (mostly in the header, where the parser looks).
    // KVSHARER_FUZZ_ITERS scales the random parts up for a long run (README).
    let scale: usize = std::env::var("KVSHARER_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(1, |n: usize| (n / 8000).max(1));
    let seed = std::env::var("KVSHARER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xB17F_11B5u64);
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..6000 * scale {
        let mut b = enc.bytes.clone();
        let span = if i % 4 == 0 { b.len() } else { data_offset };
        for _ in 0..rng.random_range(1..=8) {
            let pos = rng.random_range(0..span);
            b[pos] ^= 1 << rng.random_range(0..8);
        }
        runner.run(&format!("bit flips #{i}"), &b);
    }

    // 4. Random byte runs: overwrite 1..16 bytes with 0x00, 0xFF or noise.
    for i in 0..2000 * scale {
        let mut b = enc.bytes.clone();
        let pos = rng.random_range(0..data_offset);
        let len = rng.random_range(1..=16).min(b.len() - pos);
        let fill: u8 = match i % 3 {
            0 => 0x00,
            1 => 0xFF,
            _ => rng.random(),
        };
        b[pos..pos + len].fill(fill);
        runner.run(&format!("byte run #{i} at {pos}+{len} = {fill:#x}"), &b);
    }

    // 5. Structural variants with the errors they must produce.
    let structural = structural_variants(&base);
    let n_structural = structural.len();
    for (label, file, expect) in structural {
        match runner.run(&label, &file.bytes()) {
            Some(result) => {
                if let Err(msg) = expect(&result) {
                    panic!("{label}: {msg}; got {:?}", result.map(|h| h.tensors.len()));
                }
            }
            None => continue,
        }
    }

    let t = &runner.tally;
    let total = t.ok + t.err + t.panics.len();
    println!(
        "hostile corpus: {total} variants ({n_structural} structural), ok {}, err {}, panics {}, \
         {} accepted files rewritten, slowest parse {:?}, worst allocation {:.1} x input, {:?} total",
        t.ok,
        t.err,
        t.panics.len(),
        t.rewritten,
        t.slowest,
        t.worst_alloc_ratio,
        started.elapsed()
    );
    assert!(t.panics.is_empty(), "panicked on: {:#?}", t.panics);
    assert!(total >= 10_000, "corpus has only {total} variants");
    assert!(
        t.ok > 100 && t.err > 1000,
        "corpus should exercise both outcomes"
    );
}

type Expectation = Box<dyn Fn(&Result<Header, GgufError>) -> Result<(), String>>;

fn expect_err(pred: impl Fn(&GgufError) -> bool + 'static, what: &'static str) -> Expectation {
    Box::new(move |r| match r {
        Err(e) if pred(e) => Ok(()),
        Err(e) => Err(format!("expected {what}, got error: {e}")),
        Ok(_) => Err(format!("expected {what}, got Ok")),
    })
}

fn expect_ok() -> Expectation {
    Box::new(|r| match r {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("expected Ok, got {e}")),
    })
}

fn expect_any() -> Expectation {
    Box::new(|_| Ok(()))
}

/// A valid payload of each GGUF type, for retyping keys.
fn value_of_type(code: u32) -> RawVal {
    match code {
        0 | 1 => RawVal::Raw(code, vec![7]),
        2 | 3 => RawVal::Raw(code, vec![7, 0]),
        4 => RawVal::U32(7),
        5 => RawVal::I32(-7),
        6 => RawVal::F32(0.5),
        7 => RawVal::Bool(0),
        8 => RawVal::str("seven"),
        9 => RawVal::Arr(T_STR, vec![RawVal::str("7")]),
        _ => RawVal::Raw(code, 7u64.to_le_bytes().to_vec()),
    }
}

fn structural_variants(base: &RawGguf) -> Vec<(String, RawGguf, Expectation)> {
    let mut out: Vec<(String, RawGguf, Expectation)> = Vec::new();
    let mut add = |label: String, f: RawGguf, e: Expectation| out.push((label, f, e));

    let mut f = base.clone();
    f.kvs.push(f.kvs[0].clone());
    add(
        "duplicate key".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::DuplicateKey(k) if k == "general.architecture"),
            "DuplicateKey",
        ),
    );

    let mut f = base.clone();
    f.tensors[2].name = f.tensors[0].name.clone();
    add(
        "duplicate tensor".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::DuplicateTensor(_)),
            "DuplicateTensor",
        ),
    );

    for key in ["kvsharer.version", "kvsharer.share_map", "kvsharer.note"] {
        for code in 0..=12 {
            let mut f = base.clone();
            *f.kv_mut(key) = value_of_type(code);
            add(format!("{key} retyped to {code}"), f, expect_ok());
        }
    }

    for (label, v, e) in [
        (
            "alignment 0",
            RawVal::U32(0),
            expect_err(|e| matches!(e, GgufError::BadAlignment(0)), "BadAlignment"),
        ),
        (
            "alignment 3",
            RawVal::U32(3),
            expect_err(|e| matches!(e, GgufError::BadAlignment(3)), "BadAlignment"),
        ),
        ("alignment 2^31", RawVal::U32(1 << 31), expect_any()),
        (
            "alignment as u64",
            RawVal::Raw(T_U64, 32u64.to_le_bytes().to_vec()),
            expect_err(
                |e| {
                    matches!(
                        e,
                        GgufError::WrongType {
                            expected: "u32",
                            found: "u64",
                            ..
                        }
                    )
                },
                "WrongType",
            ),
        ),
        (
            "alignment as string",
            RawVal::str("32"),
            expect_err(|e| matches!(e, GgufError::WrongType { .. }), "WrongType"),
        ),
        ("alignment 16", RawVal::U32(16), expect_ok()),
        (
            "alignment 64 with 32-aligned offsets",
            RawVal::U32(64),
            expect_err(
                |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("not a multiple of the alignment 64")),
                "misaligned",
            ),
        ),
    ] {
        let mut f = base.clone();
        *f.kv_mut("general.alignment") = v;
        add(label.into(), f, e);
    }

    for i in 0..base.tensors.len() {
        for delta in [1u64, 8, 16, 31] {
            let mut f = base.clone();
            f.tensors[i].offset += delta;
            add(
                format!("tensor {i} offset +{delta}"),
                f,
                expect_err(
                    |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("not a multiple")),
                    "misaligned",
                ),
            );
        }
        let mut f = base.clone();
        f.tensors[i].offset = f.data.len() as u64;
        add(
            format!("tensor {i} offset at data end"),
            f,
            expect_err(
                |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("past the end")),
                "out of range",
            ),
        );
        let mut f = base.clone();
        f.tensors[i].offset = (i64::MAX as u64) & !31;
        add(
            format!("tensor {i} offset near i64::MAX"),
            f,
            expect_err(|e| matches!(e, GgufError::BadTensor { .. }), "out of range"),
        );
        if i > 0 {
            let mut f = base.clone();
            f.tensors[i].offset = f.tensors[i - 1].offset;
            add(
                format!("tensor {i} overlaps {}", i - 1),
                f,
                expect_err(
                    |e| matches!(e, GgufError::TensorOverlap { .. }),
                    "TensorOverlap",
                ),
            );
        }
    }

    for code in (0..64).chain([1000, u32::MAX]) {
        let mut f = base.clone();
        f.tensors[1].ty = code;
        let e = if GgmlType::from_u32(code).is_none() {
            expect_err(
                move |e| matches!(e, GgufError::UnknownTensorType { code: c, .. } if *c == code),
                "UnknownTensorType",
            )
        } else {
            // Known types resize the tensor: a row may not divide, may overrun
            // the data or overlap its neighbour; any of those is an error, or it fits.
            expect_any()
        };
        add(format!("tensor type {code}"), f, e);
    }

    for n_dims in [0usize, 5, 6] {
        let mut f = base.clone();
        f.tensors[1].dims = vec![1; n_dims];
        add(
            format!("{n_dims} dims"),
            f,
            expect_err(
                |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("dimensions")),
                "bad n_dims",
            ),
        );
    }
    for (label, dims, e) in [
        (
            "zero dim",
            vec![32, 0],
            expect_err(
                |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("zero")),
                "zero dim",
            ),
        ),
        (
            "dims overflow",
            vec![1 << 32, 1 << 32],
            expect_err(
                |e| matches!(e, GgufError::BadTensor { reason, .. } if reason.contains("too many")),
                "overflow",
            ),
        ),
        (
            "dims product 2^63",
            vec![1 << 31, 1 << 32],
            expect_err(|e| matches!(e, GgufError::BadTensor { .. }), "overflow"),
        ),
        (
            "negative dim",
            vec![32, u64::MAX],
            expect_err(
                |e| matches!(e, GgufError::NegativeSize { .. }),
                "NegativeSize",
            ),
        ),
        ("row not whole blocks", vec![31], expect_any()),
    ] {
        let mut f = base.clone();
        f.tensors[0].dims = dims;
        add(label.into(), f, e);
    }
    let mut f = base.clone();
    f.tensors[0].dims = vec![33, 4];
    add(
        "q8_0 row of 33".into(),
        f,
        expect_err(
            |e| {
                e.to_string()
                    .contains("not a multiple of the q8_0 block size 32")
            },
            "block size",
        ),
    );

    for depth in 1..=MAX_ARRAY_DEPTH + 3 {
        let mut v = RawVal::Arr(T_U8, vec![RawVal::Raw(T_U8, vec![1])]);
        for _ in 1..depth {
            v = RawVal::Arr(T_ARR, vec![v]);
        }
        let mut f = base.clone();
        *f.kv_mut("test.nested") = v;
        let e = if depth <= MAX_ARRAY_DEPTH {
            expect_ok()
        } else {
            expect_err(
                |e| matches!(e, GgufError::ArrayTooDeep { .. }),
                "ArrayTooDeep",
            )
        };
        add(format!("array depth {depth}"), f, e);
    }

    let mut f = base.clone();
    *f.kv_mut("tokenizer.ggml.add_bos_token") = RawVal::Bool(2);
    add(
        "bool byte 2".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::BadBool { byte: 2, .. }),
            "BadBool",
        ),
    );

    let mut f = base.clone();
    f.kvs[3].0 = b"bad\xff\xfekey".to_vec();
    add(
        "non-UTF-8 key".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::InvalidUtf8 { .. }),
            "InvalidUtf8",
        ),
    );
    let mut f = base.clone();
    *f.kv_mut("tokenizer.ggml.tokens") = RawVal::Arr(T_STR, vec![RawVal::Str(vec![0xC3])]);
    add(
        "non-UTF-8 token".into(),
        f,
        expect_err(
            |e| {
                e.to_string()
                    .contains("element 0 of array 'tokenizer.ggml.tokens'")
            },
            "InvalidUtf8",
        ),
    );
    let mut f = base.clone();
    f.kvs[2].0 = Vec::new();
    add(
        "empty key".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::EmptyKey { index: 2, .. }),
            "EmptyKey",
        ),
    );
    let mut f = base.clone();
    f.tensors[0].name = vec![b'n'; 64];
    add(
        "64-byte tensor name".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::BadTensorName { .. }),
            "BadTensorName",
        ),
    );
    let mut f = base.clone();
    *f.kv_mut("test.u64") = RawVal::Raw(13, vec![0; 8]);
    add(
        "value type 13".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::UnknownValueType { code: 13, .. }),
            "UnknownValueType",
        ),
    );
    let mut f = base.clone();
    *f.kv_mut("test.u64") = RawVal::Arr(T_ARR + 100, vec![]);
    add(
        "array element type 109".into(),
        f,
        expect_err(
            |e| matches!(e, GgufError::UnknownValueType { code: 109, .. }),
            "UnknownValueType",
        ),
    );

    for (version, e) in [
        (
            0u32,
            expect_err(
                |e| matches!(e, GgufError::UnsupportedVersion(0)),
                "UnsupportedVersion",
            ),
        ),
        (
            1,
            expect_err(
                |e| matches!(e, GgufError::UnsupportedVersion(1)),
                "UnsupportedVersion",
            ),
        ),
        (2, expect_ok()),
        (
            4,
            expect_err(
                |e| matches!(e, GgufError::UnsupportedVersion(4)),
                "UnsupportedVersion",
            ),
        ),
        (
            0x0300_0000,
            expect_err(|e| matches!(e, GgufError::BigEndian { .. }), "BigEndian"),
        ),
    ] {
        let mut f = base.clone();
        f.version = version;
        add(format!("version {version:#x}"), f, e);
    }
    let mut f = base.clone();
    f.magic = *b"GGML";
    add(
        "magic GGML".into(),
        f,
        expect_err(|e| matches!(e, GgufError::BadMagic { .. }), "BadMagic"),
    );

    for (label, n_kv, n_tensors, e) in [
        (
            "n_kv u64::MAX",
            Some(u64::MAX),
            None,
            expect_err(
                |e| matches!(e, GgufError::NegativeSize { .. }),
                "NegativeSize",
            ),
        ),
        (
            "n_kv 2^40",
            Some(1 << 40),
            None,
            expect_err(
                |e| matches!(e, GgufError::CountTooLarge { .. }),
                "CountTooLarge",
            ),
        ),
        (
            "n_kv +1",
            Some(base.kvs.len() as u64 + 1),
            None,
            expect_any(),
        ),
        (
            "n_kv -1",
            Some(base.kvs.len() as u64 - 1),
            None,
            expect_any(),
        ),
        (
            "n_tensors i64::MAX",
            None,
            Some(i64::MAX as u64),
            expect_err(
                |e| matches!(e, GgufError::CountTooLarge { .. }),
                "CountTooLarge",
            ),
        ),
        (
            "n_tensors 2^63",
            None,
            Some(1 << 63),
            expect_err(
                |e| e.to_string().contains("looks like a negative size"),
                "NegativeSize",
            ),
        ),
        (
            "n_tensors +1",
            None,
            Some(base.tensors.len() as u64 + 1),
            expect_any(),
        ),
        ("n_tensors 0", None, Some(0), expect_any()),
    ] {
        let mut f = base.clone();
        f.n_kv = n_kv;
        f.n_tensors = n_tensors;
        add(label.into(), f, e);
    }

    for (label, val, e) in [
        (
            "string length 2^40",
            RawVal::Raw(T_STR, (1u64 << 40).to_le_bytes().to_vec()),
            expect_err(
                |e| matches!(e, GgufError::CountTooLarge { .. }),
                "CountTooLarge",
            ),
        ),
        (
            "string length u64::MAX",
            RawVal::Raw(T_STR, u64::MAX.to_le_bytes().to_vec()),
            expect_err(
                |e| matches!(e, GgufError::NegativeSize { .. }),
                "NegativeSize",
            ),
        ),
        (
            "u8 array of 2^40",
            RawVal::Raw(
                T_ARR,
                [T_U8.to_le_bytes().as_slice(), &(1u64 << 40).to_le_bytes()].concat(),
            ),
            expect_err(
                |e| matches!(e, GgufError::CountTooLarge { .. }),
                "CountTooLarge",
            ),
        ),
        (
            "string array of 2^60",
            RawVal::Raw(
                T_ARR,
                [T_STR.to_le_bytes().as_slice(), &(1u64 << 60).to_le_bytes()].concat(),
            ),
            expect_err(
                |e| matches!(e, GgufError::CountTooLarge { .. }),
                "CountTooLarge",
            ),
        ),
        (
            "nested array of u64::MAX",
            RawVal::Raw(
                T_ARR,
                [T_ARR.to_le_bytes().as_slice(), &u64::MAX.to_le_bytes()].concat(),
            ),
            expect_err(
                |e| matches!(e, GgufError::NegativeSize { .. }),
                "NegativeSize",
            ),
        ),
    ] {
        let mut f = base.clone();
        *f.kv_mut("kvsharer.note") = val;
        add(label.into(), f, e);
    }

    // A model without tensors may end right after its metadata.
    let mut f = base.clone();
    f.tensors.clear();
    f.data.clear();
    f.pad_to = 1;
    add("no tensors, unpadded".into(), f, expect_ok());

    out
}

// ---------------------------------------------------------------------------

#[test]
fn retyped_kvsharer_keys_are_reported_by_typed_getters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("retyped.gguf");
    let mut f = base_file();
    *f.kv_mut("kvsharer.version") = RawVal::str("one");
    *f.kv_mut("kvsharer.note") = RawVal::U32(5);
    *f.kv_mut("kvsharer.share_map") = RawVal::Arr(T_STR, vec![RawVal::str("0")]);
    std::fs::write(&path, f.bytes()).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let err = g.get_u32("kvsharer.version").unwrap_err();
    assert_eq!(
        err.to_string(),
        "metadata key 'kvsharer.version' has type string, expected u32"
    );
    assert!(matches!(
        g.get_str("kvsharer.note").unwrap_err(),
        GgufError::WrongType {
            expected: "string",
            found: "u32",
            ..
        }
    ));
    let map = g.get_array("kvsharer.share_map").unwrap();
    assert_eq!(map.to_i32_vec(), None);
    assert_eq!(map.as_strings().map(<[String]>::len), Some(1));
    assert_eq!(
        g.get("kvsharer.note"),
        Some(&Value::U32(5)),
        "exact stored type is kept"
    );
    assert!(matches!(g.get("test.nested"), Some(Value::Array(Array::Array(v))) if v.len() == 2));
}

#[test]
fn real_model_opens_and_rewrites_losslessly() {
    let path = support::default_model_path();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let n_blocks = f.get_u32("llama.block_count").unwrap();
    assert_eq!(n_blocks, 30);
    for i in 0..n_blocks {
        let prefix = format!("blk.{i}.");
        let n = f
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with(&prefix))
            .count();
        assert!(n >= 9, "block {i} has only {n} tensors");
        for part in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            assert!(
                f.tensor(&format!("blk.{i}.{part}.weight")).is_some(),
                "blk.{i}.{part}.weight missing"
            );
        }
    }
    assert!(!f.tensors().iter().any(|t| t.name.starts_with("blk.30.")));
    let tokens = f.get_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.as_strings().unwrap().len(), 49152);
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes, "{}", t.name);
    }

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shared.gguf");
    let updates = [
        ("kvsharer.version".to_owned(), Value::U32(1)),
        (
            "kvsharer.share_map".to_owned(),
            Value::Array(Array::I32(
                (0..30)
                    .map(|i| if i % 2 == 1 { i - 1 } else { -1 })
                    .collect(),
            )),
        ),
    ];
    write_with_metadata(&f, &updates, &["kvsharer."], &out).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let mut expected = f.metadata().to_vec();
    expected.extend(updates.iter().cloned());
    assert_eq!(format!("{:?}", g.metadata()), format!("{expected:?}"));
    assert_eq!(tensor_hashes(&g), tensor_hashes(&f));
    let offsets = |x: &GgufFile| x.tensors().iter().map(|t| t.offset).collect::<Vec<_>>();
    assert_eq!(offsets(&g), offsets(&f), "offsets kept");
    assert_eq!(
        Sha256::digest(&g.bytes()[g.data_offset() as usize..]),
        Sha256::digest(&f.bytes()[f.data_offset() as usize..]),
        "data section identical"
    );

    // Dropping our keys again restores the original file byte for byte.
    let back = dir.path().join("back.gguf");
    write_with_metadata(&g, &[], &["kvsharer."], &back).unwrap();
    assert_eq!(
        Sha256::digest(std::fs::read(&back).unwrap()),
        Sha256::digest(f.bytes()),
        "round trip reproduces the original file"
    );
}
