//! The one evaluator every search strategy runs on: the calibration set under a
//! sharing map, on any backend's `RunState`.
//!
//! Where the backend can pack texts (`Capabilities::packed`: every backend today,
//! ggml's and wgpu) all texts run as one batch, and with the cached prefix on, a
//! candidate that changes layer `i` re-runs only from the first layer it affects
//! (`search::start_layer`), from the residual stream the current map left there.
//! Elsewhere texts would run one at a time from the token embeddings. The run state
//! is opened once, with the identity map, and laid out anew for every map
//! (`RunState::set_map`).

use std::sync::Arc;

use crate::kvplan::{Half, KvPlan, ShareMap};
use crate::model::Model;
use crate::runtime::{
    self, BackendChoice, ForwardOutput, ForwardRequest, Logits, PackedBatch, RunOptions, RunState,
    RuntimeError,
};
use crate::search::calibration::{mean_text_cosine, CalibrateError, CalibrationSet, Capture};

pub struct Evaluator<'m> {
    state: Box<dyn RunState<'m> + 'm>,
    set: CalibrationSet,
    /// Whether `full` and `candidate` return every position's logits.
    logits: bool,
    /// Keep every layer's input of full runs, so candidates can start mid-network.
    prefix: bool,
}

impl<'m> Evaluator<'m> {
    /// Runs over `set` on `state`; `logits`: whether `full` and `candidate` return
    /// logits (the `kld` objective). The cached prefix is on where the backend packs.
    pub fn new(
        mut state: Box<dyn RunState<'m> + 'm>,
        set: &CalibrationSet,
        logits: bool,
    ) -> Result<Self, CalibrateError> {
        if set.seq_len == 0 || set.n_samples == 0 || set.tokens.len() != set.seq_len * set.n_samples
        {
            return Err(CalibrateError::Corpus(format!(
                "calibration set of {} tokens is not {} texts of {} tokens",
                set.tokens.len(),
                set.n_samples,
                set.seq_len
            )));
        }
        let identity = ShareMap::identity(state.model().config.n_layers);
        state.set_map(&identity)?;
        let prefix = state.capabilities().packed;
        Ok(Evaluator {
            state,
            set: set.clone(),
            logits,
            prefix,
        })
    }

    /// The run options a calibration run state needs for `set`.
    pub fn run_options(set: &CalibrationSet, threads: usize) -> RunOptions {
        RunOptions {
            n_ctx: set.tokens.len(),
            n_batch: set.tokens.len().max(2048),
            n_threads: threads,
            exact_attention: true,
            ..RunOptions::default()
        }
    }

    /// An evaluator on `choice` (`auto`'s fallback reason returned beside it).
    pub fn open(
        choice: BackendChoice,
        model: &'m Model,
        set: &CalibrationSet,
        threads: usize,
        logits: bool,
    ) -> Result<(Self, Option<String>), CalibrateError> {
        let identity = ShareMap::identity(model.config.n_layers);
        let opened = runtime::open(choice, model, &identity, &Self::run_options(set, threads))?;
        Ok((Self::new(opened.state, set, logits)?, opened.fallback))
    }

    /// An evaluator on ggml's CPU backend.
    pub fn cpu(
        model: &'m Model,
        set: &CalibrationSet,
        threads: usize,
        logits: bool,
    ) -> Result<Self, CalibrateError> {
        Ok(Self::open(BackendChoice::Cpu, model, set, threads, logits)?.0)
    }

    /// Turns the cached prefix off: every candidate runs in full (the paper's
    /// search, which never runs candidates from a prefix, needs no layer inputs).
    pub fn without_prefix(mut self) -> Self {
        self.prefix = false;
        self
    }

