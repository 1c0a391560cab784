//! Load a GGUF model, open a run state with the sharing map stored in the file (or
//! none), and generate greedily.
//!
//!     cargo run --release --example generate -- [MODEL.gguf] [PROMPT]
//!
//! Without a model path, the default model is fetched on first use.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use kvsharer::generate::{generate, GenerateOptions};
use kvsharer::kvplan::ShareMap;
use kvsharer::runtime::{self, BackendChoice, RunOptions};
use kvsharer::sample::{Sampler, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => kvsharer::fetch::default_model_path()?,
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());

    let loaded = kvsharer::loader::load(&path)?;
    let n_layers = loaded.model.config.n_layers;
    // The map stored in the file (written by `kvsharer share`), else every layer
    // keeps its own cache.
    let map = loaded
        .model
        .stored_map
        .clone()
        .unwrap_or_else(|| ShareMap::identity(n_layers));
    let opts = RunOptions {
        n_ctx: 512,
        ..RunOptions::default()
    };
    let mut state = runtime::open(BackendChoice::Cpu, &loaded.model, &map, &opts)?.state;
    eprintln!(
        "{} | map {map} | KV cache {} bytes",
        state.describe(),
        state.kv_bytes()
    );

    let tokens = loaded.tokenizer.encode(&prompt, true, false)?;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    });
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    let stats = generate(
        state.as_mut(),
        &loaded.tokenizer,
        &mut sampler,
        &tokens,
        &mut Vec::new(),
        &GenerateOptions {
            n_predict: Some(32),
            ignore_eos: false,
        },
        |text| {
            let _ = write!(out, "{text}").and_then(|_| out.flush());
            ControlFlow::Continue(())
        },
    )?;
    writeln!(out)?;
    eprintln!(
        "{} tokens at {:.1} tokens/s",
        stats.generated_tokens,
        stats.generation_tps()
    );
    Ok(())
}
