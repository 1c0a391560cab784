//! `kvsharer plan --kv-budget 30%`: the KV memory plan with the least calibration
//! KLD whose bytes fit a budget (`search::planner`), printed per layer, with a JSON
//! report and a plot; and the on-the-fly planning behind `--kv-budget` on the
//! commands that run the model. The measured move costs are cached per model and
//! settings, so only a model's first plan measures anything.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use kvsharer::kvplan::{Half, KvPlan};
use kvsharer::loader::LoadedModel;
use kvsharer::model::LlamaConfig;
use kvsharer::search::adapter::{self, AdapterOptions, AdapterPair, Adapters, ValueFit};
use kvsharer::search::planner::{self, MoveCosts, PlannedKv, PlannerOptions};
use kvsharer::search::report::{self, PlanReport, PlanRow};
use kvsharer::search::{self, Corpus, Evaluator, KlReference};

use super::calibrate::model_fingerprint;
use super::{human_bytes, ModelArgs};

/// How the planner calibrates (defaults sized so a first plan takes about a
/// minute on a 2-core laptop for a 135M model).
#[derive(Args, Debug, Clone)]
pub struct PlannerArgs {
    /// Calibration text for the planner, one text per non-empty line [default: the
    /// built-in corpus]
    #[arg(id = "plan_calib", long = "plan-calib", value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration texts the planner measures on (the first N lines). Two texts of
    /// 96 tokens rather than four of 48: on short texts each value row weighs more in
    /// attention, and values' rounding measured 3 times what it costs on 512-token
    /// held-out chunks, which steered plans to starve keys
    #[arg(
        id = "plan_samples",
        long = "plan-samples",
        default_value_t = 2,
        value_name = "N"
    )]
    pub samples: usize,
    /// Tokens per calibration text
    #[arg(
        id = "plan_tokens",
        long = "plan-tokens",
        default_value_t = 96,
        value_name = "N"
    )]
    pub tokens: usize,
    /// Earlier layers tried as the source of each K or V slot shared apart (keys
    /// and values read from different layers; two runs per layer and source). 0,
    /// the default, shares whole layers only: on the default model a layer shared
    /// whole from layer 0 costs about what its values alone do (calibration KLD
    /// 0.0255 against 0.0254 at layer 7), for twice the bytes
    #[arg(
        id = "plan_sources",
        long = "plan-sources",
        default_value_t = 0,
        value_name = "N"
    )]
    pub sources: usize,
    /// Precisions slots may take, comma-separated, from f16, q8_0, q5_1, q5_0,
    /// q4_1, iq4_nl, q4_0 (llama.cpp's cache types); `f16` alone plans by sharing
    /// only
    #[arg(
        long = "plan-types",
        default_value = "f16,q8_0,q5_1,q5_0,q4_1,iq4_nl",
        value_name = "LIST"
    )]
    pub types: String,
    /// Measure the move costs again even when they are cached
    #[arg(long = "replan")]
    pub replan: bool,
    /// Fitted adapters for shared halves, stored as extra tensors (originals
    /// untouched): `values` folds a per-KV-head linear map into `attn_output`,
    /// `keys` a RoPE-commuting scale into `attn_q`. With --kv-budget the planner
    /// measures each layer's share from the layer below with and without its
    /// adapter and keeps the adapter only where it measured better
    #[arg(long = "adapters", value_enum, default_value = "none")]
    pub adapters: AdaptersArg,
    /// Tokens per calibration text the adapters are fitted on
    #[arg(long = "adapter-tokens", default_value_t = 256, value_name = "N")]
    pub adapter_tokens: usize,
    /// What value adapters fit: the attention output (the unshared model's
    /// attention weights over both layers' values) or the cached value rows
    #[arg(long = "adapter-fit", value_enum, default_value = "attention")]
    pub adapter_fit: AdapterFitArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdapterFitArg {
    Attention,
    Rows,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdaptersArg {
    None,
    Values,
    Keys,
    Both,
}

impl Default for PlannerArgs {
    /// The flags' own defaults (stated once, in the attributes above).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            planner: PlannerArgs,
        }
        <Defaults as clap::Parser>::parse_from(["kvsharer"]).planner
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub planner: PlannerArgs,
    /// Write plan.json and plan.svg here
    #[arg(long = "report", value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Print the plan as JSON on stdout (the table goes to stderr)
    #[arg(long = "json")]
    pub json: bool,
}

