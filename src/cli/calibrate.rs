//! `kvsharer calibrate` (find a sharing map and report it) and `kvsharer share`
//! (write a copy of the model with the map stored in it), plus the on-the-fly
//! calibration behind `--kv-share 25%`, cached per model and settings.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use kvsharer::gguf::{self, GgmlType, GgufFile};
use kvsharer::kvplan::{self, KvPlan, ShareMap};
use kvsharer::loader::LoadedModel;
use kvsharer::search::{
    self, adapter, report, CalibrationOptions, Corpus, Evaluator, Objective, PairOrder,
    SearchResult, Strategy, StrategyOptions,
};

use super::ModelArgs;
use kvsharer::runtime::BackendChoice;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OrderArg {
    /// Most dissimilar layer pairs first (the paper)
    Dissimilar,
    /// Most similar first (the baseline the paper compares against)
    Similar,
}

/// How much to share and how to search.
#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// Number of layers to share
    #[arg(long = "layers", conflicts_with = "ratio", required_unless_present_any = ["ratio", "map", "kv_budget"])]
    pub layers: Option<usize>,
    /// Fraction of layers to share (e.g. 0.25)
    #[arg(long = "ratio")]
    pub ratio: Option<f32>,
    /// Keep a pair only if the calibration cosine stays above this
    #[arg(long = "threshold", default_value_t = 0.5)]
    pub threshold: f32,
    /// Calibration text, one text per non-empty line [default: the built-in corpus]
    #[arg(long = "calib", value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration texts to use (the first N lines)
    #[arg(long = "samples", default_value_t = 30)]
    pub samples: usize,
    /// Tokens per calibration text (all are cut to the shortest, at most this)
    #[arg(long = "tokens", default_value_t = 64)]
    pub tokens: usize,
    /// Order in which layer pairs are tried
    #[arg(long = "order", value_enum, default_value_t = OrderArg::Dissimilar)]
    pub order: OrderArg,
    /// Write report.json and distances.svg here
    #[arg(long = "report", value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Instead of searching, share --layers random layers with random earlier
    /// owners (the paper's random baseline), seeded by --seed
    #[arg(long = "random-map")]
    pub random_map: bool,
    /// Seed for --random-map
    #[arg(long = "seed", default_value_t = 1)]
    pub seed: u64,
    /// Use the map in this report.json instead of searching (share only)
    #[arg(long = "map", value_name = "REPORT_JSON", hide = true)]
    pub map: Option<PathBuf>,
    #[command(flatten)]
    pub strategy: StrategyArgs,
}

// ---- Search strategies (search::strategy) ----

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    /// The paper's: pairs in --order, kept while the cosine stays above --threshold
    Paper,
    /// At every step, the pair that keeps the model closest to the unshared one
    Greedy,
    /// Like greedy, keeping the --beam best maps at every step
    Beam,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ObjectiveArg {
    /// Mean KL divergence of next-token distributions from the unshared model
    Kld,
    /// Mean cosine of the final hidden states (the paper's measure)
    Cosine,
}

/// How the map is searched for; the paper's own settings are the flags above.
#[derive(Args, Debug, Clone)]
pub struct StrategyArgs {
    /// Search strategy
    #[arg(long = "strategy", value_enum, default_value_t = StrategyArg::Greedy)]
    pub strategy: StrategyArg,
    /// What greedy and beam minimise (kld) or maximise (cosine)
    #[arg(long = "objective", value_enum, default_value_t = ObjectiveArg::Kld)]
    pub objective: ObjectiveArg,
    /// Greedy/beam with kld: stop before the mean KLD would exceed this (cosine: --threshold)
    #[arg(long = "max-kld", value_name = "KLD")]
    pub max_kld: Option<f32>,
    /// Maps kept per step by --strategy beam
    #[arg(long = "beam", value_name = "W", default_value_t = 3)]
    pub beam: usize,
    /// Pairs evaluated per step: the K most similar by the paper's distance, or "all"
    #[arg(long = "candidates", value_name = "K|all", default_value = "12", value_parser = parse_candidates)]
    pub candidates: Candidates,
    /// Greedy: re-evaluate every candidate at every step (default: skip pairs whose
    /// last measured harm shows they cannot be the step's best)
    #[arg(long = "no-lazy")]
    pub no_lazy: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Candidates(pub Option<usize>);

fn parse_candidates(s: &str) -> std::result::Result<Candidates, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Candidates(None));
    }
    match s.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("expected a positive count or \"all\", got {s:?}")),
        Ok(k) => Ok(Candidates(Some(k))),
    }
}

