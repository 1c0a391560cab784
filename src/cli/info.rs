//! `kvsharer info`: what a GGUF model is and what its KV cache costs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use kvsharer::gguf::{GgmlType, GgufFile};
use kvsharer::kvplan::{self, Half, KvPlan};
use kvsharer::model::LlamaConfig;
use kvsharer::search::adapter::AdapterPair;

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
    // The weights' plan, for what the variant adds; `info` still describes a file
    // whose weights do not check out.
    let weights = kvsharer::model::WeightPlan::from_gguf(&file, &cfg).ok();
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
    println!(
        "architecture:  {}",
        describe_variant(&cfg, weights.as_ref())
    );
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
        "rope:          {}, base {}, scale {}{}",
        if cfg.arch.rope_neox() { "neox" } else { "norm" },
        cfg.rope_freq_base,
        cfg.rope_freq_scale,
        if weights.as_ref().is_some_and(|w| w.rope_freqs().is_some()) {
            ", per-dimension factors (rope_freqs)"
        } else {
            ""
        }
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

    let stored_map = kvplan::from_gguf(&file, cfg.n_layers)?;
    let stored_plan = kvplan::plan_from_gguf(&file, cfg.n_layers)?;
    let n_embd_kv = cfg.n_embd_kv();
    let f16 = GgmlType::F16;
    let unshared = KvPlan::unshared(cfg.n_layers, f16, f16).bytes_per_token(n_embd_kv);
    println!(
        "KV cache:      {} bytes/token unshared (f16); {} at ctx {}",
        unshared,
        human_bytes(unshared * a.ctx_size),
        a.ctx_size
    );
    let stored = match (stored_plan, stored_map) {
        (Some(p), _) => Some(p),
        (None, Some(m)) => Some(KvPlan::uniform(&m, f16, f16)),
        (None, None) => None,
    };
    match stored {
        None => println!("sharing map:   none (create one with `kvsharer share`)"),
        Some(p) => {
            let shared = p.bytes_per_token(n_embd_kv);
            match (p.as_map(), p.uniform_types()) {
                (Some(m), Some((f16k, f16v))) if f16k == f16 && f16v == f16 => println!(
                    "sharing map:   {} of {} layers shared: {}",
                    m.shared_count(),
                    m.n_layers(),
                    m
                ),
                _ => {
                    println!(
                        "KV plan:       {} of {} K/V slots shared: {p}",
                        p.shared_halves(),
                        2 * p.n_layers()
                    );
                    let mut adapted = Vec::new();
                    for half in Half::BOTH {
                        for layer in 0..p.n_layers() {
                            let source = p.source(half, layer);
                            let fitted = weights.as_ref().and_then(|w| w.adapted_for(half)[layer]);
                            if source != layer && fitted == Some(source) {
                                adapted.push(AdapterPair {
                                    half,
                                    layer,
                                    source,
                                });
                            }
                        }
                    }
                    print!("{}", super::plan::plan_table(&p, &adapted));
                    if !adapted.is_empty() {
                        println!(
                            "adapters:      {} shared halves read through a fitted adapter (+a; folded into attn_q / attn_output, originals kept)",
                            adapted.len()
                        );
                    }
                    let get_f32 = |k: &str| file.get(k).and_then(|v| v.as_f32());
                    if let (Some(b), Some(kld)) = (
                        get_f32(kvplan::KEY_PLAN_BUDGET),
                        get_f32(kvplan::KEY_PLAN_PREDICTED_KLD),
                    ) {
                        println!(
                            "plan budget:   {:.1}% of f16, predicted calibration KLD {kld:.4}",
                            b * 100.0
                        );
                    }
                }
            }
            println!(
                "KV with map:   {} bytes/token; {} at ctx {} ({:.1}% of unshared f16)",
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

/// The variant and what is unusual about it: biases, per-head norms, tied output.
fn describe_variant(cfg: &LlamaConfig, weights: Option<&kvsharer::model::WeightPlan>) -> String {
    use kvsharer::model::LayerRole;
    let layers = weights.map_or(&[][..], |w| w.layers());
    let has = |r: LayerRole| layers.iter().any(|l| l.get(r).is_some());
    let mut notes = Vec::new();
    if has(LayerRole::AttnQBias) || has(LayerRole::AttnKBias) || has(LayerRole::AttnVBias) {
        notes.push("Q/K/V biases");
    }
    if has(LayerRole::AttnQNorm) {
        notes.push("per-head Q/K RMS norm");
    }
    if weights.is_some_and(|w| w.tied_output()) {
        notes.push("tied output embeddings");
    }
    if notes.is_empty() {
        cfg.architecture.clone()
    } else {
        format!("{} ({})", cfg.architecture, notes.join(", "))
    }
}
