//! `KernelHarness`: single kernels run on host data, for the parity tests (feature
//! `test-support`).

use super::*;
use crate::backend::wgpu::device::AdapterPolicy;
use crate::backend::wgpu::GPU_WEIGHT_TYPES;

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Which attention kernel `KernelHarness::attention` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// Tiled online softmax in f32 (prefill).
    Tiled,
    /// Split-K flash-decoding and its combine (one token).
    SplitK,
    /// ggml's CPU small-batch path: f16 query, one key at a time, f16 accumulator.
    F16Serial,
}

/// Runs single kernels on host data: the oracle side of each is computed by the
/// caller (ggml's dequantizer, plain f32 loops).
pub struct KernelHarness {
    ctx: GpuContext,
    kernels: Kernels,
}

impl KernelHarness {
    /// Opens any adapter (software ones included) and compiles every kernel.
    pub fn new() -> Result<Self, GpuError> {
        let ctx = GpuContext::new(AdapterPolicy::Any)?;
        let kernels = Kernels::new(&ctx, GPU_WEIGHT_TYPES)?;
        Ok(KernelHarness { ctx, kernels })
    }

    pub fn adapter_description(&self) -> String {
        self.ctx.adapter_description()
    }

    fn step(&self, n_tokens: u32, pos0: u32) -> wgpu::Buffer {
        uniform(&self.ctx, [n_tokens, pos0, 0, 0, 0, 0, 0, 0])
    }

    /// One dispatch of `kernel`, then `out` (of `n` floats) read back.
    fn run(
        &self,
        kernel: &Kernel,
        entries: &[(u32, &wgpu::Buffer)],
        grid: (u32, u32, u32),
        out: &wgpu::Buffer,
        n: usize,
    ) -> Result<Vec<f32>, GpuError> {
        self.run_many(&[(kernel, grid)], entries, out, n)
    }