/// A budget as a fraction of the unshared f16 cache: `30%`, `0.3`, or bytes for
/// the whole context (`48MiB`, `512KiB`, `1GiB`) at `n_ctx` cells.
pub fn parse_budget(spec: &str, config: &LlamaConfig, n_ctx: usize) -> Result<f64> {
    let s = spec.trim();
    let f16 = kvsharer::gguf::GgmlType::F16;
    let f16_per_token =
        KvPlan::unshared(config.n_layers, f16, f16).f16_bytes_per_token(config.n_embd_kv());
    let fraction = if let Some(p) = s.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--kv-budget {spec}: not a percentage"))?;
        pct / 100.0
    } else if let Some(bytes) = super::parse_bytes(s) {
        let bytes = bytes.map_err(|_| anyhow::anyhow!("--kv-budget {spec}: not a size"))?;
        bytes / (f16_per_token as f64 * n_ctx as f64)
    } else {
        s.parse::<f64>().map_err(|_| {
            anyhow::anyhow!(
                "--kv-budget {spec}: expected a percentage (30%), a fraction (0.3) or a size for the whole context (48MiB)"
            )
        })?
    };
    if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.0) {
        bail!(
            "--kv-budget {spec}: that is {:.1}% of the unshared f16 KV cache ({} at -c {n_ctx}); a budget must be more than 0% and at most 100%",
            fraction * 100.0,
            human_bytes(f16_per_token * n_ctx)
        );
    }
    Ok(fraction)
}

impl PlannerArgs {
    fn corpus(&self) -> Result<Corpus> {
        super::calibrate::read_corpus(self.calib.as_deref())
    }

    /// `--plan-types` as ggml types, highest precision first; f16 is always allowed
    /// (the walk starts there).
    fn ladder(&self) -> Result<Vec<kvsharer::gguf::GgmlType>> {
        let mut types = vec![kvsharer::gguf::GgmlType::F16];
        for name in self
            .types
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let ty = kvsharer::gguf::GgmlType::from_name(name)
                .filter(|t| planner::LADDER.contains(t))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--plan-types: '{name}' is not one of f16, q8_0, q5_1, q5_0, q4_1, iq4_nl, q4_0"
                    )
                })?;
            if !types.contains(&ty) {
                types.push(ty);
            }
        }
        types.sort_by_key(|t| planner::LADDER.iter().position(|l| l == t));
        Ok(types)
    }

    /// What `--adapters` asks for (none: `None`).
    pub fn adapter_options(&self) -> Option<AdapterOptions> {
        let opts = AdapterOptions {
            keys: matches!(self.adapters, AdaptersArg::Keys | AdaptersArg::Both),
            values: matches!(self.adapters, AdaptersArg::Values | AdaptersArg::Both),
            fit: match self.adapter_fit {
                AdapterFitArg::Rows => ValueFit::Rows,
                AdapterFitArg::Attention => ValueFit::Attention,
            },
            ..AdapterOptions::default()
        };
        (opts.keys || opts.values).then_some(opts)
    }

    pub fn check_adapters(&self) -> Result<()> {
        if self.adapter_tokens < search::MIN_TOKENS_PER_SAMPLE {
            bail!(
                "--adapter-tokens must be at least {}",
                search::MIN_TOKENS_PER_SAMPLE
            );
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        self.check_adapters()?;
        if self.samples == 0 {
            bail!("--plan-samples must be at least 1");
        }
        if self.tokens < search::MIN_TOKENS_PER_SAMPLE {
            bail!(
                "--plan-tokens must be at least {}",
                search::MIN_TOKENS_PER_SAMPLE
            );
        }
        Ok(())
    }
}

