//! `kvsharer serve`: the OpenAI-compatible server. Wires flags to `kvsharer::serve`;
//! sizes the slots from `--parallel` and `--kv-memory`.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::chat::chat_template;
use super::{describe_sharing, file_name, human_bytes, open_state, ModelArgs, SamplingArgs};
use kvsharer::kvplan::KvPlan;
use kvsharer::serve::{self, ServeConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampling defaults for requests that set none (a request's own temperature,
    /// top_p, seed, ... win)
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
    #[arg(long = "host", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port)
    #[arg(long = "port", default_value_t = 8080)]
    pub port: u16,
    /// Slots: conversations decoded together, each with its own -c context
    /// [default: 4, or as many as --kv-memory holds]
    #[arg(short = 'P', long = "parallel", visible_alias = "np", value_name = "N")]
    pub parallel: Option<usize>,
    /// KV cache memory for all slots together (512MiB, 2GiB): without --parallel,
    /// as many slots of -c tokens as fit; with it, a check that they fit
    #[arg(long = "kv-memory", value_name = "SIZE")]
    pub kv_memory: Option<String>,
    /// Requests that may wait for a free slot; more get 503 with Retry-After
    #[arg(long = "queue", default_value_t = 64)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (also read from KVSHARER_API_KEY)
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "KVSHARER_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Print the slots and the KV memory they take, then exit without listening
    #[arg(long = "dry-run")]
    pub dry_run: bool,
}

/// Default slot count without --kv-memory (llama-server's default is 4 too).
const DEFAULT_SLOTS: usize = 4;
/// Largest request body: far above any prompt a slot can hold.
const BODY_LIMIT: usize = 8 << 20;

pub fn run(a: ServeArgs) -> Result<()> {
    let defaults = a.sampling.params()?;
    let mut opts = a.model.run_options()?;
    if opts.window.is_some() {
        bail!("--kv-window is not supported by serve yet: each slot's context is -c tokens (hint: drop --kv-window; requests end with finish_reason \"length\" when a slot is full)");
    }
    let (path, loaded) = a.model.load()?;
    let plan = a.model.kv_plan(&loaded)?;
    let n_embd_kv = loaded.model.config.n_embd_kv();
    let (slots, per_slot) = slot_count(&a, &plan, n_embd_kv, opts.n_ctx)?;
    if a.dry_run {
        eprintln!(
            "kvsharer serve --dry-run: {slots} slots x {} tokens, KV cache {} ({} per slot)",
            opts.n_ctx,
            human_bytes(per_slot * slots),
            human_bytes(per_slot)
        );
        return Ok(());
    }
    opts.n_seq = slots;
    opts.n_batch = opts.n_batch.max(slots);
    let template = chat_template(&loaded)?;
    // The server runs until the process ends: its threads borrow the model for good.
    let loaded: &'static kvsharer::loader::LoadedModel = Box::leak(Box::new(loaded));
    let state = open_state(a.model.backend, &loaded.model, &plan, &opts)
        .context("cannot open the slots' run state")?;
    let sharing = describe_sharing(&plan, state.kv_bytes(), state.kv_bytes_unshared());
    let model_id = file_name(&path).trim_end_matches(".gguf").to_string();
    let config = ServeConfig {
        addr: SocketAddr::new(a.host, a.port),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        model_id: model_id.clone(),
        queue: a.queue.max(1),
        body_limit: BODY_LIMIT,
        defaults,
        n_batch: opts.n_batch,
    };
    let describe = state.describe();
    serve::serve(config, state, &loaded.tokenizer, template, |addr| {
        eprintln!(
            "kvsharer serve: {model_id} | {slots} slots x {} tokens | {describe} | {sharing}",
            opts.n_ctx
        );
        eprintln!("listening on http://{addr}/v1 (OpenAI API: /v1/chat/completions, /v1/completions, /v1/models; /health, /metrics); Ctrl-C stops");
    })?;
    eprintln!("kvsharer serve: stopped");
    Ok(())
}

/// Slots from `--parallel` and `--kv-memory`, and the KV bytes of one slot; says
/// what sharing and quantized caches change: how many slots the same memory holds
/// unshared at f16.
fn slot_count(
    a: &ServeArgs,
    plan: &KvPlan,
    n_embd_kv: usize,
    n_ctx: usize,
) -> Result<(usize, usize)> {
    let per_slot = plan.bytes_per_token(n_embd_kv) * n_ctx;
    let f16_per_slot = plan.f16_bytes_per_token(n_embd_kv) * n_ctx;
    let Some(spec) = &a.kv_memory else {
        return match a.parallel.unwrap_or(DEFAULT_SLOTS) {
            0 => bail!("--parallel must be at least 1"),
            n => Ok((n, per_slot)),
        };
    };
    let memory = match super::parse_bytes(spec) {
        Some(Ok(b)) if b >= 1.0 => b as usize,
        _ => bail!("--kv-memory {spec}: expected a size such as 512MiB or 2GiB"),
    };
    let fit = memory / per_slot.max(1);
    let fit_f16 = memory / f16_per_slot.max(1);
    eprintln!(
        "--kv-memory {}: {fit} slots of {n_ctx} tokens fit at {} per slot ({:.1}% of f16); unshared at f16 ({} per slot) it would hold {fit_f16}",
        human_bytes(memory),
        human_bytes(per_slot),
        100.0 * per_slot as f64 / f16_per_slot.max(1) as f64,
        human_bytes(f16_per_slot),
    );
    match a.parallel {
        _ if fit == 0 => bail!(
            "--kv-memory {spec} holds no slot of {n_ctx} tokens ({} each) (hint: lower -c, raise --kv-memory, or shrink the cache with --kv-budget or --cache-type-k/-v)",
            human_bytes(per_slot)
        ),
        Some(0) => bail!("--parallel must be at least 1"),
        Some(n) if n > fit => bail!(
            "--parallel {n} slots of {n_ctx} tokens need {} but --kv-memory is {} (it holds {fit}) (hint: lower --parallel or -c, or shrink the cache with --kv-budget or --cache-type-k/-v)",
            human_bytes(n * per_slot),
            human_bytes(memory)
        ),
        Some(n) => Ok((n, per_slot)),
        None => Ok((fit, per_slot)),
    }
}