impl Default for StrategyArgs {
    fn default() -> Self {
        let d = StrategyOptions::default();
        StrategyArgs {
            strategy: match d.strategy {
                Strategy::Paper => StrategyArg::Paper,
                Strategy::Greedy => StrategyArg::Greedy,
                Strategy::Beam => StrategyArg::Beam,
            },
            objective: match d.objective {
                Objective::Kld => ObjectiveArg::Kld,
                Objective::Cosine => ObjectiveArg::Cosine,
            },
            max_kld: d.max_kld,
            beam: d.beam,
            candidates: Candidates(d.candidates),
            no_lazy: !d.lazy,
        }
    }
}

impl StrategyArgs {
    fn options(&self) -> StrategyOptions {
        StrategyOptions {
            strategy: match self.strategy {
                StrategyArg::Paper => Strategy::Paper,
                StrategyArg::Greedy => Strategy::Greedy,
                StrategyArg::Beam => Strategy::Beam,
            },
            objective: match self.objective {
                ObjectiveArg::Kld => Objective::Kld,
                ObjectiveArg::Cosine => Objective::Cosine,
            },
            max_kld: self.max_kld,
            beam: self.beam,
            candidates: self.candidates.0,
            lazy: !self.no_lazy,
        }
    }

    /// Part of the on-the-fly cache key.
    fn key(&self) -> String {
        let o = self.options();
        let k = o.candidates.map_or("all".to_string(), |k| k.to_string());
        match o.strategy {
            Strategy::Paper => "paper".to_string(),
            s => format!(
                "{}-{}-c{k}-w{}{}",
                s.name(),
                o.objective.name(),
                o.beam,
                if o.lazy { "-lazy" } else { "" }
            ),
        }
    }
}

// ---- end of search strategies ----

impl SearchArgs {
    fn target(&self, n_layers: usize) -> Result<usize> {
        match (self.layers, self.ratio) {
            (Some(n), _) => Ok(n),
            (None, Some(r)) => ratio_to_layers(r, n_layers),
            (None, None) => bail!("give --layers N or --ratio R"),
        }
    }

    fn corpus(&self) -> Result<Corpus> {
        read_corpus(self.calib.as_deref())
    }
}