/// What the planner measured, and on what.
pub struct Measured {
    pub costs: MoveCosts,
    pub corpus: Corpus,
    pub samples: usize,
    pub tokens: usize,
    /// The neighbour adapters, where this run fitted them (not when the costs
    /// came from the cache).
    pub adapters: Option<Adapters>,
}

/// The move costs for `loaded`: from the cache, or measured (with a progress bar)
/// and cached.
pub fn move_costs(loaded: &LoadedModel, p: &PlannerArgs, threads: usize) -> Result<Measured> {
    p.check()?;
    let types = p.ladder()?;
    let corpus = p.corpus()?;
    let c = &loaded.model.config;
    let adapters = match p.adapter_options() {
        Some(o) => format!(
            "-ad{}{}-{:?}-t{}",
            if o.keys { "k" } else { "" },
            if o.values { "v" } else { "" },
            o.fit,
            p.adapter_tokens
        ),
        None => String::new(),
    };
    let key = format!(
        // `v6`: whole-layer shares are measured too (`MoveCosts::layer_shares`);
        // costs cached without them would plan without them.
        "{}-v6-s{}-k{}-src{}-{}{adapters}-{}",
        model_fingerprint(loaded.model.file())?,
        p.samples,
        p.tokens,
        p.sources,
        types.iter().map(|t| t.name()).collect::<Vec<_>>().join("."),
        &corpus.sha256[..16]
    );
    let dir = kvsharer::fetch::cache_dir()?.join("plans");
    let cached = dir.join(format!("{key}.json"));
    let measured = |costs, adapters| Measured {
        costs,
        corpus: corpus.clone(),
        samples: p.samples,
        tokens: p.tokens,
        adapters,
    };
    if !p.replan {
        if let Some(costs) = std::fs::read_to_string(&cached)
            .ok()
            .and_then(|t| serde_json::from_str::<MoveCosts>(&t).ok())
            .filter(|m| planner::check_costs(m, c.n_layers, c.n_embd_kv()).is_ok())
        {
            eprintln!(
                "kv-plan: using the move costs measured before ({})",
                cached.display()
            );
            return Ok(measured(costs, None));
        }
    }
    let set = search::prepare(&loaded.tokenizer, &corpus, p.samples, p.tokens)?;
    let mut eval = Evaluator::cpu(&loaded.model, &set, threads, true)?;
    // With adapters: every layer's neighbour share fitted, in a temporary copy of
    // the model the adapted moves are measured on.
    let fitted = match p.adapter_options() {
        Some(opts) => {
            let pairs = adapter::neighbour_pairs(c.n_layers, &opts);
            Some(fit_adapters(loaded, p, &pairs, threads)?)
        }
        None => None,
    };
    let adapted = match &fitted {
        Some(f) => Some(adapter::adapted_model(
            &loaded.model,
            f,
            &std::env::temp_dir(),
        )?),
        None => None,
    };
    let mut adapted_eval = match &adapted {
        Some(a) => Some(Evaluator::cpu(&a.model, &set, threads, true)?),
        None => None,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "kv-plan: measuring moves [{bar:30}] {pos}/{len} | {elapsed} (about {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = PlannerOptions {
        sources: p.sources,
        threads,
        types,
    };
    let costs = planner::measure(&mut eval, adapted_eval.as_mut(), &opts, |pr| {
        bar.set_length(pr.total as u64);
        bar.set_position(pr.done as u64);
    });
    bar.finish_and_clear();
    let costs = costs?;
    eprintln!(
        "kv-plan: measured {} moves on {} texts x {} tokens in {:.1} s (cached for next time)",
        costs.runs, set.n_samples, set.seq_len, costs.seconds
    );
    let write = std::fs::create_dir_all(&dir).and_then(|_| {
        let tmp = tempfile::NamedTempFile::new_in(&dir)?;
        std::fs::write(tmp.path(), serde_json::to_string(&costs)?)?;
        tmp.persist(&cached).map(|_| ()).map_err(|e| e.error)
    });
    if let Err(e) = write {
        eprintln!(
            "note: could not cache the move costs in {}: {e}",
            dir.display()
        );
    }
    Ok(measured(costs, fitted))
}

