//! `kvsharer serve`: an OpenAI-compatible HTTP server over one loaded model. Every
//! slot is one sequence of a single run state (`RunOptions::n_seq`), so the weights
//! are read once per step for all conversations, and each slot's KV cache is as
//! small as the plan makes it: a smaller cache per slot is more slots in the same
//! memory.
//!
//! Threads: the engine (the run state, its slots and the token loop) runs on the
//! caller's thread; the HTTP server (axum on tokio) on a thread of its own. They
//! meet in a bounded job queue and one event channel per job.

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod stop;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::chat::ChatTemplate;
use crate::runtime::RunState;
use crate::sample::SamplingParams;
use crate::tokenizer::Tokenizer;
use engine::Engine;
use metrics::{Metrics, SlotFacts};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// The model's id in `/v1/models` (the file name without `.gguf`).
    pub model_id: String,
    /// Requests that may wait for a slot; beyond them, 503 with Retry-After.
    pub queue: usize,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Sampling settings of a request that names none.
    pub defaults: SamplingParams,
    /// Tokens per forward pass (decode tokens of every slot plus a prompt chunk).
    pub n_batch: usize,
}

/// How long in-flight requests get to end after SIGINT/SIGTERM before the server
/// stops regardless.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds `config.addr` and serves until SIGINT or SIGTERM; `ready` is called with
/// the bound address once requests are accepted. On a signal the server stops
/// accepting, in-flight requests end with an error event (or finish), and this
/// returns `Ok`.
pub fn serve<'m>(
    config: ServeConfig,
    state: Box<dyn RunState<'m> + 'm>,
    tokenizer: &'static Tokenizer,
    template: ChatTemplate,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let facts = SlotFacts {
        slots: state.n_seq(),
        n_ctx: state.n_ctx(),
        kv_bytes: state.kv_bytes(),
        kv_bytes_unshared: state.kv_bytes_unshared(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(config.addr))
        .map_err(|source| ServeError::Bind {
            addr: config.addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::Http)?;
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = std::sync::mpsc::sync_channel(config.queue);
    let app_state = Arc::new(http::AppState {
        jobs,
        metrics: metrics.clone(),
        facts,
        tokenizer,
        template,
        model_id: config.model_id.clone(),
        api_key: config.api_key.clone(),
        defaults: config.defaults.clone(),
        created: jiff::Timestamp::now().as_second(),
        next_id: AtomicU64::new(1),
    });
    let app = http::router(app_state, config.body_limit);
    let stopping = Arc::new(AtomicBool::new(false));
    let engine = Engine::new(state, tokenizer, config.n_batch, metrics);
    let served = std::thread::scope(|scope| {
        let http = scope.spawn(|| {
            let served = rt.block_on(async {
                let signal = {
                    let stopping = stopping.clone();
                    async move {
                        shutdown_signal().await;
                        stopping.store(true, Ordering::SeqCst);
                    }
                };
                let server = axum::serve(listener, app).with_graceful_shutdown(signal);
                let grace = async {
                    while !stopping.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                };
                tokio::select! {
                    r = server => r.map_err(ServeError::Http),
                    () = grace => Ok(()),
                }
            });
            // However the HTTP side ended, the engine stops too.
            stopping.store(true, Ordering::SeqCst);
            served
        });
        ready(bound);
        engine.run(queue, &stopping);
        // The engine returns on a signal, or when the HTTP side dropped the queue
        // (it failed): make sure the HTTP side stops as well.
        stopping.store(true, Ordering::SeqCst);
        http.join().unwrap_or(Ok(()))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
