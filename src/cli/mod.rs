//! Command-line interface: argument definitions shared by the subcommands and the
//! code that turns them into a loaded model, a sharing map and a session.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod info;
pub mod perplexity;
pub mod plan;
pub mod run;
pub mod serve;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::{KvPlan, ShareMap};
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
    /// Write a copy of a model with a KV sharing map (or, with --kv-budget, a KV plan) stored in its metadata
    Share(calibrate::ShareArgs),
    /// Plan the KV cache for a memory budget: share keys and values apart and pick a precision per slot, by measured KLD
    Plan(plan::PlanArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, several conversations at once in parallel slots
    Serve(serve::ServeArgs),
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
        Command::Plan(a) => plan::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Serve(a) => serve::run(a),
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
    /// KV cache type for keys: f16, q8_0, q5_1, q5_0, q4_1, iq4_nl, q4_0 (or f32)
    /// [default: f16, or the plan's]
    #[arg(long = "cache-type-k", value_name = "TYPE")]
    pub cache_type_k: Option<String>,
    /// KV cache type for values: as --cache-type-k [default: f16, or the plan's]
    #[arg(long = "cache-type-v", value_name = "TYPE")]
    pub cache_type_v: Option<String>,
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
    /// Plan the KV cache for a budget (30%, 0.3 of the unshared f16 cache, or 48MiB
    /// for the whole -c context): K and V shared apart, a precision per slot, chosen
    /// by measured KLD (planned on first use and cached)
    #[arg(long = "kv-budget", value_name = "SPEC", conflicts_with = "kv_share")]
    pub kv_budget: Option<String>,
    /// Ignore a sharing map or plan stored in the GGUF (run unshared)
    #[arg(long = "no-kv-share", conflicts_with_all = ["kv_share", "kv_budget"])]
    pub no_kv_share: bool,
    /// Attend in f32 even over an all-f16 cache (on the CPU, ggml's f16 kernel, as
    /// llama.cpp runs it, rounds queries and sums to f16; plans that mix types, and
    /// quantized caches, are always read in f32). With perplexity, the reference
    /// run reads exactly too, so KLD shows the cache's own rounding
    #[arg(long = "exact-attention")]
    pub exact_attention: bool,
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
    plan: &KvPlan,
    opts: &RunOptions,
) -> Result<Box<dyn RunState<'m> + 'm>> {
    let opened = runtime::open_plan(backend, model, plan, opts)
        .with_context(|| format!("--backend {backend}"))?;
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
            Capability::CacheType(_) => "use --backend cpu, or drop --cache-type-k/-v; a stored \
                plan with that type: store one for this backend with `kvsharer share --kv-budget \
                B --plan-types f16,q8_0,q4_0`"
                .into(),
            Capability::Window => "use --backend cpu, or drop --kv-window".into(),
            Capability::MixedPlan => {
                "use --backend cpu, or run with --no-kv-share (or a whole-layer --kv-share)".into()
            }
            _ => "use --backend cpu".into(),
        },
        RuntimeError::NotBuilt { feature, .. } => {
            format!("rebuild with `cargo build --release --features {feature}`")
        }
        RuntimeError::UnknownCacheType(_) => {
            "--cache-type-k/-v take f16, q8_0, q5_1, q5_0, q4_1, iq4_nl, q4_0 (or f32)".into()
        }
        _ => return None,
    })
}

