//! llama.cpp as an oracle: its tokenizer, its forward pass and its GGUF reader,
//! wrapped safely for tests and for the `bench` comparison.
//!
//! This is the only module that calls llama.cpp's `llama_*` API. The runtime never
//! does: it runs its own forward pass on ggml. Everything here is CPU only.
//!
//! llama.cpp logs a great deal to stderr; this module silences it unless the
//! environment variable `KVSHARER_LLAMA_LOG=1` is set when the first model or GGUF
//! file is opened.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

use crate::tokenizer::TokenizerSpec;

/// Failures of the llama.cpp oracle, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error("path {0:?} is not valid UTF-8 without NUL bytes, which llama.cpp needs")]
    BadPath(PathBuf),
    #[error("llama.cpp could not load the model {0:?} (set KVSHARER_LLAMA_LOG=1 to see why)")]
    LoadModel(PathBuf),
    #[error("ggml could not read the GGUF file {0:?} (set KVSHARER_LLAMA_LOG=1 to see why)")]
    ReadGguf(PathBuf),
    #[error("GGUF key {key}: {problem}")]
    GgufKey { key: String, problem: String },
    #[error("text of {0} bytes is too long for llama_tokenize")]
    TextTooLong(usize),
    #[error("llama_tokenize failed with code {0}")]
    Tokenize(i32),
    #[error("context option {name} = {value} is out of range")]
    BadOption { name: &'static str, value: u64 },
    #[error("llama.cpp could not create a context (set KVSHARER_LLAMA_LOG=1 to see why)")]
    CreateContext,
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error("context full: {n_past} tokens held + {n_new} new > n_ctx {n_ctx}")]
    ContextFull {
        n_past: u32,
        n_new: usize,
        n_ctx: u32,
    },
    #[error("llama_decode failed with code {0}")]
    Decode(i32),
    #[error("llama.cpp returned no logits for batch row {0}")]
    MissingLogits(usize),
    #[error("nothing to evaluate: the token list is empty")]
    EmptyInput,
}

/// KV cache element types the oracle can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheType {
    F16,
    Q8_0,
    Q5_1,
    Q5_0,
    Q4_1,
    Iq4Nl,
    Q4_0,
}

impl CacheType {
    fn ggml_type(self) -> sys::ggml_type {
        match self {
            CacheType::F16 => sys::GGML_TYPE_F16,
            CacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
            CacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
            CacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
            CacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
            CacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
            CacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
        }
    }
}

/// Settings for a llama.cpp context. `n_ctx` is rounded up to a multiple of 256 by
/// llama.cpp itself.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    pub n_ctx: u32,
    /// Most tokens handed to one `llama_decode` call.
    pub n_batch: u32,
    /// Most tokens in one physical micro-batch; at most `n_batch`.
    pub n_ubatch: u32,
    pub n_threads: usize,
    pub flash_attn: bool,
    pub type_k: CacheType,
    pub type_v: CacheType,
}

impl Default for ContextOptions {
    fn default() -> Self {
        let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        ContextOptions {
            n_ctx: 2048,
            n_batch: 512,
            n_ubatch: 512,
            n_threads,
            flash_attn: true,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
        }
    }
}

static BACKEND_INIT: Once = Once::new();

/// Drops every llama.cpp / ggml log line.
unsafe extern "C" fn discard_log(
    _level: sys::ggml_log_level,
    _text: *const c_char,
    _user_data: *mut c_void,
) {
}

/// Silences logging (unless asked not to) and initialises the backends, once per
/// process. Logging is silenced first so that backend registration is quiet too.
fn init_llama() {
    BACKEND_INIT.call_once(|| {
        let want_logs = std::env::var("KVSHARER_LLAMA_LOG").is_ok_and(|v| v == "1");
        if !want_logs {
            // SAFETY: `discard_log` is a valid `extern "C"` function for the whole
            // program and ignores its arguments; a null user pointer is allowed.
            unsafe {
                sys::llama_log_set(Some(discard_log), ptr::null_mut());
                sys::ggml_log_set(Some(discard_log), ptr::null_mut());
            }
        }
        // SAFETY: called exactly once, guarded by `Once`, before any model load.
        unsafe { sys::llama_backend_init() };
    });
}

fn path_to_cstring(path: &Path) -> Result<CString, OracleError> {
    let text = path
        .to_str()
        .ok_or_else(|| OracleError::BadPath(path.to_path_buf()))?;
    CString::new(text).map_err(|_| OracleError::BadPath(path.to_path_buf()))
}

