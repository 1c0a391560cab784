//! The sharing search on the GPU: `GpuEvaluator` runs the calibration set under a
//! map for `share::search::MapEvaluator`, so every strategy runs unchanged on wgpu.
//!
//! Simpler than the CPU's evaluators, on purpose: the WGSL attention has no packed
//! multi-text layout, so the texts run one at a time (each from an empty context),
//! and every candidate runs from the token embeddings (no cached prefix). One
//! session, built with the identity map so that it holds every layer's K/V weights
//! and slot, serves every map through `GpuSession::set_map`: weights are uploaded
//! and pipelines compiled once per search.

use super::{AdapterPolicy, GpuError, GpuOptions, GpuSession};
use crate::backend::graph::Logits;
use crate::model::Model;
use crate::share::calibrate::{CalibrateError, CalibrationSet, Capture};
use crate::share::search::{MapEvaluator, MapRun};
use crate::share::ShareMap;

pub struct GpuEvaluator<'m> {
    session: GpuSession<'m>,
    set: CalibrationSet,
}

impl<'m> GpuEvaluator<'m> {
    /// Opens an adapter under `policy` and uploads `model` for runs over `set`.
    pub fn new(
        model: &'m Model,
        set: &CalibrationSet,
        policy: AdapterPolicy,
    ) -> Result<Self, GpuError> {
        if set.seq_len == 0 || set.n_samples == 0 || set.tokens.len() != set.seq_len * set.n_samples
        {
            return Err(GpuError::BadInput(format!(
                "calibration set of {} tokens is not {} texts of {} tokens",
                set.tokens.len(),
                set.n_samples,
                set.seq_len
            )));
        }
        let opts = GpuOptions {
            n_ctx: set.seq_len,
            n_batch: set.seq_len,
            policy,
            ..GpuOptions::default()
        };
        let session = GpuSession::new(model, &ShareMap::identity(model.config.n_layers), &opts)?;
        Ok(GpuEvaluator {
            session,
            set: set.clone(),
        })
    }

    pub fn adapter_description(&self) -> String {
        self.session.adapter_description()
    }

    /// Runs every text under `map`; `each` sees the session after each text (its
    /// cache then holds that text's K/V).
    fn run_texts(
        &mut self,
        map: &ShareMap,
        logits: bool,
        mut each: impl FnMut(&GpuSession<'m>) -> Result<(), GpuError>,
    ) -> Result<MapRun, GpuError> {
        if self.session.map() != map {
            self.session.set_map(map)?;
        }
        let want = if logits { Logits::All } else { Logits::None };
        let c = &self.session.model().config;
        let mut all_logits = Vec::with_capacity(if logits {
            self.set.tokens.len() * c.n_vocab
        } else {
            0
        });
        let mut hidden = Vec::with_capacity(self.set.tokens.len() * c.n_embd);
        for text in self.set.tokens.chunks(self.set.seq_len) {
            self.session.reset();
            let (l, h) = self.session.eval_with_hidden(text, want)?;
            all_logits.extend(l);
            hidden.extend(h);
            each(&self.session)?;
        }
        Ok(MapRun {
            map: map.clone(),
            layer_inputs: Vec::new(),
            hidden,
            logits: all_logits,
            start: 0,
        })
    }
}

impl MapEvaluator for GpuEvaluator<'_> {
    fn model(&self) -> &Model {
        self.session.model()
    }

    fn capture(&mut self, logits: bool) -> Result<(MapRun, Capture), CalibrateError> {
        let c = &self.session.model().config;
        let (n_layers, width) = (c.n_layers, self.set.seq_len * c.n_embd_kv());
        let rows = self.set.seq_len;
        let mut keys = vec![vec![0f32; width]; n_layers];
        let mut values = vec![vec![0f32; width]; n_layers];
        let identity = ShareMap::identity(n_layers);
        let run = self.run_texts(&identity, logits, |session| {
            for layer in 0..n_layers {
                let (k, v) = session.read_kv(layer, rows)?;
                for (sum, part) in [(&mut keys[layer], k), (&mut values[layer], v)] {
                    for (s, x) in sum.iter_mut().zip(part) {
                        *s += x;
                    }
                }
            }
            Ok(())
        })?;
        let n = self.set.n_samples as f32;
        for m in keys.iter_mut().chain(values.iter_mut()) {
            m.iter_mut().for_each(|x| *x /= n);
        }
        let cap = Capture {
            keys,
            values,
            base_hidden: run.hidden.clone(),
        };
        Ok((run, cap))
    }

    fn run_map(&mut self, map: &ShareMap, logits: bool) -> Result<MapRun, CalibrateError> {
        Ok(self.run_texts(map, logits, |_| Ok(()))?)
    }
}