    pub fn model(&self) -> &'m Model {
        self.state.model()
    }

    /// The backend in words.
    pub fn describe(&self) -> String {
        self.state.describe()
    }

    fn request(&self, logits: bool) -> ForwardRequest {
        ForwardRequest {
            logits: if logits { Logits::All } else { Logits::None },
            hidden: true,
            layer_inputs: self.prefix,
        }
    }

    /// Runs `map` over the whole set from the token embeddings; `each_text` sees
    /// the run state after each text when texts run one at a time.
    fn run(
        &mut self,
        map: &ShareMap,
        logits: bool,
        mut each_text: impl FnMut(&dyn RunState<'m>, usize) -> Result<(), RuntimeError>,
    ) -> Result<MapRun, CalibrateError> {
        self.state.set_map(map)?;
        let req = self.request(logits);
        let out = if self.state.capabilities().packed {
            self.state.forward_packed(
                PackedBatch {
                    tokens: &self.set.tokens,
                    seq_len: self.set.seq_len,
                    start: None,
                    refill: &[],
                },
                req,
            )?
        } else {
            let mut all = ForwardOutput::default();
            for (t, text) in self.set.tokens.chunks(self.set.seq_len).enumerate() {
                self.state.reset();
                all.append(self.state.forward(text, req)?);
                each_text(self.state.as_ref(), t)?;
            }
            all
        };
        Ok(map_run(map.clone(), out, Vec::new(), 0))
    }

    /// Runs `map` from the token embeddings.
    pub fn full(&mut self, map: &ShareMap) -> Result<MapRun, CalibrateError> {
        self.run(map, self.logits, |_, _| Ok(()))
    }

    /// Runs `current.map` with `layer` reading `source`'s cache, from `start_layer`
    /// on when the prefix is cached (the layer inputs below it are `current`'s).
    pub fn candidate(
        &mut self,
        current: &MapRun,
        layer: usize,
        source: usize,
    ) -> Result<MapRun, CalibrateError> {
        self.run_candidate(current, layer, source, self.logits)
    }

    /// Runs the unshared model and captures every layer's K/V averaged over texts
    /// (steps 1 and 2 of the search).
    pub fn capture(&mut self, logits: bool) -> Result<(MapRun, Capture), CalibrateError> {
        let c = &self.model().config;
        let (n_layers, seq_len) = (c.n_layers, self.set.seq_len);
        let width = seq_len * c.n_embd_kv();
        let mut keys = vec![vec![0f32; width]; n_layers];
        let mut values = vec![vec![0f32; width]; n_layers];
        let add = |sum: &mut [f32], part: &[f32]| {
            for (s, x) in sum.iter_mut().zip(part) {
                *s += x;
            }
        };
        let identity = ShareMap::identity(n_layers);
        let run = self.run(&identity, logits, |state, _| {
            for layer in 0..n_layers {
                let (k, v) = state.read_kv(layer, 0..seq_len)?;
                add(&mut keys[layer], &k);
                add(&mut values[layer], &v);
            }
            Ok(())
        })?;
        if self.state.capabilities().packed {
            // Every text's cells are in the cache, one after another.
            for layer in 0..n_layers {
                let (k, v) = self.state.read_kv(layer, 0..self.set.tokens.len())?;
                for (kt, vt) in k.chunks(width).zip(v.chunks(width)) {
                    add(&mut keys[layer], kt);
                    add(&mut values[layer], vt);
                }
            }
        }
        let n = self.set.n_samples as f32;
        for m in keys.iter_mut().chain(values.iter_mut()) {
            m.iter_mut().for_each(|x| *x /= n);
        }
        let cap = Capture {
            keys,
            values,
            base_hidden: Arc::clone(&run.hidden),
        };
        Ok((run, cap))
    }

    /// Runs `map` over the whole set from the token embeddings.
    pub fn run_map(&mut self, map: &ShareMap, logits: bool) -> Result<MapRun, CalibrateError> {
        self.run(map, logits, |_, _| Ok(()))
    }

    /// `candidate` with the logits choice made by the caller.
    pub fn run_candidate(
        &mut self,
        current: &MapRun,
        layer: usize,
        source: usize,
        logits: bool,
    ) -> Result<MapRun, CalibrateError> {
        let map = current.map.with_shared(layer, source)?;
        let start = start_layer(&map, layer);
        if !self.prefix || start == 0 || current.layer_inputs.len() <= start {
            return self.run_map(&map, logits);
        }
        self.state.set_map(&map)?;
        let req = self.request(logits);
        let out = self.state.forward_packed(
            PackedBatch {
                tokens: &self.set.tokens,
                seq_len: self.set.seq_len,
                start: Some((start, current.layer_inputs[start].as_slice())),
                refill: &[],
            },
            req,
        )?;
        let below = current.layer_inputs[..start].to_vec();
        Ok(map_run(map, out, below, start))
    }

    /// Every position's logits under `plan`, which agrees with `base`'s plan below
    /// layer `changed`. Where the prefix is cached the run starts at `changed` with
    /// `base`'s layer input there, and the slots of earlier layers it reads are
    /// refilled from `base`'s inputs to those layers; elsewhere it runs in full.
    pub fn plan_logits(
        &mut self,
        plan: &KvPlan,
        base: &MapRun,
        changed: usize,
    ) -> Result<Vec<f32>, CalibrateError> {
        self.state.set_plan(plan)?;
        let req = ForwardRequest {
            logits: Logits::All,
            hidden: false,
            layer_inputs: false,
        };
        let n = plan.n_layers();
        let mut below: Vec<usize> = (changed..n)
            .flat_map(|l| Half::BOTH.map(|h| plan.source(h, l)))
            .filter(|&j| j < changed)
            .collect();
        below.sort_unstable();
        below.dedup();
        let usable = self.prefix
            && changed > 0
            && changed < base.layer_inputs.len()
            && below.iter().all(|&j| j < 128);
        let refill: Vec<(usize, &[f32])> = below
            .iter()
            .map(|&j| (j, base.layer_inputs[j].as_slice()))
            .collect();
        let (start, refill) = if usable {
            (
                Some((changed, base.layer_inputs[changed].as_slice())),
                refill.as_slice(),
            )
        } else {
            (None, &[][..])
        };
        let out = if self.state.capabilities().packed {
            self.state.forward_packed(
                PackedBatch {
                    tokens: &self.set.tokens,
                    seq_len: self.set.seq_len,
                    start,
                    refill,
                },
                req,
            )?
        } else {
            let mut all = ForwardOutput::default();
            for text in self.set.tokens.chunks(self.set.seq_len) {
                self.state.reset();
                all.append(self.state.forward(text, req)?);
            }
            all
        };
        Ok(out.logits)
    }

    /// Mean over texts of the cosine of each text's flattened final hidden states.
    pub fn mean_cosine(&self, base_hidden: &[f32], hidden: &[f32]) -> f32 {
        mean_text_cosine(
            base_hidden,
            hidden,
            self.set.seq_len * self.model().config.n_embd,
        )
    }
}