    fn run_many(
        &self,
        steps: &[(&Kernel, (u32, u32, u32))],
        entries: &[(u32, &wgpu::Buffer)],
        out: &wgpu::Buffer,
        n: usize,
    ) -> Result<Vec<f32>, GpuError> {
        self.ctx.scoped("a kernel test", || {
            let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for (kernel, (x, y, z)) in steps {
                    let group = bind(&self.ctx, kernel, entries);
                    pass.set_pipeline(&kernel.pipeline);
                    pass.set_bind_group(0, &group, &[]);
                    pass.dispatch_workgroups(*x, *y, *z);
                }
            }
            let bytes = (n * 4) as u64;
            let st = staging(&self.ctx, bytes);
            Ok(floats(&read_back(&self.ctx, encoder, out, bytes, &st)?))
        })
    }

    fn weight_check(ty: GgmlType, weight: &[u8], n_rows: usize, k: usize) -> Result<u32, GpuError> {
        if shader_suffix(ty).is_none() {
            return Err(GpuError::UnsupportedType {
                tensor: "(test weight)".into(),
                ty: ty.name(),
            });
        }
        let row_bytes = ty.row_bytes(k as u64).unwrap_or(0) as usize;
        if !k.is_multiple_of(32) || weight.len() != row_bytes * n_rows {
            return Err(GpuError::BadInput(format!(
                "{} bytes are not {n_rows} rows of {k} {} elements (k must be a multiple of 32)",
                weight.len(),
                ty.name()
            )));
        }
        Ok(row_bytes as u32)
    }

    /// `y[t][r] = Σ_k W[r][k] x[t][k]` for a weight of `ty` (`n_rows` rows of `k`),
    /// through `matvec` (one dispatch per token) or `matmul_tiled`. With
    /// `ggml_rounding`, x is first rounded as ggml's CPU backend converts it (see
    /// `round_activations`), Q8_1 block sums included.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        ty: GgmlType,
        weight: &[u8],
        n_rows: usize,
        k: usize,
        x: &[f32],
        tiled: bool,
        ggml_rounding: bool,
    ) -> Result<Vec<f32>, GpuError> {
        let row_bytes = Self::weight_check(ty, weight, n_rows, k)?;
        if x.is_empty() || !x.len().is_multiple_of(k) {
            return Err(GpuError::BadInput(format!(
                "{} activations are not whole rows of {k}",
                x.len()
            )));
        }
        let m = x.len() / k;
        let kern = self.kernels.matmul_for(ty);
        let w = storage_with(&self.ctx, "w", weight);
        let xb = storage_with(&self.ctx, "x", f32_bytes(x));
        let corr = storage(&self.ctx, "corr", (m * k / 32 * 4) as u64);
        let mode = if ggml_rounding {
            activation_mode(ty)
        } else {
            0
        };
        let xq = if mode == 0 {
            xb
        } else {
            let xq = storage(&self.ctx, "xq", (x.len() * 4) as u64);
            let p = uniform(&self.ctx, [k as u32, mode, 0, 0, 0, 0, 0, 0]);
            self.run(
                &self.kernels.act_round,
                &[(0, &xb), (2, &xq), (3, &p), (5, &corr)],
                ((k as u32).div_ceil(256), m as u32, 1),
                &xq,
                1,
            )?;
            xq
        };
        let use_corr = (mode == 4) as u32;
        let y = storage(&self.ctx, "y", (m * n_rows * 4) as u64);
        if tiled {
            let p = uniform(
                &self.ctx,
                [k as u32, n_rows as u32, row_bytes, 0, 0, use_corr, 0, 0],
            );
            let step = self.step(m as u32, 0);
            let (gx, gy) = tiled_grid(n_rows as u32, m as u32);
            return self.run(
                &kern.tiled,
                &[(0, &w), (1, &xq), (2, &y), (3, &p), (4, &step), (6, &corr)],
                (gx, gy, 1),
                &y,
                m * n_rows,
            );
        }
        // matvec reads the pass's last token and writes row 0 (last_only), so each
        // token is its own pass over a growing prefix of x.
        let mut out = Vec::with_capacity(m * n_rows);
        let p = uniform(
            &self.ctx,
            [k as u32, n_rows as u32, row_bytes, 0, 1, use_corr, 0, 0],
        );
        let (gx, gy) = matvec_grid(n_rows as u32);
        for t in 0..m {
            let step = self.step(t as u32 + 1, 0);
            out.extend(self.run(
                &kern.matvec,
                &[(0, &w), (1, &xq), (2, &y), (3, &p), (4, &step), (6, &corr)],
                (gx, gy, 1),
                &y,
                n_rows,
            )?);
        }
        Ok(out)
    }

    /// Rows `ids` of a table of `ty` (`n_rows` rows of `k`), as f32.
    pub fn get_rows(
        &self,
        ty: GgmlType,
        table: &[u8],
        n_rows: usize,
        k: usize,
        ids: &[u32],
    ) -> Result<Vec<f32>, GpuError> {
        let row_bytes = Self::weight_check(ty, table, n_rows, k)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n_rows) {
            return Err(GpuError::BadInput(format!(
                "row id {bad} is outside the table's {n_rows} rows"
            )));
        }
        let w = storage_with(&self.ctx, "table", table);
        let tok = storage_with(&self.ctx, "ids", bytemuck::cast_slice(ids));
        let y = storage(&self.ctx, "y", (ids.len() * k * 4) as u64);
        let p = uniform(
            &self.ctx,
            [k as u32, n_rows as u32, row_bytes, 0, 0, 0, 0, 0],
        );
        let step = self.step(ids.len() as u32, 0);
        let gx = (k as u32 / 4).div_ceil(64);
        self.run(
            &self.kernels.matmul_for(ty).get_rows,
            &[(0, &w), (2, &y), (3, &p), (4, &step), (5, &tok)],
            (gx, ids.len() as u32, 1),
            &y,
            ids.len() * k,
        )
    }

    /// RMSNorm times `weight` over rows of `weight.len()`.
    pub fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Result<Vec<f32>, GpuError> {
        let n = weight.len();
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(GpuError::BadInput("rms_norm: x is not whole rows".into()));
        }
        let xb = storage_with(&self.ctx, "x", f32_bytes(x));
        let wb = storage_with(&self.ctx, "w", f32_bytes(weight));
        let y = storage(&self.ctx, "y", (x.len() * 4) as u64);
        let p = uniform(&self.ctx, [n as u32, eps.to_bits(), 0, 0, 0, 0, 0, 0]);
        self.run(
            &self.kernels.rms_norm,
            &[(0, &xb), (1, &wb), (2, &y), (3, &p)],
            (1, (x.len() / n) as u32, 1),
            &y,
            x.len(),
        )
    }

    /// NORM-mode RoPE of `x` ([tokens][n_heads][head_dim]) at positions pos0...
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &[f32],
        n_heads: usize,
        head_dim: usize,
        pos0: u32,
        freq_base: f32,
        freq_scale: f32,
        factors: Option<&[f32]>,
    ) -> Result<Vec<f32>, GpuError> {
        let row = n_heads * head_dim;
        if row == 0 || !head_dim.is_multiple_of(2) || !x.len().is_multiple_of(row) {
            return Err(GpuError::BadInput(
                "rope: x is not whole rows of heads of even size".into(),
            ));
        }
        if factors.is_some_and(|f| f.len() != head_dim / 2) {
            return Err(GpuError::BadInput(
                "rope: one frequency factor per pair".into(),
            ));
        }
        let m = x.len() / row;
        let t = storage_with(&self.ctx, "x", f32_bytes(x));
        let table = rope_table(pos0 as i64, m, head_dim, freq_base, freq_scale, factors);
        let tb = storage_with(&self.ctx, "rope table", f32_bytes(&table));
        let p = uniform(
            &self.ctx,
            [n_heads as u32, head_dim as u32, 0, 0, 0, 0, 0, 0],
        );
        let gx = ((n_heads * head_dim / 2) as u32).div_ceil(64);
        self.run(
            &self.kernels.rope,
            &[(0, &t), (1, &tb), (3, &p)],
            (gx, m as u32, 1),
            &t,
            x.len(),
        )
    }

    /// silu(gate) * up over rows of `n`.
    pub fn swiglu(&self, gate: &[f32], up: &[f32], n: usize) -> Result<Vec<f32>, GpuError> {
        if n == 0 || gate.len() != up.len() || !gate.len().is_multiple_of(n) {
            return Err(GpuError::BadInput(
                "swiglu: gate and up must be equal whole rows".into(),
            ));
        }
        let g = storage_with(&self.ctx, "gate", f32_bytes(gate));
        let u = storage_with(&self.ctx, "up", f32_bytes(up));
        let p = uniform(&self.ctx, [n as u32, 0, 0, 0, 0, 0, 0, 0]);
        self.run(
            &self.kernels.swiglu,
            &[(0, &g), (1, &u), (3, &p)],
            ((n as u32).div_ceil(64), (gate.len() / n) as u32, 1),
            &g,
            gate.len(),
        )
    }

    /// Causal attention of `q` ([tokens][n_head][head_dim], positions pos0..) over
    /// keys and values of rows 0..pos0+tokens ([rows][n_head_kv][head_dim]), stored
    /// into caches of `types` (keys, values) by `kv_store` first, exactly as the
    /// forward pass does. `AttentionPath::SplitK` takes one token only.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
        pos0: usize,
        path: AttentionPath,
        types: (GgmlType, GgmlType),
    ) -> Result<Vec<f32>, GpuError> {
        let split = path == AttentionPath::SplitK;
        let q_row = n_head * head_dim;
        let kv_row = n_head_kv * head_dim;
        if q_row == 0
            || kv_row == 0
            || !n_head.is_multiple_of(n_head_kv)
            || !head_dim.is_multiple_of(4)
            || head_dim > MAX_HEAD_DIM
            || !q.len().is_multiple_of(q_row)
        {
            return Err(GpuError::BadInput(
                "attention: bad head counts or query size".into(),
            ));
        }
        let m = q.len() / q_row;
        let rows = pos0 + m;
        if k.len() != rows * kv_row || v.len() != k.len() || (split && m != 1) {
            return Err(GpuError::BadInput(
                "attention: keys/values must cover rows 0..pos0+tokens (and split takes one token)"
                    .into(),
            ));
        }
        // Every row, stored in one pass at position 0.
        self.kernels.add_cache_pairs(&self.ctx, &[types])?;
        let all = self.step(rows as u32, 0);
        let store_rows = rows_buffer(&self.ctx, (0..rows).map(|r| [r as u32, 0]));
        let mut caches = Vec::new();
        for (src, ty) in [(k, types.0), (v, types.1)] {
            let row_bytes = ty.row_bytes(kv_row as u64).unwrap_or(0) as u32;
            let cache = storage(&self.ctx, "cache", (rows as u64) * row_bytes as u64 + 4);
            let p = uniform(&self.ctx, [kv_row as u32, row_bytes, 0, 0, 0, 0, 0, 0]);
            let sb = storage_with(&self.ctx, "rows", f32_bytes(src));
            self.run(
                &self.kernels.kv_store[&ty],
                &[(0, &sb), (2, &cache), (3, &p), (4, &all), (7, &store_rows)],
                (store_groups(ty, kv_row), rows as u32, 1),
                &cache,
                1,
            )?;
            caches.push((cache, row_bytes));
        }
        let [(kc, k_row_bytes), (vc, v_row_bytes)] =
            <[_; 2]>::try_from(caches).map_err(|_| GpuError::BadInput("two caches".into()))?;
        let qb = storage_with(&self.ctx, "q", f32_bytes(q));
        let o = storage(&self.ctx, "out", (q.len() * 4) as u64);
        let max_splits = rows.div_ceil(SPLIT_LEN as usize) as u32;
        let part = storage(
            &self.ctx,
            "part",
            (n_head * max_splits as usize * (head_dim + 2) * 4) as u64,
        );
        let scale = 1.0 / (head_dim as f32).sqrt();
        let p = uniform(
            &self.ctx,
            [
                n_head as u32,
                n_head_kv as u32,
                head_dim as u32,
                SPLIT_LEN,
                scale.to_bits(),
                max_splits,
                k_row_bytes,
                v_row_bytes,
            ],
        );
        let step = self.step(m as u32, 0);
        let query_rows = rows_buffer(&self.ctx, (pos0..rows).map(|r| [r as u32, 0]));
        let entries = [
            (0, &qb),
            (1, &kc),
            (2, &vc),
            (3, &p),
            (4, &step),
            (5, &o),
            (6, &part),
            (7, &query_rows),
        ];
        let attn = self.kernels.attention_for(types.0, types.1);
        if split {
            self.run_many(
                &[
                    {
                        let (split, x) = attn.split_for(n_head as u32, n_head_kv as u32);
                        (split, (x, max_splits, 1))
                    },
                    (&attn.combine, (n_head as u32, 1, 1)),
                ],
                &entries,
                &o,
                q.len(),
            )
        } else {
            let kernel = if path == AttentionPath::Tiled {
                &attn.tiled
            } else {
                &attn.f16_serial
            };
            self.run(kernel, &entries, (n_head as u32, m as u32, 1), &o, q.len())
        }
    }

    /// Activations (rows of `k`) as ggml's CPU backend rounds them before a matmul
    /// with a weight of `ty` (unchanged for f32 weights).
    pub fn round_activations(
        &self,
        x: &[f32],
        k: usize,
        ty: GgmlType,
    ) -> Result<Vec<f32>, GpuError> {
        if k == 0 || !x.len().is_multiple_of(k) {
            return Err(GpuError::BadInput(
                "round_activations: x is not whole rows".into(),
            ));
        }
        let xb = storage_with(&self.ctx, "x", f32_bytes(x));
        let y = storage(&self.ctx, "y", (x.len() * 4) as u64);
        let p = uniform(&self.ctx, [k as u32, activation_mode(ty), 0, 0, 0, 0, 0, 0]);
        let corr = storage(&self.ctx, "corr", (x.len() / 32 * 4) as u64);
        self.run(
            &self.kernels.act_round,
            &[(0, &xb), (2, &y), (3, &p), (5, &corr)],
            ((k as u32).div_ceil(256), (x.len() / k) as u32, 1),
            &y,
            x.len(),
        )
    }

    /// Index of the largest value (lowest index on ties; NaN never wins).
    pub fn argmax(&self, x: &[f32]) -> Result<u32, GpuError> {
        if x.is_empty() {
            return Err(GpuError::BadInput("argmax of an empty vector".into()));
        }
        let xb = storage_with(&self.ctx, "x", f32_bytes(x));
        let r = storage(&self.ctx, "r", 4);
        let p = uniform(&self.ctx, [x.len() as u32, 0, 0, 0, 0, 0, 0, 0]);
        let out = self.run(
            &self.kernels.argmax,
            &[(0, &xb), (2, &r), (3, &p)],
            (1, 1, 1),
            &r,
            1,
        )?;
        Ok(out[0].to_bits())
    }
}
