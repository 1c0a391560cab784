//! `kvsharer bench`: llama-bench's pp/tg measurements for kvsharer and, in the same
//! run on the same file, threads and tokens, for llama.cpp (through its C API).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use rand::{Rng, SeedableRng};

use kvsharer::oracle::{self, CacheType, ContextOptions, LlamaCppModel};
use kvsharer::runtime::Logits;

use super::{describe_sharing, file_name, human_bytes, kv_accounting, open_state, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prompt-processing test (pp)
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens for the generation test (tg)
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Tokens already in the cache before each test (llama-bench's -d)
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    pub depth: usize,
    /// Repetitions of each test
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub repetitions: usize,
    /// llama.cpp's key cache type [default: same as --cache-type-k]
    #[arg(long = "llama-cache-type-k", value_name = "TYPE")]
    pub llama_cache_type_k: Option<String>,
    /// llama.cpp's value cache type [default: same as --cache-type-v]
    #[arg(long = "llama-cache-type-v", value_name = "TYPE")]
    pub llama_cache_type_v: Option<String>,
    /// Layers llama.cpp puts on its GPU backend (llama.cpp's -ngl; 99 = all). Needs a
    /// build with --features cuda, vulkan or metal; 0 keeps llama.cpp on the CPU
    #[arg(long = "llama-ngl", value_name = "N", default_value_t = 0)]
    pub llama_ngl: u32,
    /// Skip the llama.cpp side
    #[arg(long = "no-llama-cpp")]
    pub no_llama_cpp: bool,
    /// Print results as JSON
    #[arg(long = "json")]
    pub json: bool,
}

#[derive(Default, Clone, serde::Serialize)]
struct Series {
    runtime: String,
    test: String,
    samples: Vec<f64>,
}

impl Series {
    fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }
    fn sd(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

fn cache_type(name: &str) -> Result<CacheType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f16" => CacheType::F16,
        "q8_0" => CacheType::Q8_0,
        "q5_1" => CacheType::Q5_1,
        "q5_0" => CacheType::Q5_0,
        "q4_1" => CacheType::Q4_1,
        "iq4_nl" => CacheType::Iq4Nl,
        "q4_0" => CacheType::Q4_0,
        other => bail!("llama.cpp side: cache type {other} not supported in bench"),
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 || (a.n_prompt == 0 && a.n_gen == 0) {
        bail!("nothing to measure: need -r >= 1 and -p or -n > 0");
    }
    let mut opts = a.model.run_options()?;
    let needed = a.depth + a.n_prompt.max(a.n_gen);
    opts.n_ctx = opts.n_ctx.max(needed);
    let (path, loaded) = a.model.load()?;
    let plan = a.model.kv_plan(&loaded)?;
    let n_vocab = loaded.model.config.n_vocab as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..n_vocab)).collect() };
    let depth_tokens = random_tokens(a.depth);
    let prompt_tokens = random_tokens(a.n_prompt);
    let gen_tokens = random_tokens(a.n_gen);

    let mut session = open_state(a.model.backend, &loaded.model, &plan, &opts)?;
    if !a.no_llama_cpp {
        let rebuild = "in a build with --features cuda or vulkan";
        match (a.llama_ngl, oracle::supports_gpu_offload()) {
            (0, _) if session.on_gpu() => eprintln!("note: llama.cpp's side of this comparison runs on the CPU (--llama-ngl 99 offloads it, {rebuild})"),
            (0, _) => {}
            (_, false) => eprintln!("note: this build's llama.cpp has no GPU backend, so --llama-ngl is ignored and llama.cpp runs on the CPU (it works {rebuild})"),
            (n, true) => eprintln!("llama.cpp: {n} layers offloaded to its GPU backend"),
        }
    }
    let llama = if a.no_llama_cpp {
        None
    } else {
        Some(LlamaCppModel::load_offloading(&path, a.llama_ngl)?)
    };
    let mut llama_ctx = match &llama {
        None => None,
        Some(m) => Some(
            m.context(ContextOptions {
                n_ctx: opts.n_ctx as u32,
                n_batch: opts.n_batch as u32,
                n_ubatch: opts.n_batch as u32,
                n_threads: opts.n_threads,
                flash_attn: true,
                type_k: cache_type(
                    a.llama_cache_type_k
                        .as_deref()
                        .or(a.model.cache_type_k.as_deref())
                        .unwrap_or("f16"),
                )?,
                type_v: cache_type(
                    a.llama_cache_type_v
                        .as_deref()
                        .or(a.model.cache_type_v.as_deref())
                        .unwrap_or("f16"),
                )?,
            })?,
        ),
    };
    eprintln!(
        "bench: {} | {} threads | depth {} | {}",
        file_name(&path),
        opts.n_threads,
        a.depth,
        describe_sharing(&plan, session.kv_bytes(), kv_accounting(session.as_ref()).1)
    );
    let pp_name = format!("pp{}{}", a.n_prompt, depth_suffix(a.depth));
    let tg_name = format!("tg{}{}", a.n_gen, depth_suffix(a.depth));
    let mut ours_pp = Series {
        runtime: "kvsharer".into(),
        test: pp_name.clone(),
        ..Default::default()
    };
    let mut ours_tg = Series {
        runtime: "kvsharer".into(),
        test: tg_name.clone(),
        ..Default::default()
    };
    let mut theirs_pp = Series {
        runtime: "llama.cpp".into(),
        test: pp_name,
        ..Default::default()
    };
    let mut theirs_tg = Series {
        runtime: "llama.cpp".into(),
        test: tg_name,
        ..Default::default()
    };

    // Warm-up (page in the weights, size the graph buffers), not timed.
    session.eval(&[0; 8], Logits::Last)?;
    session.reset();
    // Alternating runs so both runtimes see the same machine conditions.
    for _ in 0..a.repetitions {
        if a.n_prompt > 0 {
            session.reset();
            if a.depth > 0 {
                session.eval(&depth_tokens, Logits::None)?;
            }
            let t = Instant::now();
            session.eval(&prompt_tokens, Logits::Last)?;
            ours_pp
                .samples
                .push(a.n_prompt as f64 / t.elapsed().as_secs_f64());
            if let Some(ctx) = llama_ctx.as_mut() {
                ctx.clear();
                if a.depth > 0 {
                    ctx.eval_last_logits(&depth_tokens)?;
                }
                let t = Instant::now();
                ctx.eval_last_logits(&prompt_tokens)?;
                theirs_pp
                    .samples
                    .push(a.n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        if a.n_gen > 0 {
            session.reset();
            if a.depth > 0 {
                session.eval(&depth_tokens, Logits::None)?;
            }
            let t = Instant::now();
            for &tok in &gen_tokens {
                session.eval(&[tok], Logits::Last)?;
            }
            ours_tg
                .samples
                .push(a.n_gen as f64 / t.elapsed().as_secs_f64());
            if let Some(ctx) = llama_ctx.as_mut() {
                ctx.clear();
                if a.depth > 0 {
                    ctx.eval_last_logits(&depth_tokens)?;
                }
                let t = Instant::now();
                for &tok in &gen_tokens {
                    ctx.eval_last_logits(&[tok])?;
                }
                theirs_tg
                    .samples
                    .push(a.n_gen as f64 / t.elapsed().as_secs_f64());
            }
        }
    }
    let all: Vec<&Series> = [&ours_pp, &theirs_pp, &ours_tg, &theirs_tg]
        .into_iter()
        .filter(|s| !s.samples.is_empty())
        .collect();
    let kv_ours = session.kv_bytes();
    let kv_theirs = llama_ctx.as_ref().map(|c| c.kv_bytes());
    let rss = peak_rss_bytes();
    if a.json {
        let v = serde_json::json!({
            "model": path.display().to_string(),
            "threads": opts.n_threads,
            "depth": a.depth,
            "n_ctx": opts.n_ctx,
            "sharing": plan.as_map().map(|m| m.sources().to_vec()),
            "kv_plan": super::plan_json(&plan, loaded.model.config.n_embd_kv()),
            "kv_bytes": kv_ours,
            "llama_cpp_kv_bytes": kv_theirs,
            "peak_rss_bytes": rss,
            "results": all.iter().map(|s| serde_json::json!({
                "runtime": s.runtime, "test": s.test, "tokens_per_s_mean": s.mean(),
                "tokens_per_s_sd": s.sd(), "samples": s.samples,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("| runtime   | test         |             t/s |");
    println!("| --------- | ------------ | --------------: |");
    for s in &all {
        println!(
            "| {:<9} | {:<12} | {:>8.2} ± {:<5.2} |",
            s.runtime,
            s.test,
            s.mean(),
            s.sd()
        );
    }
    for (ours, theirs) in [(&ours_pp, &theirs_pp), (&ours_tg, &theirs_tg)] {
        if !ours.samples.is_empty() && !theirs.samples.is_empty() {
            println!(
                "ratio kvsharer/llama.cpp {}: {:.3}",
                ours.test,
                ours.mean() / theirs.mean()
            );
        }
    }
    println!(
        "KV cache: kvsharer {} ({} cells){}",
        human_bytes(kv_ours),
        opts.n_ctx,
        kv_theirs.map_or(String::new(), |b| format!(
            ", llama.cpp {}",
            human_bytes(b as usize)
        ))
    );
    if let Some(r) = rss {
        println!(
            "peak RSS (both runtimes in this process): {}",
            human_bytes(r)
        );
    }
    Ok(())
}

fn depth_suffix(d: usize) -> String {
    if d == 0 {
        String::new()
    } else {
        format!(" @ d{d}")
    }
}

/// Peak resident memory of this process (Linux), from /proc.
fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