/// The plan for `--kv-budget SPEC` on a command that runs the model.
pub fn on_the_fly_plan(
    loaded: &LoadedModel,
    spec: &str,
    n_ctx: usize,
    threads: usize,
) -> Result<KvPlan> {
    let budget = parse_budget(spec, &loaded.model.config, n_ctx)?;
    let m = move_costs(loaded, &PlannerArgs::default(), threads)?;
    let p = planner::plan(&m.costs, budget)?;
    eprintln!(
        "kv-plan: {:.1}% of the f16 KV cache (budget {:.1}%), predicted calibration KLD {:.4}: {}",
        p.fraction * 100.0,
        budget * 100.0,
        p.predicted_kld,
        p.plan
    );
    Ok(p.plan)
}

/// The plan's KLD measured on the planner's calibration set (two runs), the
/// plan reading through `adapters` where given.
pub fn measure_plan(
    loaded: &LoadedModel,
    m: &Measured,
    plan: &KvPlan,
    adapters: &Adapters,
    threads: usize,
) -> Result<f64> {
    let set = search::prepare(&loaded.tokenizer, &m.corpus, m.samples, m.tokens)?;
    let mut eval = Evaluator::cpu(&loaded.model, &set, threads, true)?;
    let base = eval.run_map(&kvsharer::kvplan::ShareMap::identity(plan.n_layers()), true)?;
    let reference = KlReference::new(&base.logits, loaded.model.config.n_vocab);
    let logits = if adapters.is_empty() {
        eval.plan_logits(plan, &base, 0)?
    } else {
        let adapted = adapter::adapted_model(&loaded.model, adapters, &std::env::temp_dir())?;
        let mut eval = Evaluator::cpu(&adapted.model, &set, threads, true)?;
        eval.plan_logits(plan, &base, 0)?
    };
    Ok(reference.mean_kld(&logits, threads))
}

/// The adapters for `pairs`, fitted on the planner's calibration text (every
/// line, cut to `--adapter-tokens`) with a progress bar; none: empty.
pub fn fit_adapters(
    loaded: &LoadedModel,
    p: &PlannerArgs,
    pairs: &[AdapterPair],
    threads: usize,
) -> Result<Adapters> {
    let Some(opts) = p.adapter_options().filter(|_| !pairs.is_empty()) else {
        return Ok(Adapters::default());
    };
    let start = std::time::Instant::now();
    let texts = adapter::tokenize_texts(&loaded.tokenizer, &p.corpus()?, p.adapter_tokens)?;
    let bar = ProgressBar::new(texts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "adapters: fitting {msg} [{bar:30}] {pos}/{len} texts | {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{}", pairs.len()));
    let fitted = adapter::fit(&loaded.model, pairs, &texts, threads, &opts, |done| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let (adapters, rows) = fitted?;
    let (k, v) = adapters.counts();
    eprintln!(
        "adapters: {k} key (attn_q) and {v} value (attn_output, fitted to the {}) adapters fitted on {rows} tokens in {:.1} s",
        match opts.fit {
            ValueFit::Rows => "cached values",
            ValueFit::Attention => "attention output",
        },
        start.elapsed().as_secs_f64()
    );
    Ok(adapters)
}

