//! `kvsharer info`: what a GGUF model is and what its KV cache costs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use kvsharer::gguf::{GgmlType, GgufFile};
use kvsharer::kvplan::{self, ShareMap};
use kvsharer::model::LlamaConfig;
use kvsharer::runtime;

use super::human_bytes;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// GGUF model file [default: the default model, fetched on first use]
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// GGUF model file (same as the positional argument)
    #[arg(
        short = 'm',
        long = "model",
        value_name = "PATH",
        conflicts_with = "model"
    )]
    pub model_flag: Option<PathBuf>,
    /// Context size used for the KV cache total
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let path = match a.model.or(a.model_flag) {
        Some(p) => p,
        None => kvsharer::fetch::default_model_path()?,
    };
    let file = GgufFile::open(&path)?;
    let cfg = LlamaConfig::from_gguf(&file)?;
    let name = file
        .get("general.name")
        .and_then(|v| v.as_str())
        .unwrap_or("(unnamed)");
    println!(
        "file:          {} ({})",
        path.display(),
        human_bytes(file.file_size() as usize)
    );
    println!("name:          {name}");
    println!(
        "gguf:          version {}, {} metadata keys, {} tensors",
        file.version(),
        file.metadata().len(),
        file.tensors().len()
    );
    println!("architecture:  {}", cfg.architecture);
    println!("layers:        {}", cfg.n_layers);
    println!("embedding:     {} (feed-forward {})", cfg.n_embd, cfg.n_ff);
    println!(
        "heads:         {} query, {} key/value (GQA {}:1), head dim {}",
        cfg.n_head,
        cfg.n_head_kv,
        cfg.n_head / cfg.n_head_kv,
        cfg.head_dim
    );
    println!("context:       {} (trained)", cfg.n_ctx_train);
    println!("vocabulary:    {}", cfg.n_vocab);
    println!(
        "rope:          base {}, scale {}",
        cfg.rope_freq_base, cfg.rope_freq_scale
    );

    let mut hist: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut params = 0u64;
    for t in file.tensors() {
        let e = hist.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
        params += t.n_elements();
    }
    println!("parameters:    {:.1} M", params as f64 / 1e6);
    let types: Vec<String> = hist
        .iter()
        .map(|(n, (c, b))| format!("{n}: {c} tensors ({})", human_bytes(*b as usize)))
        .collect();
    println!("quant types:   {}", types.join(", "));

    let stored = kvplan::from_gguf(&file, cfg.n_layers)?;
    let map = stored
        .clone()
        .unwrap_or_else(|| ShareMap::identity(cfg.n_layers));
    let unshared = runtime::kv_bytes_per_token(
        &cfg,
        &ShareMap::identity(cfg.n_layers),
        GgmlType::F16,
        GgmlType::F16,
    );
    println!(
        "KV cache:      {} bytes/token unshared (f16); {} at ctx {}",
        unshared,
        human_bytes(unshared * a.ctx_size),
        a.ctx_size
    );
    match stored {
        None => println!("sharing map:   none (create one with `kvsharer share`)"),
        Some(m) => {
            let shared = runtime::kv_bytes_per_token(&cfg, &map, GgmlType::F16, GgmlType::F16);
            println!(
                "sharing map:   {} of {} layers shared: {}",
                m.shared_count(),
                m.n_layers(),
                m
            );
            println!(
                "KV with map:   {} bytes/token; {} at ctx {} ({:.1}% of unshared)",
                shared,
                human_bytes(shared * a.ctx_size),
                a.ctx_size,
                100.0 * shared as f64 / unshared as f64
            );
            // Values as a person writes them: 0.5, 30, abc (not F32(0.5)).
            let get = |k: &str| match file.get(k) {
                None => "-".to_string(),
                Some(v) => {
                    if let Some(s) = v.as_str() {
                        s.to_string()
                    } else if v.is_integer() {
                        v.as_i64().map_or(format!("{v:?}"), |i| i.to_string())
                    } else {
                        v.as_f32().map_or(format!("{v:?}"), |f| format!("{f:.4}"))
                    }
                }
            };
            println!(
                "calibration:   strategy {}, threshold {}, mean cosine {}, mean KLD {}, {} samples x {} tokens, corpus sha256 {}",
                get(kvplan::KEY_STRATEGY),
                get(kvplan::KEY_THRESHOLD),
                get(kvplan::KEY_MEAN_COSINE),
                get(kvplan::KEY_MEAN_KLD),
                get(kvplan::KEY_SAMPLE_COUNT),
                get(kvplan::KEY_TOKENS_PER_SAMPLE),
                get(kvplan::KEY_CORPUS_SHA256)
            );
        }
    }
    Ok(())
}
