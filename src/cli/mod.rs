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
use clap::{Args, Parser, Subcommand};

use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::ShareMap;
use kvsharer::loader::{self, LoadedModel};
use kvsharer::model::Model;
use kvsharer::runtime::{
    self, default_threads, parse_cache_type, BackendChoice, KvWindow, RunOptions, RunState,
};
use kvsharer::sample::SamplingParams;

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
    #[arg(long = "backend", default_value = "cpu", value_parser = backend_parser())]
    pub backend: BackendChoice,
}

/// Opens the run state `args` ask for on their backend, printing the backend in use
/// (for any choice but the default CPU) or why `auto` fell back to the CPU.
pub fn open_state<'m>(
    backend: BackendChoice,
    model: &'m Model,
    map: &ShareMap,
    opts: &RunOptions,
) -> Result<Box<dyn RunState<'m> + 'm>> {
    let opened =
        runtime::open(backend, model, map, opts).with_context(|| format!("--backend {backend}"))?;
    if let Some(why) = &opened.fallback {
        eprintln!("note: --backend auto: {why}");
    }
    if backend != BackendChoice::Cpu {
        eprintln!("backend: {}", opened.state.describe());
    }
    Ok(opened.state)
}

/// The flag to change for a library error, where one is known (the library's
/// errors name no flags).
pub fn hint(err: &anyhow::Error) -> Option<String> {
    use kvsharer::backend::ggml::GgmlError;
    use kvsharer::eval::EvalError;
    use kvsharer::runtime::{Capability, RuntimeError};
    use kvsharer::search::CalibrateError;
    for e in err.chain() {
        if let Some(EvalError::TooFewTokens { .. }) = e.downcast_ref::<EvalError>() {
            return Some("use a longer text or a smaller -c/--ctx-size".into());
        }
        if let Some(EvalError::ZeroChunks) = e.downcast_ref::<EvalError>() {
            return Some("--chunks must be at least 1".into());
        }
        if let Some(CalibrateError::Strategy(_) | CalibrateError::Corpus(_)) =
            e.downcast_ref::<CalibrateError>()
        {
            return Some(
                "see `kvsharer calibrate --help` for --samples, --tokens, --calib, --beam, --candidates and --max-kld".into(),
            );
        }
    }
    let runtime = err.chain().find_map(|e| e.downcast_ref::<RuntimeError>())?;
    if let RuntimeError::Backend(b) = runtime {
        if let Some(GgmlError::UnsupportedOp { .. }) = b.downcast_ref::<GgmlError>() {
            return Some("use --backend cpu".into());
        }
    }
    Some(match runtime {
        RuntimeError::ContextFull { .. } => "raise -c/--ctx-size, or shorten the input".into(),
        RuntimeError::Unsupported { capability, .. } => match capability {
            Capability::CacheType(_) => "use --backend cpu, or drop --cache-type-k/-v".into(),
            Capability::Window => "use --backend cpu, or drop --kv-window".into(),
            _ => "use --backend cpu".into(),
        },
        RuntimeError::NotBuilt { feature, .. } => {
            format!("rebuild with `cargo build --release --features {feature}`")
        }
        RuntimeError::UnknownCacheType(_) => {
            "--cache-type-k/-v take f16, q8_0, q4_0 (or f32)".into()
        }
        _ => return None,
    })
}

/// KV bytes per token of context, and what the unshared model would allocate.
pub fn kv_accounting(state: &dyn RunState<'_>) -> (usize, usize) {
    let (per_token, unshared_per_token) = state.kv_bytes_per_token();
    (per_token, unshared_per_token * state.n_ctx())
}

/// `--backend`'s values, listed in `--help` and checked by clap.
fn backend_parser() -> impl clap::builder::TypedValueParser<Value = BackendChoice> {
    use clap::builder::{PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(BackendChoice::ALL.map(BackendChoice::name))
        .try_map(|s| s.parse::<BackendChoice>())
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
            parse_cache_type(&self.cache_type_k)?,
            parse_cache_type(&self.cache_type_v)?,
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

    pub fn run_options(&self) -> Result<RunOptions> {
        if self.ctx_size == 0 {
            bail!("--ctx-size must be at least 1");
        }
        let (type_k, type_v) = self.cache_types()?;
        Ok(RunOptions {
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
