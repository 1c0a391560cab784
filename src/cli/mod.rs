//! Command-line interface: argument definitions shared by the subcommands and the
//! code that turns them into a loaded model, a sharing map and a session.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod info;
pub mod perplexity;
pub mod run;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use kvsharer::backend::ggml::DeviceKind;
use kvsharer::backend::graph::Logits;
use kvsharer::eval::ChunkEval;
use kvsharer::generate::TokenEval;
use kvsharer::gguf::GgmlType;
use kvsharer::kv;
use kvsharer::loader::{self, LoadedModel};
use kvsharer::model::Model;
use kvsharer::sample::SamplingParams;
use kvsharer::session::{default_threads, KvWindow, Session, SessionOptions};
use kvsharer::share::ShareMap;

#[derive(Parser, Debug)]
#[command(
    name = "kvsharer",
    version,
    about = "Run quantized GGUF Llama models locally, with layer-wise KV cache sharing (KVSharer)",
    long_about = "Run quantized GGUF Llama models locally on the CPU (ggml), with KVSharer: \
                  layer-wise KV cache sharing found by a short training-free calibration and \
                  stored in the GGUF file, so the KV cache only allocates the layers that are \
                  not shared. Without -m, the default model (SmolLM2-135M-Instruct Q4_1) is \
                  fetched on first use into the user cache directory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a continuation of a prompt (streams to stdout)
    Run(run::RunArgs),
    /// Chat with the model in the terminal (keeps the KV cache between turns)
    Chat(chat::ChatArgs),
    /// Describe a GGUF model: architecture, sizes, quant types, KV bytes, sharing map
    Info(info::InfoArgs),
    /// Measure prompt processing and generation speed, beside llama.cpp on the same file
    Bench(bench::BenchArgs),
    /// Find a KV sharing map for a model (the KVSharer search) and report it
    Calibrate(calibrate::CalibrateArgs),
    /// Write a copy of a model with a KV sharing map stored in its metadata
    Share(calibrate::ShareArgs),
    /// Measure perplexity on a text file (llama-perplexity's method); with --kv-share, also KL divergence against the unshared model
    Perplexity(perplexity::PerplexityArgs),
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Calibrate(a) => calibrate::calibrate(a),
        Command::Share(a) => calibrate::share(a),
        Command::Perplexity(a) => perplexity::run(a),
    }
}

/// Options every subcommand that runs the model takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file [default: SmolLM2-135M-Instruct Q4_1, fetched on first use]
    #[arg(short = 'm', long = "model", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Context size in tokens (KV cache cells)
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// CPU threads [default: available cores, at most 8]
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Prompt tokens per forward pass during prefill
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// KV cache type for keys: f16, q8_0, q4_0 (or f32)
    #[arg(long = "cache-type-k", default_value = "f16", value_name = "TYPE")]
    pub cache_type_k: String,
    /// KV cache type for values: f16, q8_0, q4_0 (or f32)
    #[arg(long = "cache-type-v", default_value = "f16", value_name = "TYPE")]
    pub cache_type_v: String,
    /// Share KV caches between layers. Without a value: use the map stored in the GGUF.
    /// With a value (25%, 0.25 or a layer count): calibrate on the fly (cached)
    #[arg(long = "kv-share", value_name = "SPEC", num_args = 0..=1, default_missing_value = "stored")]
    pub kv_share: Option<String>,
    /// StreamingLLM-style window: keep the first --kv-sink tokens and the most recent
    /// N in the cache (the cache then holds exactly sink + N cells)
    #[arg(long = "kv-window", value_name = "N")]
    pub kv_window: Option<usize>,
    /// Tokens at the start kept forever when --kv-window is set (attention sinks)
    #[arg(long = "kv-sink", value_name = "S", default_value_t = 4)]
    pub kv_sink: usize,
    /// Ignore a sharing map stored in the GGUF (run unshared)
    #[arg(long = "no-kv-share", conflicts_with = "kv_share")]
    pub no_kv_share: bool,
    /// Compute backend: cpu (ggml), wgpu (WGSL on the GPU; any adapter, software
    /// ones included), auto (wgpu on a real GPU, else cpu), or ggml's own GPU
    /// backends cuda, vulkan, metal (each needs a build with --features NAME)
    #[arg(long = "backend", value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Wgpu,
    Auto,
    Cuda,
    Vulkan,
    Metal,
}

