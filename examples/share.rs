//! Find a KV sharing map with the greedy KL-divergence search on the project's
//! calibration corpus and write a copy of the model that carries it.
//!
//!     cargo run --release --example share -- [MODEL.gguf] [OUT.gguf] [LAYERS]
//!
//! Then `kvsharer run -m OUT.gguf --kv-share` (or the `generate` example) uses it.

use std::path::PathBuf;

use kvsharer::search::{self, report, CalibrationOptions, Corpus, StrategyOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => kvsharer::fetch::default_model_path()?,
    };
    let out = PathBuf::from(args.next().unwrap_or_else(|| "shared.gguf".into()));
    let layers: usize = args.next().map_or(Ok(2), |s| s.parse())?;

    let loaded = kvsharer::loader::load(&path)?;
    // A short calibration: 4 texts of at most 32 tokens, 4 candidate pairs per step
    // (the CLI's defaults are 30 x 64 and 12).
    let opts = CalibrationOptions {
        target: layers,
        samples: 4,
        tokens: 32,
        ..CalibrationOptions::default()
    };
    let strategy = StrategyOptions {
        candidates: Some(4),
        ..StrategyOptions::default()
    };
    let result = search::run(
        &loaded.model,
        &loaded.tokenizer,
        &Corpus::default_corpus(),
        &opts,
        &strategy,
        |p| eprint!("\rshared {} of {} ", p.accepted, p.target),
    )?;
    eprintln!("\n{}", result.outcome);
    eprintln!("map {} | {}", result.map, report::objectives_line(&result));

    let file = loaded.model.file();
    kvsharer::gguf::write_with_metadata(file, &report::metadata(&result), &["kvsharer."], &out)?;
    let back = kvsharer::loader::load(&out)?;
    assert_eq!(back.model.stored_map.as_ref(), Some(&result.map));
    eprintln!("wrote {} with the map stored in it", out.display());
    Ok(())
}
