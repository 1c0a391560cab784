//! `kvsharer perplexity`: llama-perplexity's measurement on a text file and, with a
//! sharing map, the comparison against the unshared model in the same run
//! (llama-perplexity's `--kl-divergence` statistics, without the logits file).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use kvsharer::eval::{
    self, ComparisonProgress, ComparisonReport, Estimate, PerplexityOptions, PerplexityProgress,
    PerplexityReport, Quantiles,
};
use kvsharer::gguf::GgmlType;
use kvsharer::kvplan::KvPlan;
use kvsharer::runtime::{BackendChoice, RunOptions, RuntimeError};

use super::{describe_sharing, file_name, human_bytes, kv_accounting, open_state, ModelArgs};

#[derive(Args, Debug)]
#[command(mut_arg("ctx_size", |a| a
    .default_value("512")
    .help("Tokens per chunk (and KV cache cells); the second half of each chunk is scored")))]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to measure (UTF-8); one trailing newline is dropped, as llama.cpp does
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: PathBuf,
    /// Evaluate at most N chunks [default: all]
    #[arg(long = "chunks", value_name = "N")]
    pub chunks: Option<usize>,
    /// Print results as JSON on stdout
    #[arg(long = "json")]
    pub json: bool,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file)
        .with_context(|| format!("cannot read the text file {}", a.file.display()))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "text file {} is not valid UTF-8 (byte {})",
            a.file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
    }
    let sopts = a.model.run_options()?;
    let opts = PerplexityOptions {
        n_ctx: sopts.n_ctx,
        max_chunks: a.chunks,
    };
    let (path, loaded) = a.model.load()?;
    let plan = a.model.kv_plan(&loaded)?;
    let n_embd_kv = loaded.model.config.n_embd_kv();
    let tokens = eval::tokenize_text(&loaded.tokenizer, &text)?;
    // Fail on too little text before allocating any cache.
    let chunks = eval::ChunkPlan::new(tokens.len(), &opts, &loaded.tokenizer)?;
    eprintln!(
        "perplexity: {} | {} | {} tokens, {} chunks of {} (scoring the last {} predictions of each){}",
        file_name(&path),
        file_name(&a.file),
        tokens.len(),
        chunks.n_chunks,
        chunks.n_ctx,
        chunks.scored_per_chunk(),
        if chunks.bos.is_some() { ", BOS first" } else { "" }
    );
    let started = Instant::now();
    // The reference is always the plain model: unshared, f16 cache, no window.
    let reference_opts = RunOptions {
        type_k: GgmlType::F16,
        type_v: GgmlType::F16,
        window: None,
        ..sopts.clone()
    };
    let is_reference = plan.is_unshared()
        && plan.uniform_types() == Some((GgmlType::F16, GgmlType::F16))
        && sopts.window.is_none();
    if is_reference {
        let mut session = open_state(a.model.backend, &loaded.model, &plan, &sopts)?;
        eprintln!(
            "{}",
            describe_sharing(&plan, session.kv_bytes(), kv_accounting(session.as_ref()).1)
        );
        let mut display = RunningDisplay::new(started);
        let report = eval::perplexity(session.as_mut(), &loaded.tokenizer, &tokens, &opts, |p| {
            display.perplexity(p)
        })?;
        display.finish();
        if a.json {
            print_json(
                &path,
                &a.file,
                &plan,
                n_embd_kv,
                &sopts,
                Some(&report),
                None,
            )
        } else {
            print_perplexity(&report);
            Ok(())
        }
    } else {
        let identity = KvPlan::unshared(plan.n_layers(), GgmlType::F16, GgmlType::F16);
        let mut base = open_state(a.model.backend, &loaded.model, &identity, &reference_opts)?;
        // The same device, kernels and weights as the reference: only the KV cache
        // and activations are the test run's own.
        let mut shared = match base.sibling_plan(&plan, &sopts) {
            Ok(s) => s,
            Err(e @ RuntimeError::Unsupported { .. }) if a.model.backend == BackendChoice::Auto => {
                eprintln!(
                    "note: --backend auto: {e}; the second session runs on the CPU backend (ggml)"
                );
                open_state(BackendChoice::Cpu, &loaded.model, &plan, &sopts)?
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("--backend {}", a.model.backend)))
            }
        };
        eprintln!(
            "{}",
            describe_sharing(&plan, shared.kv_bytes(), base.kv_bytes())
        );
        eprintln!(
            "comparing against the unshared model with an f16 cache and no window on the same chunks (two passes per chunk); cache {}{}",
            plan.uniform_types().map_or("mixed (per-slot types)".to_string(), |(k, v)| format!("{k}/{v}")),
            sopts.window.map_or(String::new(), |w| format!(", window {} + sink {}", w.recent, w.sink))
        );
        let mut display = RunningDisplay::new(started);
        let report = eval::compare(
            base.as_mut(),
            shared.as_mut(),
            &loaded.tokenizer,
            &tokens,
            &opts,
            |p| display.comparison(p),
        )?;
        display.finish();
        if a.json {
            print_json(
                &path,
                &a.file,
                &plan,
                n_embd_kv,
                &sopts,
                None,
                Some(&report),
            )
        } else {
            print_comparison(&plan, &report);
            Ok(())
        }
    }
}