impl Backend {
    /// The ggml device this choice runs the graph on directly, for the ggml GPU
    /// backends (`cpu`, `wgpu` and `auto` are decided in `Runner::new`).
    pub fn ggml_device(self) -> Option<DeviceKind> {
        match self {
            Backend::Cuda => Some(DeviceKind::Cuda),
            Backend::Vulkan => Some(DeviceKind::Vulkan),
            Backend::Metal => Some(DeviceKind::Metal),
            Backend::Cpu | Backend::Wgpu | Backend::Auto => None,
        }
    }

    /// Which wgpu adapters this choice accepts: any for `wgpu`, a real GPU for
    /// `auto` (else the CPU); `None` for the ggml backends.
    #[cfg(feature = "wgpu")]
    pub fn wgpu_policy(self) -> Option<kvsharer::backend::wgpu::AdapterPolicy> {
        use kvsharer::backend::wgpu::AdapterPolicy;
        match self {
            Backend::Wgpu => Some(AdapterPolicy::Any),
            Backend::Auto => Some(AdapterPolicy::HardwareOnly),
            Backend::Cpu | Backend::Cuda | Backend::Vulkan | Backend::Metal => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Auto => "auto",
            Backend::Cuda => "cuda",
            Backend::Vulkan => "vulkan",
            Backend::Metal => "metal",
        }
    }
}

/// Whether the wgpu backend can run `opts` (it keeps a plain f16 cache and no
/// window); an error for `--backend wgpu` where it cannot, false for `auto`.
#[cfg(feature = "wgpu")]
fn wgpu_takes(backend: Backend, opts: &SessionOptions) -> Result<bool> {
    let cpu_only =
        (opts.type_k, opts.type_v) != (GgmlType::F16, GgmlType::F16) || opts.window.is_some();
    if cpu_only && backend == Backend::Wgpu {
        bail!("--backend wgpu keeps a plain f16 KV cache; drop --cache-type-k/-v and --kv-window, or use --backend cpu");
    }
    Ok(!cpu_only)
}

#[cfg(feature = "wgpu")]
fn gpu_options(
    opts: &SessionOptions,
    policy: kvsharer::backend::wgpu::AdapterPolicy,
) -> kvsharer::backend::wgpu::GpuOptions {
    kvsharer::backend::wgpu::GpuOptions {
        n_ctx: opts.n_ctx,
        n_batch: opts.n_batch,
        policy,
        ..Default::default()
    }
}