/// The calibration corpus in `path`, or the built-in one.
pub fn read_corpus(path: Option<&Path>) -> Result<Corpus> {
    match path {
        None => Ok(Corpus::default_corpus()),
        Some(p) => {
            let bytes = std::fs::read(p)
                .with_context(|| format!("cannot read calibration file {}", p.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "calibration file {} is not UTF-8 text (byte {})",
                    p.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            Ok(Corpus::from_text(&text))
        }
    }
}

fn ratio_to_layers(r: f32, n_layers: usize) -> Result<usize> {
    if !(r.is_finite() && r > 0.0 && r < 1.0) {
        bail!("--ratio must be between 0 and 1 (exclusive), got {r}");
    }
    Ok(((r * n_layers as f32).round() as usize).max(1))
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub search: SearchArgs,
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub search: SearchArgs,
    #[command(flatten)]
    pub planner: super::plan::PlannerArgs,
    /// Where to write the model copy with the map stored in it
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
}

/// Refuses flag values no search can use, naming the flag (the library's errors
/// say what is wrong in its own words).
fn check_flags(s: &SearchArgs) -> Result<()> {
    if s.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if s.tokens < search::MIN_TOKENS_PER_SAMPLE {
        bail!(
            "--tokens must be at least {}",
            search::MIN_TOKENS_PER_SAMPLE
        );
    }
    if s.strategy.beam == 0 {
        bail!("--beam must be at least 1");
    }
    if s.strategy.candidates.0 == Some(0) {
        bail!("--candidates must be at least 1 (or `all`)");
    }
    if let Some(m) = s.strategy.max_kld {
        if !(m.is_finite() && m >= 0.0) {
            bail!("--max-kld must be a non-negative number, got {m}");
        }
    }
    Ok(())
}

/// Runs the search on `backend` with a progress bar on stderr.
pub fn run_search(
    loaded: &LoadedModel,
    s: &SearchArgs,
    threads: usize,
    backend: BackendChoice,
) -> Result<SearchResult> {
    let n_layers = loaded.model.config.n_layers;
    let target = s.target(n_layers)?;
    let corpus = s.corpus()?;
    let opts = CalibrationOptions {
        samples: s.samples,
        tokens: s.tokens,
        target,
        threshold: s.threshold,
        order: match s.order {
            OrderArg::Dissimilar => PairOrder::Dissimilar,
            OrderArg::Similar => PairOrder::Similar,
        },
        threads,
    };
    let strategy = s.strategy.options();
    check_flags(s)?;
    let bar = ProgressBar::new(target as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "calibrating [{bar:30}] {pos}/{len} shared | {msg} | {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!(
        "{}: running the unshared model",
        strategy.strategy.name()
    ));
    let progress = |p: &search::SearchProgress| {
        bar.set_position(p.accepted as u64);
        let best = p.best.map_or("-".into(), |b| format!("{b:.5}"));
        bar.set_message(if p.of == 0 {
            format!("{} pairs tried, last cosine {best}", p.evaluated)
        } else {
            format!(
                "step {}: pair {}/{}, best {} {best}",
                p.accepted + 1,
                p.evaluated,
                p.of,
                p.objective.name()
            )
        });
    };
    let result = search_on(backend, loaded, &corpus, &opts, &strategy, &bar, progress);
    bar.finish_and_clear();
    result
}

/// The search on the chosen backend's run state (`search::run_with` over one
/// `Evaluator`). Prints the backend, or why `auto` stayed on the CPU (`bar` keeps
/// the notes readable).
fn search_on(
    backend: BackendChoice,
    loaded: &LoadedModel,
    corpus: &Corpus,
    opts: &CalibrationOptions,
    strategy: &StrategyOptions,
    bar: &ProgressBar,
    progress: impl FnMut(&search::SearchProgress),
) -> Result<SearchResult> {
    // Bad settings are refused before a device is opened.
    search::check_options(opts, strategy, loaded.model.config.n_layers)?;
    let set = search::prepare(&loaded.tokenizer, corpus, opts.samples, opts.tokens)?;
    let (eval, fallback) = Evaluator::open(backend, &loaded.model, &set, opts.threads, false)
        .with_context(|| format!("--backend {backend}"))?;
    let mut eval = match strategy.strategy {
        search::Strategy::Paper => eval.without_prefix(),
        _ => eval,
    };
    bar.suspend(|| {
        if let Some(why) = &fallback {
            eprintln!("note: --backend auto: {why}");
        }
        if backend != BackendChoice::Cpu {
            eprintln!("backend: {} (sharing search)", eval.describe());
        }
    });
    Ok(search::run_with(
        &mut eval, &set, corpus, opts, strategy, progress,
    )?)
}

fn print_result(r: &SearchResult, n_layers: usize) {
    eprintln!("{}", report::trials_table(r));
    eprintln!(
        "{} | map: {} | {} of {} layers shared | calibration cosine {:.4} | threshold {} | order {:?} | {} samples x {} tokens | {:.1} s (capture {:.1} s)",
        r.outcome,
        r.map,
        r.shared,
        n_layers,
        r.mean_cosine,
        r.threshold,
        r.order,
        r.samples,
        r.tokens_per_sample,
        r.total_time().as_secs_f64(),
        r.capture_seconds
    );
    eprintln!("{}", report::objectives_line(r));
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    if a.model.kv_budget.is_some() {
        bail!("calibrate searches whole-layer maps; for a KV budget use `kvsharer plan --kv-budget SPEC` (or `share --kv-budget SPEC -o OUT.gguf` to store the plan)");
    }
    let threads = a.model.threads()?;
    let (_, loaded) = a.model.load()?;
    let r = run_search(&loaded, &a.search, threads, a.model.backend)?;
    print_result(&r, loaded.model.config.n_layers);
    println!("{}", serde_json::to_string(&r.map.sources())?);
    if let Some(dir) = &a.search.report {
        let (json, svg) = report::write_report_dir(&r, dir)
            .with_context(|| format!("cannot write the report into {}", dir.display()))?;
        eprintln!("report: {} and {}", json.display(), svg.display());
    }
    Ok(())
}

pub fn share(a: ShareArgs) -> Result<()> {
    let threads = a.model.threads()?;
    let path = a.model.model_path()?;
    check_output(&path, &a.output)?;
    a.planner.check_adapters()?;
    let (_, loaded) = a.model.load()?;
    let (mut metadata, adapters) = match &a.model.kv_budget {
        Some(spec) => plan_metadata(&loaded, spec, &a, threads)?,
        None => {
            let (metadata, plan) = map_metadata(&loaded, &a, threads)?;
            let pairs = a
                .planner
                .adapter_options()
                .map(|opts| adapter::pairs_of(&plan, &opts))
                .unwrap_or_default();
            let adapters = super::plan::fit_adapters(&loaded, &a.planner, &pairs, threads)?;
            (metadata, adapters)
        }
    };
    metadata.extend(adapters.metadata());
    let file = loaded.model.file();
    // Adapters a copied file already had were fitted for its old plan.
    let old_adapter = |name: &str| name.ends_with(".kvsharer.weight");
    gguf::write_with_tensors(
        file,
        &metadata,
        &["kvsharer."],
        &old_adapter,
        &adapters.tensors(),
        &a.output,
    )
    .with_context(|| format!("cannot write {}", a.output.display()))?;
    eprintln!(
        "wrote {} (all tensors and original keys kept; inspect with `kvsharer info {}`)",
        a.output.display(),
        a.output.display()
    );
    Ok(())
}

/// `share` without a budget: the whole-layer map (random, from a report, or
/// searched) as metadata, and the plan it makes.
fn map_metadata(
    loaded: &LoadedModel,
    a: &ShareArgs,
    threads: usize,
) -> Result<(Vec<(String, gguf::Value)>, KvPlan)> {
    let n_layers = loaded.model.config.n_layers;
    let whole_layers = |map: &ShareMap| KvPlan::uniform(map, GgmlType::F16, GgmlType::F16);
    if a.search.random_map {
        let target = a.search.target(n_layers)?;
        let map = search::random_map(n_layers, target, a.search.seed)?;
        eprintln!("random map (seed {}): {map}", a.search.seed);
        return Ok((kvplan::to_metadata(&map), whole_layers(&map)));
    }
    if let Some(report_path) = &a.search.map {
        let map = report::read_report_map(report_path, n_layers).map_err(anyhow::Error::msg)?;
        eprintln!("using the map from {}: {map}", report_path.display());
        return Ok((kvplan::to_metadata(&map), whole_layers(&map)));
    }
    let r = run_search(loaded, &a.search, threads, a.model.backend)?;
    print_result(&r, n_layers);
    if let Some(dir) = &a.search.report {
        report::write_report_dir(&r, dir)
            .with_context(|| format!("cannot write the report into {}", dir.display()))?;
    }
    Ok((report::metadata(&r), whole_layers(&r.map)))
}

/// `share --kv-budget`: plans for the budget, prints the plan, and returns its
/// version-2 metadata with the calibration it was measured on, and the adapters
/// its shares read through.
fn plan_metadata(
    loaded: &LoadedModel,
    spec: &str,
    a: &ShareArgs,
    threads: usize,
) -> Result<(Vec<(String, gguf::Value)>, adapter::Adapters)> {
    use gguf::Value;
    let (m, planned, measured, adapters) =
        super::plan::plan_for(loaded, spec, a.model.ctx_size, &a.planner, threads)?;
    eprint!(
        "{}",
        super::plan::plan_table(&planned.plan, &planned.adapted)
    );
    eprintln!(
        "plan: {} | {:.1}% of the f16 KV cache | calibration KLD predicted {:.4}, measured {measured:.4}",
        planned.plan,
        planned.fraction * 100.0,
        planned.predicted_kld
    );
    let mut kv = kvplan::plan_to_metadata(&planned.plan, planned.budget as f32, measured as f32);
    kv.extend([
        (
            kvplan::KEY_MEAN_KLD.to_string(),
            Value::F32(measured as f32),
        ),
        (
            kvplan::KEY_SAMPLE_COUNT.to_string(),
            Value::U32(m.samples as u32),
        ),
        (
            kvplan::KEY_TOKENS_PER_SAMPLE.to_string(),
            Value::U32(m.tokens as u32),
        ),
        (
            kvplan::KEY_CORPUS_SHA256.to_string(),
            Value::String(m.corpus.sha256.clone()),
        ),
        (
            kvplan::KEY_STRATEGY.to_string(),
            Value::String("plan".into()),
        ),
    ]);
    Ok((kv, adapters))
}

/// Refuses outputs that would overwrite the input or land in a missing directory,
/// before any time is spent calibrating.
fn check_output(input: &Path, output: &Path) -> Result<()> {
    if output.is_dir() {
        bail!(
            "output {} is a directory; give a file name such as {}/model-shared.gguf",
            output.display(),
            output.display()
        );
    }
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("output directory {} does not exist", dir.display());
    }
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            bail!(
                "refusing to overwrite the input model {}; choose another -o",
                input.display()
            );
        }
    }
    let probe = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("output directory {} is not writable", dir.display()))?;
    drop(probe);
    Ok(())
}