/// A llama.cpp model loaded for CPU inference (memory-mapped, no GPU layers).
pub struct LlamaCppModel {
    model: *mut sys::llama_model,
    vocab: *const sys::llama_vocab,
    n_vocab: usize,
}

// SAFETY: a loaded llama_model is immutable; llama.cpp documents tokenization as
// thread-safe and shares one model between many contexts on different threads.
unsafe impl Send for LlamaCppModel {}
// SAFETY: see `Send`; every method here only reads the model.
unsafe impl Sync for LlamaCppModel {}

impl Drop for LlamaCppModel {
    fn drop(&mut self) {
        // SAFETY: `model` came from llama_model_load_from_file, is non-null, and is
        // freed once; contexts borrow `self`, so none outlives this.
        unsafe { sys::llama_model_free(self.model) };
    }
}

/// Whether this build's llama.cpp has a GPU backend to offload layers to (the
/// cargo features `cuda`, `vulkan`, `metal`).
pub fn supports_gpu_offload() -> bool {
    init_llama();
    // SAFETY: a pure query of the registered backends, after llama_backend_init.
    unsafe { sys::llama_supports_gpu_offload() }
}

impl LlamaCppModel {
    /// Loads the model on the CPU.
    pub fn load(path: &Path) -> Result<Self, OracleError> {
        Self::load_offloading(path, 0)
    }