/// llama.cpp's running output on stderr: an ETA after the first chunk, then
/// `[1]12.3456,[2]...` (or one table row per chunk when comparing).
struct RunningDisplay {
    started: Instant,
}

impl RunningDisplay {
    fn new(started: Instant) -> Self {
        RunningDisplay { started }
    }

    fn eta(&self, chunk: usize, n_chunks: usize) {
        if chunk == 1 {
            let per_chunk = self.started.elapsed().as_secs_f64();
            eprintln!(
                "{:.2} seconds per chunk - ETA {}",
                per_chunk,
                format_duration(per_chunk * (n_chunks - 1) as f64)
            );
        }
    }

    fn perplexity(&mut self, p: &PerplexityProgress) {
        self.eta(p.chunk, p.n_chunks);
        eprint!("[{}]{:.4},", p.chunk, p.ppl);
        std::io::stderr().flush().ok();
    }

    fn comparison(&mut self, p: &ComparisonProgress) {
        self.eta(p.chunk, p.n_chunks);
        if p.chunk == 1 {
            eprintln!(
                "chunk        PPL(base)     PPL(shared)   ln(PPL(shared)/PPL(base))    KL divergence     same top"
            );
        }
        let s = p.sums;
        let r = s.log_ppl_ratio();
        let k = s.kld();
        eprintln!(
            "{:>4}/{:<4} {:>11.4} {:>13.4}   {:>10.5} ± {:<10.5}   {:>9.5} ± {:<8.5} {:>6.2}%",
            p.chunk,
            p.n_chunks,
            s.ppl_base().value,
            s.ppl_test().value,
            r.value,
            r.uncertainty,
            k.value,
            k.uncertainty,
            100.0 * s.same_top().value
        );
    }

    fn finish(&self) {
        eprintln!();
        eprintln!(
            "done in {}",
            format_duration(self.started.elapsed().as_secs_f64())
        );
    }
}

fn format_duration(seconds: f64) -> String {
    if seconds >= 60.0 {
        format!("{:.0}m{:02.0}s", (seconds / 60.0).floor(), seconds % 60.0)
    } else {
        format!("{seconds:.1}s")
    }
}

fn print_perplexity(r: &PerplexityReport) {
    println!(
        "{} chunks of {} tokens, {} predictions scored, KV cache {}",
        r.n_chunks,
        r.n_ctx,
        r.scored,
        human_bytes(r.kv_bytes)
    );
    println!(
        "Final estimate: PPL = {:.4} +/- {:.5}",
        r.ppl.value, r.ppl.uncertainty
    );
}

fn pm(e: Estimate) -> String {
    format!("{:10.6} ± {:10.6}", e.value, e.uncertainty)
}

fn pm_percent(e: Estimate) -> String {
    format!("{:6.3} ± {:5.3} %", 100.0 * e.value, 100.0 * e.uncertainty)
}