/// The plan as a table: one line per layer (`+a`: read through a fitted adapter).
pub fn plan_table(plan: &KvPlan, adapted: &[AdapterPair]) -> String {
    let mut s = String::from("layer  K from  V from  K type  V type\n");
    for (l, (kf, vf, kt, vt)) in plan.rows().into_iter().enumerate() {
        let from = |f: usize, half: Half| {
            if f == l {
                "own".to_string()
            } else if adapted.iter().any(|p| p.half == half && p.layer == l) {
                format!("{}{f}+a", half.letter())
            } else {
                format!("{}{f}", half.letter())
            }
        };
        s.push_str(&format!(
            "{l:>5}  {:>6}  {:>6}  {:>6}  {:>6}\n",
            from(kf, Half::Keys),
            from(vf, Half::Values),
            kt.name(),
            vt.name()
        ));
    }
    s
}

/// Plans for a budget, fits the adapters the plan's shares read through, and
/// measures the result on the calibration set.
pub fn plan_for(
    loaded: &LoadedModel,
    spec: &str,
    n_ctx: usize,
    p: &PlannerArgs,
    threads: usize,
) -> Result<(Measured, PlannedKv, f64, Adapters)> {
    let budget = parse_budget(spec, &loaded.model.config, n_ctx)?;
    let m = move_costs(loaded, p, threads)?;
    let planned = planner::plan_with(&m.costs, budget, &p.ladder()?)?;
    let adapters = match &m.adapters {
        Some(all) => all.subset(&planned.adapted),
        None => fit_adapters(loaded, p, &planned.adapted, threads)?,
    };
    let measured = measure_plan(loaded, &m, &planned.plan, &adapters, threads)?;
    Ok((m, planned, measured, adapters))
}

pub fn run(a: PlanArgs) -> Result<()> {
    let Some(spec) = a.model.kv_budget.clone() else {
        bail!("give the budget with --kv-budget (30%, 0.3 or 48MiB with -c)");
    };
    let threads = a.model.threads()?;
    let (_, loaded) = a.model.load()?;
    let c = &loaded.model.config;
    let (m, planned, measured, _) =
        plan_for(&loaded, &spec, a.model.ctx_size, &a.planner, threads)?;
    let n_embd_kv = c.n_embd_kv();
    let per_token = planned.plan.bytes_per_token(n_embd_kv);
    let f16_per_token = planned.plan.f16_bytes_per_token(n_embd_kv);
    eprint!("{}", plan_table(&planned.plan, &planned.adapted));
    eprintln!(
        "plan: {} | KV {} bytes/token = {:.1}% of f16 (budget {:.1}%); {} at -c {} instead of {}",
        planned.plan,
        per_token,
        planned.fraction * 100.0,
        planned.budget * 100.0,
        human_bytes(per_token * a.model.ctx_size),
        a.model.ctx_size,
        human_bytes(f16_per_token * a.model.ctx_size)
    );
    eprintln!(
        "calibration KLD: predicted {:.4} (sum of single moves), measured {:.4} ({} texts x {} tokens)",
        planned.predicted_kld, measured, m.samples, m.tokens
    );
    let walk = planner::walk(&m.costs, &a.planner.ladder()?);
    let report = PlanReport {
        budget: planned.budget,
        fraction: planned.fraction,
        bytes_per_token: per_token,
        f16_bytes_per_token: f16_per_token,
        predicted_kld: planned.predicted_kld,
        measured_kld: Some(measured),
        layers: PlanRow::of(&planned.plan),
        steps: &planned.steps,
        adapted: &planned.adapted,
        walk: &walk,
        costs: &m.costs,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if let Some(dir) = &a.report {
        let (json, svg) = report::write_plan_report(&report, dir)
            .with_context(|| format!("cannot write the report into {}", dir.display()))?;
        eprintln!("report: {} and {}", json.display(), svg.display());
    }
    eprintln!(
        "store it: kvsharer share --kv-budget {spec} -o OUT.gguf (then --kv-share uses it), or pass --kv-budget {spec} to run/chat/perplexity/bench"
    );
    Ok(())
}