/// The map for `--kv-share SPEC` (`25%`, `0.25` or a layer count), calibrated with
/// the default settings and cached in the user cache dir under the model's
/// fingerprint and the settings, so the second run starts at once.
pub fn on_the_fly_map(loaded: &LoadedModel, spec: &str, threads: usize) -> Result<ShareMap> {
    let n_layers = loaded.model.config.n_layers;
    let target = parse_share_spec(spec, n_layers)?;
    if target == 0 {
        return Ok(ShareMap::identity(n_layers));
    }
    let search = SearchArgs {
        layers: Some(target),
        ratio: None,
        threshold: 0.5,
        calib: None,
        samples: 30,
        tokens: 64,
        order: OrderArg::Dissimilar,
        report: None,
        map: None,
        random_map: false,
        seed: 1,
        strategy: StrategyArgs::default(),
    };
    let corpus = Corpus::default_corpus();
    let key = format!(
        "{}-n{target}-t0.5-s30-k64-dissimilar-{}-{}",
        model_fingerprint(loaded.model.file())?,
        &corpus.sha256[..16],
        search.strategy.key()
    );
    let cache = kvsharer::fetch::cache_dir()?.join("maps");
    let cached = cache.join(format!("{key}.json"));
    if cached.exists() {
        if let Ok(map) = report::read_report_map(&cached, n_layers) {
            eprintln!("kv-share: using cached map {} ({map})", cached.display());
            return Ok(map);
        }
    }
    eprintln!(
        "kv-share: no stored map for {target} shared layers; calibrating (cached for next time)"
    );
    // `run --backend wgpu --kv-share` still calibrates on the CPU: the map is cached
    // per model and settings, whatever backend then uses it.
    let r = run_search(loaded, &search, threads, BackendChoice::Cpu)?;
    eprintln!(
        "kv-share: {} | map {} | calibration cosine {:.4} | {:.1} s",
        r.outcome,
        r.map,
        r.mean_cosine,
        r.total_time().as_secs_f64()
    );
    if let Err(e) = report::write_report_dir(&r, &cache.join(&key))
        .and_then(|(json, _)| std::fs::copy(json, &cached))
    {
        eprintln!("note: could not cache the map in {}: {e}", cache.display());
    }
    Ok(r.map)
}