/// The run state of the chosen backend.
// One per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Runner<'m> {
    /// The ggml graph, on the CPU or on a ggml GPU backend (CUDA, Vulkan, Metal).
    Ggml(Session<'m>),
    #[cfg(feature = "wgpu")]
    Gpu(kvsharer::backend::wgpu::GpuSession<'m>),
}

impl<'m> Runner<'m> {
    /// Opens `backend` for `model`; prints the GPU adapter or ggml device in use, or
    /// why `auto` fell back to the CPU.
    pub fn new(
        backend: Backend,
        model: &'m Model,
        map: &ShareMap,
        opts: &SessionOptions,
    ) -> Result<Self> {
        if let Some(device) = backend.ggml_device() {
            let session = Session::on_device(device, model, map, opts)
                .with_context(|| format!("--backend {}", backend.name()))?;
            eprintln!(
                "backend: {} (ggml) on {}",
                backend.name(),
                session.backend().device_name()
            );
            return Ok(Runner::Ggml(session));
        }
        #[cfg(feature = "wgpu")]
        {
            use kvsharer::backend::wgpu::GpuSession;
            if let Some(policy) = backend.wgpu_policy() {
                if !wgpu_takes(backend, opts)? {
                    eprintln!(
                        "note: --backend auto: a quantized KV cache or a window was requested, using the CPU backend"
                    );
                } else {
                    let gpu_opts = gpu_options(opts, policy);
                    match GpuSession::new(model, map, &gpu_opts) {
                        Ok(s) => {
                            eprintln!("backend: wgpu on {}", s.adapter_description());
                            return Ok(Runner::Gpu(s));
                        }
                        Err(e) if backend == Backend::Auto => {
                            eprintln!("note: --backend auto: no usable GPU ({e}); using the CPU backend (ggml)");
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context("--backend wgpu")),
                    }
                }
            }
        }
        #[cfg(not(feature = "wgpu"))]
        if backend == Backend::Wgpu {
            bail!("--backend wgpu: this kvsharer was built without the `wgpu` cargo feature");
        }
        if backend != Backend::Cpu {
            eprintln!("backend: cpu (ggml)");
        }
        Ok(Runner::Ggml(Session::new(model, map, opts)?))
    }

    /// A second runner for the same model on the backend this one runs on (from
    /// `Runner::new` with the same `backend`), for `map` and `opts`. On wgpu it
    /// shares this runner's device, kernels and weights (`GpuSession::sibling`);
    /// on ggml it is a new session on the same device kind. Prints nothing more,
    /// unless `--backend auto` has to put the second runner on the CPU (a
    /// quantized cache or a window).
    pub fn sibling(&self, backend: Backend, map: &ShareMap, opts: &SessionOptions) -> Result<Self> {
        match self {
            Runner::Ggml(s) => {
                let session = Session::on_device(s.backend().kind(), self.model(), map, opts)
                    .with_context(|| format!("--backend {}", backend.name()))?;
                Ok(Runner::Ggml(session))
            }
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => {
                use kvsharer::backend::wgpu::AdapterPolicy;
                if !wgpu_takes(backend, opts)? {
                    eprintln!(
                        "note: --backend auto: a quantized KV cache or a window was requested, using the CPU backend for the second session"
                    );
                    return Ok(Runner::Ggml(Session::new(self.model(), map, opts)?));
                }
                let policy = backend.wgpu_policy().unwrap_or(AdapterPolicy::Any);
                let sibling = s
                    .sibling(map, &gpu_options(opts, policy))
                    .with_context(|| format!("--backend {}", backend.name()))?;
                Ok(Runner::Gpu(sibling))
            }
        }
    }

    /// True when the forward pass runs on a GPU (wgpu, or a ggml GPU backend).
    pub fn on_gpu(&self) -> bool {
        match self {
            Runner::Ggml(s) => !s.backend().is_cpu(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(_) => true,
        }
    }

    pub fn map(&self) -> &ShareMap {
        match self {
            Runner::Ggml(s) => s.map(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.map(),
        }
    }

    /// Keeps the first `n` tokens of the cache.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Runner::Ggml(s) => s.truncate(n),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.truncate(n),
        }
    }

    /// llama.cpp's context shift: drops cached tokens `[keep, keep + discard)` and
    /// moves the rest down. Returns false, changing nothing, where the backend cannot
    /// shift (the GPU); the caller then re-evaluates instead.
    pub fn context_shift(&mut self, keep: usize, discard: usize) -> Result<bool> {
        match self {
            Runner::Ggml(s) => {
                s.context_shift(keep, discard)?;
                Ok(true)
            }
            #[cfg(feature = "wgpu")]
            Runner::Gpu(_) => Ok(false),
        }
    }

    /// The backend in words, for status lines.
    pub fn describe(&self, threads: usize) -> String {
        match self {
            Runner::Ggml(s) if s.backend().is_cpu() => format!("cpu (ggml) | {threads} threads"),
            Runner::Ggml(s) => format!(
                "{} (ggml) on {}",
                s.backend().kind(),
                s.backend().device_name()
            ),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => format!("wgpu on {}", s.adapter_description()),
        }
    }

    pub fn model(&self) -> &'m Model {
        match self {
            Runner::Ggml(s) => s.model(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.model(),
        }
    }

    /// KV bytes per token of context, and what the unshared model would allocate.
    pub fn kv_accounting(&self) -> (usize, usize) {
        match self {
            Runner::Ggml(s) => (s.cache().bytes_per_token(), s.cache().bytes_unshared()),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => {
                let c = &s.model().config;
                let per_layer_token = c.n_embd_kv() * 2 * 2;
                (
                    s.n_slots() * per_layer_token,
                    c.n_layers * per_layer_token * s.n_ctx(),
                )
            }
        }
    }
}

impl ChunkEval for Runner<'_> {
    fn reset(&mut self) {
        match self {
            Runner::Ggml(s) => s.reset(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.reset(),
        }
    }
    fn n_vocab(&self) -> usize {
        self.model().config.n_vocab
    }
    /// Bytes of KV storage this run state allocated.
    fn kv_bytes(&self) -> usize {
        match self {
            Runner::Ggml(s) => s.kv_bytes(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.kv_bytes(),
        }
    }
}

impl TokenEval for Runner<'_> {
    type Error = anyhow::Error;
    fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        Ok(match self {
            Runner::Ggml(s) => s.eval(tokens, logits)?,
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.eval(tokens, logits)?,
        })
    }
    fn n_past(&self) -> usize {
        match self {
            Runner::Ggml(s) => s.n_past(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.n_past(),
        }
    }
    fn n_ctx(&self) -> usize {
        match self {
            Runner::Ggml(s) => s.n_ctx(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(s) => s.n_ctx(),
        }
    }
    fn evicts(&self) -> bool {
        match self {
            Runner::Ggml(s) => s.window().is_some(),
            #[cfg(feature = "wgpu")]
            Runner::Gpu(_) => false,
        }
    }
}

impl ModelArgs {
    pub fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => {
                if !p.exists() {
                    bail!("model file {} does not exist (hint: pass a GGUF file with -m, or omit -m to use the default model)", p.display());
                }
                Ok(p.clone())
            }
            None => {
                kvsharer::fetch::default_model_path().context("could not get the default model")
            }
        }
    }

    /// `-t` / `--threads`, or the default; 0 is refused rather than read as 1.
    pub fn threads(&self) -> Result<usize> {
        match self.threads {
            Some(0) => bail!(
                "--threads must be at least 1 (omit -t to use the default, {} on this machine)",
                default_threads()
            ),
            Some(n) => Ok(n),
            None => Ok(default_threads()),
        }
    }

    pub fn cache_types(&self) -> Result<(GgmlType, GgmlType)> {
        Ok((
            kv::parse_cache_type(&self.cache_type_k)?,
            kv::parse_cache_type(&self.cache_type_v)?,
        ))
    }

    pub fn window(&self) -> Result<Option<KvWindow>> {
        match self.kv_window {
            None => Ok(None),
            Some(0) => bail!("--kv-window must be at least 1"),
            Some(recent) => Ok(Some(KvWindow {
                sink: self.kv_sink,
                recent,
            })),
        }
    }

    pub fn session_options(&self) -> Result<SessionOptions> {
        if self.ctx_size == 0 {
            bail!("--ctx-size must be at least 1");
        }
        let (type_k, type_v) = self.cache_types()?;
        Ok(SessionOptions {
            n_ctx: self.ctx_size,
            n_batch: self.batch_size.max(1),
            n_threads: self.threads()?,
            type_k,
            type_v,
            window: self.window()?,
        })
    }

    /// Loads the model named by `-m` (or the default one), printing what it does.
    pub fn load(&self) -> Result<(PathBuf, LoadedModel)> {
        let path = self.model_path()?;
        let loaded = loader::load(&path)?;
        Ok((path, loaded))
    }

    /// The sharing map the flags ask for.
    pub fn share_map(&self, loaded: &LoadedModel) -> Result<ShareMap> {
        let n_layers = loaded.model.config.n_layers;
        if self.no_kv_share {
            return Ok(ShareMap::identity(n_layers));
        }
        match self.kv_share.as_deref() {
            None => Ok(ShareMap::identity(n_layers)),
            Some("stored") => match &loaded.model.stored_map {
                Some(m) => Ok(m.clone()),
                None => bail!(
                    "--kv-share: this model file has no stored sharing map (hint: create one with \
                     `kvsharer share -m MODEL --layers N -o OUT.gguf`)"
                ),
            },
            Some(spec) => calibrate::on_the_fly_map(loaded, spec, self.threads()?),
        }
    }
}

/// llama.cpp-style sampling flags.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k sampling; 0 = off
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (nucleus) sampling; 1.0 = off
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p sampling; 0.0 = off
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize repeated tokens among the last --repeat-last-n; 1.0 = off
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed [default: a fixed seed, so runs repeat]
    #[arg(short = 's', long = "seed")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed.unwrap_or(kvsharer::sample::DEFAULT_SEED),
        };
        for notice in p.validate()? {
            eprintln!("note: {notice}");
        }
        Ok(p)
    }
}

/// "12.3 MiB" style sizes for people.
pub fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", n / (1024.0 * 1024.0))
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// One line describing the sharing in use, for status output.
pub fn describe_sharing(map: &ShareMap, kv_bytes: usize, unshared: usize) -> String {
    if map.is_identity() {
        format!("KV sharing off, KV cache {}", human_bytes(kv_bytes))
    } else {
        format!(
            "KV sharing on: {} of {} layers shared ({}), KV cache {} instead of {} ({:.1}% saved)",
            map.shared_count(),
            map.n_layers(),
            map,
            human_bytes(kv_bytes),
            human_bytes(unshared),
            100.0 * (1.0 - kv_bytes as f64 / unshared as f64)
        )
    }
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