fn print_quantiles(name: &str, q: &Quantiles, scale: f64, unit: &str) {
    let rows = [
        ("Maximum", q.max),
        ("99.9%  ", q.p99_9),
        ("99.0%  ", q.p99),
        ("95.0%  ", q.p95),
        ("90.0%  ", q.p90),
        ("Median ", q.median),
        ("10.0%  ", q.p10),
        (" 5.0%  ", q.p5),
        (" 1.0%  ", q.p1),
        (" 0.1%  ", q.p0_1),
        ("Minimum", q.min),
    ];
    for (label, v) in rows {
        println!("{label} {name}: {:10.6}{unit}", scale * v);
    }
}

fn print_comparison(plan: &KvPlan, r: &ComparisonReport) {
    println!(
        "KV plan {} ({} of {} K/V slots shared); {} chunks of {} tokens, {} predictions compared",
        plan,
        plan.shared_halves(),
        2 * plan.n_layers(),
        r.n_chunks,
        r.n_ctx,
        r.scored
    );
    if r.scored <= 10 {
        println!("(10 or fewer predictions: uncertainties are reported as 0, as llama.cpp does)");
    }
    println!();
    println!("====== Perplexity statistics ======");
    println!("Mean PPL(shared)                   : {}", pm(r.ppl_test));
    println!("Mean PPL(base)                     : {}", pm(r.ppl_base));
    println!(
        "Cor(ln(PPL(shared)), ln(PPL(base))): {:6.2}%",
        100.0 * r.log_ppl_correlation
    );
    println!(
        "Mean ln(PPL(shared)/PPL(base))     : {}",
        pm(r.log_ppl_ratio)
    );
    println!("Mean PPL(shared)/PPL(base)         : {}", pm(r.ppl_ratio));
    println!("Mean PPL(shared)-PPL(base)         : {}", pm(r.ppl_diff));
    println!();
    println!("====== KL divergence statistics ======");
    println!("Mean    KLD: {}", pm(r.kld));
    if let Some(q) = &r.kld_quantiles {
        print_quantiles("KLD", q, 1.0, "");
    }
    println!();
    println!("====== Token probability statistics ======");
    println!("Mean    Δp: {}", pm_percent(r.p_diff));
    if let Some(q) = &r.p_diff_quantiles {
        print_quantiles("Δp", q, 100.0, "%");
    }
    println!("RMS Δp    : {}", pm_percent(r.p_diff_rms));
    println!("Same top p: {}", pm_percent(r.same_top));
    println!();
    println!("====== KV cache ======");
    println!(
        "unshared {} | shared {} | ratio {:.4} (owned K/V slots {}/{})",
        human_bytes(r.base_kv_bytes),
        human_bytes(r.test_kv_bytes),
        r.test_kv_bytes as f64 / r.base_kv_bytes.max(1) as f64,
        2 * plan.n_layers() - plan.shared_halves(),
        2 * plan.n_layers()
    );
}

fn print_json(
    model: &std::path::Path,
    text: &std::path::Path,
    plan: &KvPlan,
    n_embd_kv: usize,
    sopts: &RunOptions,
    perplexity: Option<&PerplexityReport>,
    comparison: Option<&ComparisonReport>,
) -> Result<()> {
    let v = serde_json::json!({
        "model": model.display().to_string(),
        "text_file": text.display().to_string(),
        "n_ctx": sopts.n_ctx,
        "threads": sopts.n_threads,
        "sharing": plan.as_map().unwrap_or(plan.sources(kvsharer::kvplan::Half::Keys)).sources(),
        "shared_layers": plan.as_map().map(|m| m.shared_count()),
        "owner_layers": plan.as_map().map(|m| m.owner_count()),
        "cache_type_k": plan.uniform_types().map_or("mixed", |t| t.0.name()),
        "cache_type_v": plan.uniform_types().map_or("mixed", |t| t.1.name()),
        "kv_plan": super::plan_json(plan, n_embd_kv),
        "kv_window": sopts.window.map(|w| serde_json::json!({"sink": w.sink, "recent": w.recent})),
        "perplexity": perplexity,
        "comparison": comparison,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
