//! Perplexity of a model on a text, and the KL divergence of a sharing map against
//! the unshared model, the way `llama-perplexity` measures them.
//!
//!     cargo run --release --example perplexity -- [MODEL.gguf] [TEXT] [LAYERS]
//!
//! The map lets the last LAYERS layers read the cache of the layer before them (a
//! fixed map, not a calibrated one: see the `share` example for that).

use std::path::PathBuf;

use kvsharer::eval::{self, PerplexityOptions};
use kvsharer::kvplan::ShareMap;
use kvsharer::runtime::{self, BackendChoice, RunOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => kvsharer::fetch::default_model_path()?,
    };
    let text = std::fs::read_to_string(args.next().unwrap_or_else(|| "data/heldout.txt".into()))?;
    let layers: usize = args.next().map_or(Ok(2), |s| s.parse())?;

    let loaded = kvsharer::loader::load(&path)?;
    let n_layers = loaded.model.config.n_layers;
    let tokens = eval::tokenize_text(&loaded.tokenizer, &text)?;
    let opts = PerplexityOptions {
        n_ctx: 128,
        max_chunks: Some(2),
    };
    let run = RunOptions {
        n_ctx: opts.n_ctx,
        ..RunOptions::default()
    };
    let layers = layers.min(n_layers - 1);
    let owner = n_layers - layers - 1;
    let mut map = ShareMap::identity(n_layers);
    for l in owner + 1..n_layers {
        map = map.with_shared(l, owner)?;
    }

    let identity = ShareMap::identity(n_layers);
    let mut base = runtime::open(BackendChoice::Cpu, &loaded.model, &identity, &run)?.state;
    let report = eval::perplexity(base.as_mut(), &loaded.tokenizer, &tokens, &opts, |_| {})?;
    println!("perplexity (unshared): {:.4}", report.ppl.value);

    let mut shared = base.sibling(&map, &run)?;
    let cmp = eval::compare(
        base.as_mut(),
        shared.as_mut(),
        &loaded.tokenizer,
        &tokens,
        &opts,
        |_| {},
    )?;
    println!(
        "map {map}: perplexity {:.4}, mean KLD {:.4}, same top token {:.1}%, KV {} of {} bytes",
        cmp.ppl_test.value,
        cmp.kld.value,
        100.0 * cmp.same_top.value,
        shared.kv_bytes(),
        base.kv_bytes()
    );
    Ok(())
}