    /// Loads the model with its last `gpu_layers` layers on llama.cpp's GPU
    /// backend (llama.cpp's `-ngl`); without one in this build (see
    /// `supports_gpu_offload`) everything stays on the CPU.
    pub fn load_offloading(path: &Path, gpu_layers: u32) -> Result<Self, OracleError> {
        init_llama();
        let c_path = path_to_cstring(path)?;
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = i32::try_from(gpu_layers).unwrap_or(i32::MAX);
        params.load_mode = sys::LLAMA_LOAD_MODE_MMAP;
        // SAFETY: `c_path` is a valid NUL-terminated string alive for the call;
        // `params` is a fully initialised value.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        if model.is_null() {
            return Err(OracleError::LoadModel(path.to_path_buf()));
        }
        // SAFETY: `model` is a live model; the vocab it returns lives as long as it.
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        // SAFETY: `vocab` belongs to the live model.
        let n_tokens = unsafe { sys::llama_vocab_n_tokens(vocab) };
        let loaded = LlamaCppModel {
            model,
            vocab,
            n_vocab: usize::try_from(n_tokens).unwrap_or(0),
        };
        if vocab.is_null() || loaded.n_vocab == 0 {
            return Err(OracleError::LoadModel(path.to_path_buf()));
        }
        Ok(loaded)
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn check_id(&self, id: u32) -> Result<sys::llama_token, OracleError> {
        match sys::llama_token::try_from(id) {
            Ok(token) if (id as usize) < self.n_vocab => Ok(token),
            _ => Err(OracleError::TokenOutOfRange {
                id,
                n_vocab: self.n_vocab,
            }),
        }
    }

    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, OracleError> {
        let text_len =
            i32::try_from(text.len()).map_err(|_| OracleError::TextTooLong(text.len()))?;
        // About four bytes per token for prose; llama.cpp reports the real need as
        // a negative count when the guess is short.
        let mut capacity = text.len() / 4 + 8;
        loop {
            let mut out: Vec<sys::llama_token> = vec![0; capacity];
            let cap_i32 =
                i32::try_from(capacity).map_err(|_| OracleError::TextTooLong(text.len()))?;
            // SAFETY: `text` is valid for `text_len` bytes (llama.cpp does not need a
            // terminator when the length is given); `out` has room for `cap_i32`
            // tokens; the vocab is alive as long as `self`.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab,
                    text.as_ptr().cast::<c_char>(),
                    text_len,
                    out.as_mut_ptr(),
                    cap_i32,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(OracleError::Tokenize(n));
            }
            if n < 0 {
                let needed = n.unsigned_abs() as usize;
                if needed <= capacity {
                    return Err(OracleError::Tokenize(n));
                }
                capacity = needed;
                continue;
            }
            out.truncate(n as usize);
            return Ok(out.into_iter().map(|t| t as u32).collect());
        }
    }

    /// The bytes llama.cpp renders for one token; empty for an id outside the
    /// vocabulary.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Ok(token) = self.check_id(id) else {
            return Vec::new();
        };
        let mut buf = vec![0u8; 64];
        loop {
            let len = i32::try_from(buf.len()).unwrap_or(i32::MAX);
            // SAFETY: `buf` has room for `len` bytes; `token` is in range; the vocab
            // is alive as long as `self`.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab,
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    len,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            let needed = n.unsigned_abs() as usize;
            if needed <= buf.len() {
                return Vec::new();
            }
            buf.resize(needed, 0);
        }
    }

    /// Whether llama.cpp treats `id` as end-of-generation.
    pub fn is_eog(&self, id: u32) -> bool {
        match self.check_id(id) {
            // SAFETY: `token` is in range; the vocab is alive as long as `self`.
            Ok(token) => unsafe { sys::llama_vocab_is_eog(self.vocab, token) },
            Err(_) => false,
        }
    }

    fn token_or_none(token: sys::llama_token) -> Option<u32> {
        u32::try_from(token).ok()
    }

    pub fn bos(&self) -> Option<u32> {
        // SAFETY: the vocab is alive as long as `self`.
        Self::token_or_none(unsafe { sys::llama_vocab_bos(self.vocab) })
    }

    pub fn eos(&self) -> Option<u32> {
        // SAFETY: the vocab is alive as long as `self`.
        Self::token_or_none(unsafe { sys::llama_vocab_eos(self.vocab) })
    }

    pub fn add_bos(&self) -> bool {
        // SAFETY: the vocab is alive as long as `self`.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab) }
    }

    pub fn add_eos(&self) -> bool {
        // SAFETY: the vocab is alive as long as `self`.
        unsafe { sys::llama_vocab_get_add_eos(self.vocab) }
    }

    pub fn n_layer(&self) -> u32 {
        // SAFETY: the model is alive as long as `self`.
        unsafe { sys::llama_model_n_layer(self.model) }.max(0) as u32
    }

    /// A metadata value rendered as text by llama.cpp (scalars only).
    pub fn meta_str(&self, key: &str) -> Option<String> {
        let c_key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `c_key` is NUL-terminated; `buf` has `buf.len()` writable bytes;
            // the model is alive as long as `self`.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.model,
                    c_key.as_ptr(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).ok()?;
            if n < buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf).ok();
            }
            buf.resize(n + 1, 0);
        }
    }

    /// K and V widths per token and layer (n_head_kv * head size). llama.cpp keeps
    /// these private, so they are rebuilt from the metadata it reads.
    fn kv_widths(&self) -> (u64, u64) {
        // SAFETY: the model is alive as long as `self`.
        let (n_embd, n_head, n_head_kv) = unsafe {
            (
                sys::llama_model_n_embd(self.model),
                sys::llama_model_n_head(self.model),
                sys::llama_model_n_head_kv(self.model),
            )
        };
        let n_head = n_head.max(1) as u64;
        let n_head_kv = n_head_kv.max(0) as u64;
        let default_head = n_embd.max(0) as u64 / n_head;
        let arch = self.meta_str("general.architecture").unwrap_or_default();
        let head_size = |key: &str| {
            self.meta_str(&format!("{arch}.attention.{key}"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default_head)
        };
        (
            n_head_kv * head_size("key_length"),
            n_head_kv * head_size("value_length"),
        )
    }

    pub fn context(&self, opts: ContextOptions) -> Result<LlamaCppContext<'_>, OracleError> {
        let check = |name: &'static str, value: u32| {
            if value == 0 {
                Err(OracleError::BadOption {
                    name,
                    value: u64::from(value),
                })
            } else {
                Ok(value)
            }
        };
        check("n_ctx", opts.n_ctx)?;
        check("n_batch", opts.n_batch)?;
        check("n_ubatch", opts.n_ubatch)?;
        if opts.n_ubatch > opts.n_batch {
            return Err(OracleError::BadOption {
                name: "n_ubatch (must be <= n_batch)",
                value: u64::from(opts.n_ubatch),
            });
        }
        let n_threads = i32::try_from(opts.n_threads)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(OracleError::BadOption {
                name: "n_threads",
                value: opts.n_threads as u64,
            })?;
        if i32::try_from(opts.n_batch).is_err() {
            return Err(OracleError::BadOption {
                name: "n_batch",
                value: u64::from(opts.n_batch),
            });
        }

        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = opts.n_ctx;
        params.n_batch = opts.n_batch;
        params.n_ubatch = opts.n_ubatch;
        params.n_seq_max = 1;
        params.n_threads = n_threads;
        params.n_threads_batch = n_threads;
        params.flash_attn_type = if opts.flash_attn {
            sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        params.type_k = opts.type_k.ggml_type();
        params.type_v = opts.type_v.ggml_type();
        params.offload_kqv = false;
        params.op_offload = false;
        params.no_perf = true;

        // SAFETY: the model is alive for the returned context's lifetime 'm, which
        // borrows `self`; `params` is fully initialised.
        let ctx = unsafe { sys::llama_init_from_model(self.model, params) };
        if ctx.is_null() {
            return Err(OracleError::CreateContext);
        }
        // SAFETY: `ctx` is a live context.
        let n_ctx = unsafe { sys::llama_n_ctx(ctx) };
        Ok(LlamaCppContext {
            ctx,
            model: self,
            n_batch: opts.n_batch,
            n_ctx,
            n_past: 0,
            type_k: opts.type_k,
            type_v: opts.type_v,
        })
    }
}