/// `25%`, `0.25` or `8`.
pub fn parse_share_spec(spec: &str, n_layers: usize) -> Result<usize> {
    let s = spec.trim();
    let target = if let Some(p) = s.strip_suffix('%') {
        let pct: f32 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--kv-share {spec}: not a percentage"))?;
        ratio_to_layers(pct / 100.0, n_layers)?
    } else if s.contains('.') {
        let r: f32 = s
            .parse()
            .map_err(|_| anyhow::anyhow!("--kv-share {spec}: not a ratio"))?;
        ratio_to_layers(r, n_layers)?
    } else {
        s.parse::<usize>()
            .map_err(|_| anyhow::anyhow!("--kv-share {spec}: expected a layer count (8), a percentage (25%) or a ratio (0.25)"))?
    };
    if target >= n_layers {
        bail!(
            "--kv-share {spec}: cannot share {target} of {n_layers} layers (at most {})",
            n_layers - 1
        );
    }
    Ok(target)
}

/// A cheap, stable identity for a model file: sha256 over its size, its whole header
/// (metadata and tensor index) and 1 MiB samples at 16 evenly spaced offsets of the
/// tensor data. Hashing a multi-GB file fully on every start would defeat the cache.
pub fn model_fingerprint(file: &GgufFile) -> Result<String> {
    let bytes = file.bytes();
    let mut h = Sha256::new();
    h.update((bytes.len() as u64).to_le_bytes());
    let header_end = (file.data_offset() as usize).min(bytes.len());
    h.update(&bytes[..header_end]);
    let data = &bytes[header_end..];
    const SAMPLE: usize = 1 << 20;
    for k in 0..16 {
        let start = data.len().saturating_sub(SAMPLE) * k / 15;
        h.update(&data[start..(start + SAMPLE).min(data.len())]);
    }
    Ok(h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect())
}