/// KV bytes per token of context, and what the unshared model would allocate.
pub fn kv_accounting(state: &dyn RunState<'_>) -> (usize, usize) {
    (state.kv_bytes_per_token().0, state.kv_bytes_unshared())
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

    /// `--cache-type-k/-v`, f16 where not given.
    pub fn cache_types(&self) -> Result<(GgmlType, GgmlType)> {
        let parse = |t: &Option<String>| t.as_deref().map_or(Ok(GgmlType::F16), parse_cache_type);
        Ok((parse(&self.cache_type_k)?, parse(&self.cache_type_v)?))
    }

    /// Whether the user set a cache type by hand (it then overrides a plan's).
    fn cache_types_given(&self) -> bool {
        self.cache_type_k.is_some() || self.cache_type_v.is_some()
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
            n_seq: 1,
            exact_attention: self.exact_attention,
        })
    }

    /// Loads the model named by `-m` (or the default one), printing what it does.
    pub fn load(&self) -> Result<(PathBuf, LoadedModel)> {
        let path = self.model_path()?;
        let loaded = loader::load(&path)?;
        Ok((path, loaded))
    }

    /// The KV plan the flags ask for: unshared, a stored map or plan, a map
    /// calibrated on the fly (`--kv-share 25%`) or a plan for a budget
    /// (`--kv-budget 30%`); `--cache-type-k/-v` set every slot's type and override
    /// a plan's, saying so.
    pub fn kv_plan(&self, loaded: &LoadedModel) -> Result<KvPlan> {
        let n_layers = loaded.model.config.n_layers;
        let (type_k, type_v) = self.cache_types()?;
        let uniform = |map: &ShareMap| KvPlan::uniform(map, type_k, type_v);
        if self.no_kv_share {
            return Ok(uniform(&ShareMap::identity(n_layers)));
        }
        let planned = match (self.kv_share.as_deref(), self.kv_budget.as_deref()) {
            (_, Some(spec)) => plan::on_the_fly_plan(loaded, spec, self.ctx_size, self.threads()?)?,
            (None, None) => return Ok(uniform(&ShareMap::identity(n_layers))),
            (Some("stored"), None) => match (&loaded.model.stored_plan, &loaded.model.stored_map) {
                (Some(p), _) => p.clone(),
                (None, Some(m)) => return Ok(uniform(m)),
                (None, None) => bail!(
                    "--kv-share: this model file has no stored sharing map (hint: create one with \
                     `kvsharer share -m MODEL --layers N -o OUT.gguf`, or a plan with \
                     `kvsharer share -m MODEL --kv-budget 30% -o OUT.gguf`)"
                ),
            },
            (Some(spec), None) => {
                return Ok(uniform(&calibrate::on_the_fly_map(
                    loaded,
                    spec,
                    self.threads()?,
                )?))
            }
        };
        if self.cache_types_given() {
            eprintln!(
                "note: --cache-type-k/-v set every slot of the plan to K {type_k}, V {type_v} (the plan's own types are not used)"
            );
            return Ok(planned.with_uniform_types(type_k, type_v));
        }
        Ok(planned)
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

/// A size with a unit (`512MiB`, `1.5G`, `64KiB`, `100B`) in bytes: `None` when `s`
/// ends in no unit, an error when the number before it does not parse.
pub fn parse_bytes(s: &str) -> Option<Result<f64, std::num::ParseFloatError>> {
    const UNITS: [(&str, u64); 7] = [
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
        ("B", 1),
    ];
    let s = s.trim();
    let (num, unit) = UNITS
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))?;
    Some(num.trim().parse::<f64>().map(|n| n * unit as f64))
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

/// The plan in JSON reports: `sharing` (version 1's map, or the keys' sources when
/// the halves differ), and both halves' sources and slot types.
pub fn plan_json(plan: &KvPlan, n_embd_kv: usize) -> serde_json::Value {
    use kvsharer::kvplan::Half;
    let types = |h: Half| {
        (0..plan.n_layers())
            .map(|l| plan.read_type(h, l).name())
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "sharing": plan.as_map().unwrap_or(plan.sources(Half::Keys)).sources(),
        "k_source": plan.sources(Half::Keys).sources(),
        "v_source": plan.sources(Half::Values).sources(),
        "k_type": types(Half::Keys),
        "v_type": types(Half::Values),
        "shared_halves": plan.shared_halves(),
        "kv_fraction_of_f16": plan.fraction_of_f16(n_embd_kv),
    })
}

/// One line describing the sharing in use, for status output.
pub fn describe_sharing(plan: &KvPlan, kv_bytes: usize, unshared: usize) -> String {
    if plan.is_unshared() && plan.uniform_types().is_some() {
        return format!("KV sharing off, KV cache {}", human_bytes(kv_bytes));
    }
    let what = match plan.as_map() {
        Some(map) if plan.uniform_types().is_some() => format!(
            "KV sharing on: {} of {} layers shared ({})",
            map.shared_count(),
            map.n_layers(),
            map
        ),
        _ => format!(
            "KV plan: {} of {} K/V slots shared ({plan})",
            plan.shared_halves(),
            2 * plan.n_layers()
        ),
    };
    format!(
        "{what}, KV cache {} instead of {} ({:.1}% saved)",
        human_bytes(kv_bytes),
        human_bytes(unshared),
        100.0 * (1.0 - kv_bytes as f64 / unshared.max(1) as f64)
    )
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