/// One llama.cpp inference context over a single sequence (seq id 0).
pub struct LlamaCppContext<'m> {
    ctx: *mut sys::llama_context,
    model: &'m LlamaCppModel,
    n_batch: u32,
    n_ctx: u32,
    n_past: u32,
    type_k: CacheType,
    type_v: CacheType,
}

// SAFETY: the context is only reachable through `&mut self` for work and owns its
// state; moving it to another thread is fine (llama.cpp has no thread affinity).
unsafe impl Send for LlamaCppContext<'_> {}

impl Drop for LlamaCppContext<'_> {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from llama_init_from_model, is non-null and freed once.
        unsafe { sys::llama_free(self.ctx) };
    }
}

impl LlamaCppContext<'_> {
    pub fn n_past(&self) -> u32 {
        self.n_past
    }

    /// Context length actually allocated (llama.cpp pads the request to 256).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Bytes of the K and V cache. llama.cpp exposes no accessor for this
    /// (`llama_state_get_size` also counts logits and metadata), so it is computed
    /// the way llama.cpp sizes its cache tensors: n_ctx rows of
    /// `n_head_kv * head_size` elements of the cache type, per layer, for K and V.
    pub fn kv_bytes(&self) -> u64 {
        let (k_width, v_width) = self.model.kv_widths();
        let row = |ty: CacheType, width: u64| -> u64 {
            let width = i64::try_from(width).unwrap_or(0);
            // SAFETY: pure function of a valid type id and an element count.
            unsafe { sys::ggml_row_size(ty.ggml_type(), width) as u64 }
        };
        let per_token_layer = row(self.type_k, k_width) + row(self.type_v, v_width);
        per_token_layer * u64::from(self.n_ctx) * u64::from(self.model.n_layer())
    }

    /// Forgets every cached token; the next evaluation starts at position 0.
    pub fn clear(&mut self) {
        // SAFETY: `ctx` is live; the memory handle it returns belongs to it.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx);
            if !mem.is_null() {
                sys::llama_memory_clear(mem, true);
            }
        }
        self.n_past = 0;
    }

    /// Evaluates tokens (appending at the current position) in batches of n_batch,
    /// requesting logits for every token; returns them row-major
    /// `[n_tokens][n_vocab]`.
    pub fn eval_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, OracleError> {
        let mut rows = Vec::with_capacity(tokens.len());
        self.eval(tokens, true, |row| rows.push(row))?;
        Ok(rows)
    }

    /// Evaluates, returning only the last token's logits (for generation / bench).
    pub fn eval_last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, OracleError> {
        let mut last = None;
        self.eval(tokens, false, |row| last = Some(row))?;
        last.ok_or(OracleError::MissingLogits(tokens.len().saturating_sub(1)))
    }

    /// Decodes `tokens` chunk by chunk, handing every requested logits row to `sink`
    /// in order. With `all_logits == false` only the final token's row is requested.
    fn eval(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut sink: impl FnMut(Vec<f32>),
    ) -> Result<(), OracleError> {
        if tokens.is_empty() {
            return Err(OracleError::EmptyInput);
        }
        let fits = u64::from(self.n_past) + tokens.len() as u64 <= u64::from(self.n_ctx);
        if !fits {
            return Err(OracleError::ContextFull {
                n_past: self.n_past,
                n_new: tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        let ids = tokens
            .iter()
            .map(|&id| self.model.check_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let n_vocab = self.model.n_vocab;
        let total = ids.len();
        for (chunk_index, chunk) in ids.chunks(self.n_batch as usize).enumerate() {
            let chunk_start = chunk_index * self.n_batch as usize;
            let mut token: Vec<sys::llama_token> = chunk.to_vec();
            let mut pos: Vec<sys::llama_pos> = (0..chunk.len())
                .map(|i| (self.n_past as usize + i) as sys::llama_pos)
                .collect();
            let mut n_seq_id: Vec<i32> = vec![1; chunk.len()];
            let mut seq_ids: Vec<sys::llama_seq_id> = vec![0; chunk.len()];
            let mut seq_id_ptrs: Vec<*mut sys::llama_seq_id> = seq_ids
                .iter_mut()
                .map(|s| s as *mut sys::llama_seq_id)
                .collect();
            let mut want: Vec<i8> = (0..chunk.len())
                .map(|i| i8::from(all_logits || chunk_start + i + 1 == total))
                .collect();
            let batch = sys::llama_batch {
                n_tokens: chunk.len() as i32,
                token: token.as_mut_ptr(),
                embd: ptr::null_mut(),
                pos: pos.as_mut_ptr(),
                n_seq_id: n_seq_id.as_mut_ptr(),
                seq_id: seq_id_ptrs.as_mut_ptr(),
                logits: want.as_mut_ptr(),
            };
            // SAFETY: every array in `batch` has `n_tokens` elements (n_tokens <=
            // n_batch, checked when the context was made) and outlives the call;
            // each seq_id pointer targets one live element of `seq_ids`.
            let rc = unsafe { sys::llama_decode(self.ctx, batch) };
            if rc != 0 {
                return Err(OracleError::Decode(rc));
            }
            self.n_past += chunk.len() as u32;
            for (i, &wanted) in want.iter().enumerate() {
                if wanted == 0 {
                    continue;
                }
                // SAFETY: row `i` of the batch just decoded asked for logits, so
                // llama.cpp returns a pointer to n_vocab floats (or null, checked).
                let row = unsafe { sys::llama_get_logits_ith(self.ctx, i as i32) };
                if row.is_null() {
                    return Err(OracleError::MissingLogits(chunk_start + i));
                }
                // SAFETY: non-null rows hold n_vocab floats owned by the context,
                // valid until the next decode; they are copied out at once.
                let logits = unsafe { std::slice::from_raw_parts(row, n_vocab) }.to_vec();
                sink(logits);
            }
        }
        Ok(())
    }
}

/// A GGUF file opened with ggml's own reader (metadata only).
struct GgufFile {
    ctx: *mut sys::gguf_context,
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from gguf_init_from_file, is non-null and freed once.
        unsafe { sys::gguf_free(self.ctx) };
    }
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self, OracleError> {
        init_llama();
        let c_path = path_to_cstring(path)?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: ptr::null_mut(),
        };
        // SAFETY: `c_path` is NUL-terminated; a null `ctx` asks for metadata only.
        let ctx = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        if ctx.is_null() {
            return Err(OracleError::ReadGguf(path.to_path_buf()));
        }
        Ok(GgufFile { ctx })
    }

    fn find(&self, key: &str) -> Option<i64> {
        let c_key = CString::new(key).ok()?;
        // SAFETY: `ctx` is live; `c_key` is NUL-terminated.
        let id = unsafe { sys::gguf_find_key(self.ctx, c_key.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn kv_type(&self, id: i64) -> sys::gguf_type {
        // SAFETY: `id` was returned by gguf_find_key for this live context.
        unsafe { sys::gguf_get_kv_type(self.ctx, id) }
    }

    fn wrong_type(key: &str, want: &str) -> OracleError {
        OracleError::GgufKey {
            key: key.to_owned(),
            problem: format!("expected {want}"),
        }
    }

    fn c_text(key: &str, text: *const c_char) -> Result<String, OracleError> {
        if text.is_null() {
            return Err(Self::wrong_type(key, "a string"));
        }
        // SAFETY: ggml returns NUL-terminated strings owned by the live context.
        let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
        String::from_utf8(bytes.to_vec()).map_err(|_| OracleError::GgufKey {
            key: key.to_owned(),
            problem: "string is not valid UTF-8".to_owned(),
        })
    }

    fn string(&self, key: &str) -> Result<Option<String>, OracleError> {
        let Some(id) = self.find(key) else {
            return Ok(None);
        };
        if self.kv_type(id) != sys::GGUF_TYPE_STRING {
            return Err(Self::wrong_type(key, "a string"));
        }
        // SAFETY: `id` is a string-typed key of the live context.
        let text = unsafe { sys::gguf_get_val_str(self.ctx, id) };
        Self::c_text(key, text).map(Some)
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, OracleError> {
        let Some(id) = self.find(key) else {
            return Ok(None);
        };
        if self.kv_type(id) != sys::GGUF_TYPE_BOOL {
            return Err(Self::wrong_type(key, "a bool"));
        }
        // SAFETY: `id` is a bool-typed key of the live context.
        Ok(Some(unsafe { sys::gguf_get_val_bool(self.ctx, id) }))
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, OracleError> {
        let Some(id) = self.find(key) else {
            return Ok(None);
        };
        // SAFETY (all arms): `id` is a key of the live context whose type was just
        // checked to match the getter.
        let value: i64 = match self.kv_type(id) {
            sys::GGUF_TYPE_UINT32 => i64::from(unsafe { sys::gguf_get_val_u32(self.ctx, id) }),
            sys::GGUF_TYPE_INT32 => i64::from(unsafe { sys::gguf_get_val_i32(self.ctx, id) }),
            sys::GGUF_TYPE_UINT64 => {
                i64::try_from(unsafe { sys::gguf_get_val_u64(self.ctx, id) }).unwrap_or(-1)
            }
            sys::GGUF_TYPE_INT64 => unsafe { sys::gguf_get_val_i64(self.ctx, id) },
            _ => return Err(Self::wrong_type(key, "an integer token id")),
        };
        u32::try_from(value)
            .map(Some)
            .map_err(|_| OracleError::GgufKey {
                key: key.to_owned(),
                problem: format!("token id {value} is out of range"),
            })
    }

    /// Array length after checking the key holds an array of `elem` type.
    fn array(&self, key: &str, elem: sys::gguf_type) -> Result<Option<(i64, usize)>, OracleError> {
        let Some(id) = self.find(key) else {
            return Ok(None);
        };
        // SAFETY: `id` is a key of the live context.
        let ok = self.kv_type(id) == sys::GGUF_TYPE_ARRAY
            && unsafe { sys::gguf_get_arr_type(self.ctx, id) } == elem;
        if !ok {
            // SAFETY: gguf_type_name returns a static string for any type value.
            let name = unsafe { CStr::from_ptr(sys::gguf_type_name(elem)) };
            return Err(Self::wrong_type(
                key,
                &format!("an array of {}", name.to_string_lossy()),
            ));
        }
        // SAFETY: `id` is an array-typed key of the live context.
        let n = unsafe { sys::gguf_get_arr_n(self.ctx, id) };
        Ok(Some((id, n)))
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, OracleError> {
        let Some((id, n)) = self.array(key, sys::GGUF_TYPE_STRING)? else {
            return Ok(None);
        };
        (0..n)
            .map(|i| {
                // SAFETY: `i < n` for this string array of the live context.
                let text = unsafe { sys::gguf_get_arr_str(self.ctx, id, i) };
                Self::c_text(key, text)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn pod_array<T: GgufScalar>(&self, key: &str) -> Result<Option<Vec<T>>, OracleError> {
        let Some((id, n)) = self.array(key, T::GGUF_TYPE)? else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(Some(Vec::new()));
        }
        // SAFETY: `id` is a non-empty array of the live context.
        let data = unsafe { sys::gguf_get_arr_data(self.ctx, id) };
        if data.is_null() {
            return Err(Self::wrong_type(key, "array data"));
        }
        // SAFETY: the array was checked to hold `n` elements of `T::GGUF_TYPE`, which
        // ggml stores contiguously as `T`; unaligned reads copy them out while the
        // context is alive.
        let values = (0..n)
            .map(|i| unsafe { data.cast::<T>().add(i).read_unaligned() })
            .collect();
        Ok(Some(values))
    }
}

/// Rust types with the layout of a GGUF array element type.
trait GgufScalar: Copy {
    const GGUF_TYPE: sys::gguf_type;
}

impl GgufScalar for i32 {
    const GGUF_TYPE: sys::gguf_type = sys::GGUF_TYPE_INT32;
}

impl GgufScalar for f32 {
    const GGUF_TYPE: sys::gguf_type = sys::GGUF_TYPE_FLOAT32;
}

/// Reads the tokenizer metadata of a GGUF file with ggml's `gguf_*` reader: a path
/// independent of the crate's own GGUF module, for cross-checking it.
pub fn tokenizer_spec_via_ggml(path: &Path) -> Result<TokenizerSpec, OracleError> {
    let file = GgufFile::open(path)?;
    let model = file
        .string("tokenizer.ggml.model")?
        .ok_or_else(|| OracleError::GgufKey {
            key: "tokenizer.ggml.model".to_owned(),
            problem: "missing".to_owned(),
        })?;
    let tokens = file
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| OracleError::GgufKey {
            key: "tokenizer.ggml.tokens".to_owned(),
            problem: "missing".to_owned(),
        })?;
    // llama.cpp accepts integer scores as well as floats.
    let scores = match file.pod_array::<f32>("tokenizer.ggml.scores") {
        Ok(scores) => scores,
        Err(float_err) => match file.pod_array::<i32>("tokenizer.ggml.scores") {
            Ok(ints) => ints.map(|v| v.into_iter().map(|s| s as f32).collect()),
            Err(_) => return Err(float_err),
        },
    };
    Ok(TokenizerSpec {
        model,
        pre: file.string("tokenizer.ggml.pre")?,
        tokens,
        token_types: file.pod_array::<i32>("tokenizer.ggml.token_type")?,
        scores,
        merges: file.strings("tokenizer.ggml.merges")?,
        bos_id: file.token_id("tokenizer.ggml.bos_token_id")?,
        eos_id: file.token_id("tokenizer.ggml.eos_token_id")?,
        eot_id: file.token_id("tokenizer.ggml.eot_token_id")?,
        eom_id: file.token_id("tokenizer.ggml.eom_token_id")?,
        unk_id: file.token_id("tokenizer.ggml.unknown_token_id")?,
        pad_id: file.token_id("tokenizer.ggml.padding_token_id")?,
        add_bos: file.boolean("tokenizer.ggml.add_bos_token")?,
        add_eos: file.boolean("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: file.boolean("tokenizer.ggml.add_space_prefix")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real default model. Set KVSHARER_TEST_MODEL to use another file.
    fn test_model_path() -> PathBuf {
        crate::fetch::model_for_tests()
    }

    fn load() -> LlamaCppModel {
        let path = test_model_path();
        LlamaCppModel::load(&path).unwrap_or_else(|e| {
            panic!(
                "{e} (model file {}; set KVSHARER_TEST_MODEL)",
                path.display()
            )
        })
    }

    fn options(n_batch: u32) -> ContextOptions {
        ContextOptions {
            n_ctx: 256,
            n_batch,
            n_ubatch: n_batch,
            n_threads: 2,
            ..ContextOptions::default()
        }
    }

    const PROMPT: &str = "The quick brown fox jumps over the lazy dog. Meanwhile, in a small \
                          village by the sea, the fishermen were mending their nets and \
                          talking about the weather, the tides and the price of fish.";

    fn prompt_tokens(model: &LlamaCppModel, n: usize) -> Vec<u32> {
        let ids = model.tokenize(PROMPT, false, false).unwrap();
        assert!(ids.len() >= n, "prompt has only {} tokens", ids.len());
        ids[..n].to_vec()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn loads_model_with_vocab_matching_gguf_metadata() {
        let model = load();
        let spec = tokenizer_spec_via_ggml(&test_model_path()).unwrap();
        assert_eq!(model.n_vocab(), spec.tokens.len());
        assert_eq!(model.bos(), spec.bos_id);
        assert_eq!(model.eos(), spec.eos_id);
    }

    #[test]
    fn tokenizes_and_renders_hello() {
        let model = load();
        let ids = model.tokenize("Hello", false, false).unwrap();
        assert!(!ids.is_empty());
        let text: Vec<u8> = ids
            .iter()
            .flat_map(|&id| model.token_to_piece(id, false))
            .collect();
        assert_eq!(text, b"Hello");
        assert!(model.token_to_piece(u32::MAX, false).is_empty());
    }

    #[test]
    fn tokenize_grows_its_buffer_when_needed() {
        let model = load();
        // SmolLM splits digits one per token: 5000 tokens, far over the first guess.
        let text = "7".repeat(5000);
        let ids = model.tokenize(&text, false, false).unwrap();
        assert_eq!(ids.len(), 5000);
        assert!(ids.iter().all(|&id| id == ids[0]));
    }

    #[test]
    fn logits_are_finite_and_informative() {
        let model = load();
        let mut ctx = model.context(options(64)).unwrap();
        let ids = model
            .tokenize("The capital of France is", false, false)
            .unwrap();
        let logits = ctx.eval_last_logits(&ids).unwrap();
        assert_eq!(logits.len(), model.n_vocab());
        assert!(logits.iter().all(|x| x.is_finite()));
        let (min, max) = logits
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(max - min > 1.0, "logits nearly constant: {min}..{max}");
        assert_eq!(ctx.n_past(), ids.len() as u32);
    }

    #[test]
    fn batch_size_does_not_change_logits() {
        let model = load();
        let ids = prompt_tokens(&model, 40);
        let mut small = model.context(options(16)).unwrap();
        let mut large = model.context(options(64)).unwrap();
        let by_16 = small.eval_all_logits(&ids).unwrap();
        let by_64 = large.eval_all_logits(&ids).unwrap();
        assert_eq!(by_16.len(), 40);
        assert_eq!(by_64.len(), 40);
        let worst = by_16
            .iter()
            .zip(&by_64)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        eprintln!("batch 16 vs 64: max |logit difference| = {worst:e}");
        assert!(worst < 1e-3, "batch 16 vs 64 logits differ by {worst}");
        // Rows are per position, not one row repeated.
        assert!(max_abs_diff(&by_64[0], &by_64[39]) > 0.1);
        assert_eq!(small.n_past(), 40);

        // The last row is what eval_last_logits returns for the same prompt.
        large.clear();
        assert_eq!(large.n_past(), 0);
        let last = large.eval_last_logits(&ids).unwrap();
        let diff = max_abs_diff(&last, &by_64[39]);
        assert!(diff < 1e-3, "last-logits path differs by {diff}");
    }

    #[test]
    fn appending_continues_the_sequence() {
        let model = load();
        let ids = prompt_tokens(&model, 24);
        let mut whole = model.context(options(64)).unwrap();
        let all = whole.eval_all_logits(&ids).unwrap();
        let mut split = model.context(options(64)).unwrap();
        split.eval_all_logits(&ids[..10]).unwrap();
        let tail = split.eval_all_logits(&ids[10..]).unwrap();
        assert_eq!(split.n_past(), 24);
        let diff = max_abs_diff(&tail[13], &all[23]);
        assert!(diff < 1e-3, "two calls vs one differ by {diff}");
    }

    #[test]
    fn rejects_bad_input_without_crashing() {
        let model = load();
        let mut ctx = model.context(options(64)).unwrap();
        let n_ctx = ctx.n_ctx();
        assert_eq!(n_ctx % 256, 0);
        let too_many = vec![1u32; n_ctx as usize + 1];
        assert!(matches!(
            ctx.eval_last_logits(&too_many),
            Err(OracleError::ContextFull { .. })
        ));
        assert!(matches!(
            ctx.eval_all_logits(&[model.n_vocab() as u32]),
            Err(OracleError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            ctx.eval_all_logits(&[]),
            Err(OracleError::EmptyInput)
        ));
        assert_eq!(ctx.n_past(), 0);
        assert!(model
            .context(ContextOptions {
                n_ubatch: 128,
                ..options(64)
            })
            .is_err());
    }

    #[test]
    fn kv_bytes_follow_gguf_shapes_and_cache_type() {
        let model = load();
        let file = GgufFile::open(&test_model_path()).unwrap();
        let int = |key: &str| -> u64 {
            let id = file.find(key).unwrap_or_else(|| panic!("{key} missing"));
            // SAFETY: every key read here is a u32 in the default model.
            u64::from(unsafe { sys::gguf_get_val_u32(file.ctx, id) })
        };
        let n_layer = int("llama.block_count");
        let head = int("llama.embedding_length") / int("llama.attention.head_count");
        let kv_width = head * int("llama.attention.head_count_kv");

        let f16 = model.context(options(64)).unwrap();
        let expected = n_layer * u64::from(f16.n_ctx()) * kv_width * 2 * 2;
        assert_eq!(f16.kv_bytes(), expected);

        let q8 = model
            .context(ContextOptions {
                type_k: CacheType::Q8_0,
                type_v: CacheType::Q8_0,
                ..options(64)
            })
            .unwrap();
        // q8_0 stores 32 values in 34 bytes.
        assert_eq!(
            q8.kv_bytes(),
            n_layer * u64::from(q8.n_ctx()) * kv_width / 32 * 34 * 2
        );
    }
}