/// A `MapRun` from a pass that started at `start`, below which `below` holds the
/// layer inputs it reused.
fn map_run(
    map: ShareMap,
    out: ForwardOutput,
    mut below: Vec<Arc<Vec<f32>>>,
    start: usize,
) -> MapRun {
    below.extend(out.layer_inputs.into_iter().map(|(_, x)| Arc::new(x)));
    MapRun {
        map,
        layer_inputs: below,
        hidden: Arc::new(out.hidden.unwrap_or_default()),
        logits: out.logits,
        start,
    }
}

/// The first layer a candidate must run from so that every slot it reads is filled
/// by this very run: `map` shares `changed` (and agrees with the map whose inputs
/// are cached below `changed`). Starting at `s`, owners `>= s` write their slots
/// before anyone reads them, so `s` must not exceed the source of any shared layer
/// at or after `s`; the largest such `s <= changed` is taken.
pub fn start_layer(map: &ShareMap, changed: usize) -> usize {
    let mut s = changed.min(map.n_layers().saturating_sub(1));
    loop {
        let lowest = (s..map.n_layers())
            .map(|k| map.source(k))
            .min()
            .unwrap_or(s);
        if lowest >= s {
            return s;
        }
        s = lowest;
    }
}

/// One map's pass over the calibration set: the residual stream entering every
/// layer (shared between maps that agree up to that layer), final hidden states and,
/// when asked for, logits.
#[derive(Clone)]
pub struct MapRun {
    pub map: ShareMap,
    pub layer_inputs: Vec<Arc<Vec<f32>>>,
    /// Shared with the `Capture` of the unshared run (see `capture`).
    pub hidden: Arc<Vec<f32>>,
    pub logits: Vec<f32>,
    /// Layer the run started at (0 for a full run).
    pub start: usize,
}
