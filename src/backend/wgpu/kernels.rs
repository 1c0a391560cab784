//! WGSL modules, their pipelines (compiled once) and bind group layouts, and a
//! harness that runs one kernel on host data for the parity tests.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use wgpu::util::DeviceExt;

use super::device::{flatten, AdapterPolicy, GpuContext};
use super::{GpuError, GPU_WEIGHT_TYPES};
use crate::backend::ggml::row_size;
use crate::gguf::GgmlType;

const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const QUANT: &str = include_str!("../../../shaders/quant.wgsl");
const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
const RMS_NORM: &str = include_str!("../../../shaders/rms_norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const SWIGLU: &str = include_str!("../../../shaders/swiglu.wgsl");
const KV_STORE: &str = include_str!("../../../shaders/kv_store.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const ARGMAX: &str = include_str!("../../../shaders/argmax.wgsl");
const ACT_ROUND: &str = include_str!("../../../shaders/act_round.wgsl");

/// Keys per workgroup of split-K decode attention.
pub(crate) const SPLIT_LEN: u32 = 128;
/// Largest head dimension the attention kernels handle (4 dims per invocation).
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// `matvec` rows per dispatch dimension; more rows spill into the y dimension.
const MATVEC_MAX_X: u32 = 32768;
/// Tile of `matmul_tiled`: weight rows and tokens per workgroup.
const TILE_N: u32 = 64;
const TILE_M: u32 = 32;

/// How a kernel binds one slot of its group.
#[derive(Clone, Copy)]
enum Slot {
    Read,
    ReadWrite,
    Uniform,
}

/// `act_round.wgsl`'s mode for activations about to meet a weight of `ty`: how
/// ggml's CPU backend converts them (to the type's vec_dot_type) first.
pub(crate) fn activation_mode(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => 1,
        GgmlType::Q4_1 => 4,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 2,
        GgmlType::F16 => 3,
        _ => 0,
    }
}

fn shader_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q5_K => "q5_k",
        GgmlType::Q6_K => "q6_k",
        _ => return None,
    })
}

/// A pipeline and the layout its bind groups are made with.
#[derive(Clone)]
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// The three kernels compiled for one weight type.
#[derive(Clone)]
pub(crate) struct MatmulKernels {
    pub matvec: Kernel,
    pub tiled: Kernel,
    pub get_rows: Kernel,
}

/// Every pipeline the forward pass uses.
#[derive(Clone)]
pub(crate) struct Kernels {
    pub matmul: HashMap<GgmlType, MatmulKernels>,
    pub rms_norm: Kernel,
    pub rope: Kernel,
    pub swiglu: Kernel,
    pub kv_store: Kernel,
    pub attn_tiled: Kernel,
    pub attn_split: Kernel,
    pub attn_combine: Kernel,
    pub attn_f16_serial: Kernel,
    pub argmax: Kernel,
    pub act_round: Kernel,
}

impl Kernels {
    /// Compiles the shared kernels and the matrix kernels of `types`. Limits the
    /// kernels assume are checked first, so a small device fails with the name of
    /// the limit rather than a pipeline error.
    pub fn new(ctx: &GpuContext, types: &[GgmlType]) -> Result<Self, GpuError> {
        check_kernel_limits(&ctx.limits(), &ctx.adapter_description())?;
        let single = |file: &str, src: &str, entry: &str, slots: &[(u32, Slot)]| {
            let module = compile(ctx, file, &format!("{COMMON}\n{src}"))?;
            pipeline(ctx, file, &module, entry, &layout(ctx, slots))
        };
        use Slot::*;
        let rms_norm = single(
            "rms_norm.wgsl",
            RMS_NORM,
            "rms_norm",
            &[(0, Read), (1, Read), (2, ReadWrite), (3, Uniform)],
        )?;
        let rope = single(
            "rope.wgsl",
            ROPE,
            "rope",
            &[(0, ReadWrite), (1, Read), (3, Uniform)],
        )?;
        let swiglu = single(
            "swiglu.wgsl",
            SWIGLU,
            "swiglu",
            &[(0, ReadWrite), (1, Read), (3, Uniform)],
        )?;
        let kv_store = single(
            "kv_store.wgsl",
            KV_STORE,
            "kv_store",
            &[
                (0, Read),
                (1, Read),
                (2, ReadWrite),
                (3, Uniform),
                (4, Uniform),
                (5, ReadWrite),
            ],
        )?;
        let argmax = single(
            "argmax.wgsl",
            ARGMAX,
            "argmax",
            &[(0, Read), (2, ReadWrite), (3, Uniform)],
        )?;
        let act_round = single(
            "act_round.wgsl",
            ACT_ROUND,
            "act_round",
            &[(0, Read), (2, ReadWrite), (3, Uniform), (5, ReadWrite)],
        )?;
        let attn_module = compile(ctx, "attention.wgsl", &format!("{COMMON}\n{ATTENTION}"))?;
        let attn_layout = layout(
            ctx,
            &[
                (0, Read),
                (1, Read),
                (2, Read),
                (3, Uniform),
                (4, Uniform),
                (5, ReadWrite),
                (6, ReadWrite),
            ],
        );
        let attn = |entry| pipeline(ctx, "attention.wgsl", &attn_module, entry, &attn_layout);
        let mut kernels = Kernels {
            matmul: HashMap::new(),
            rms_norm,
            rope,
            swiglu,
            kv_store,
            attn_tiled: attn("attn_tiled")?,
            attn_split: attn("attn_split")?,
            attn_combine: attn("attn_combine")?,
            attn_f16_serial: attn("attn_f16_serial")?,
            argmax,
            act_round,
        };
        kernels.add_types(ctx, types)?;
        Ok(kernels)
    }

    /// Compiles the matrix kernels of those of `types` not compiled yet (a session
    /// sharing these kernels may hold weights of a type its parent did not).
    pub fn add_types(&mut self, ctx: &GpuContext, types: &[GgmlType]) -> Result<(), GpuError> {
        for &ty in types {
            if let Entry::Vacant(slot) = self.matmul.entry(ty) {
                slot.insert(matmul_kernels(ctx, ty)?);
            }
        }
        Ok(())
    }

    pub fn matmul_for(&self, ty: GgmlType) -> &MatmulKernels {
        &self.matmul[&ty]
    }
}

/// The matvec, tiled matmul and row-lookup kernels of weight type `ty`.
fn matmul_kernels(ctx: &GpuContext, ty: GgmlType) -> Result<MatmulKernels, GpuError> {
    let suffix = shader_suffix(ty).ok_or_else(|| GpuError::UnsupportedType {
        tensor: format!("(a {} weight)", ty.name()),
        ty: ty.name(),
    })?;
    let block_min = if ty == GgmlType::Q4_1 {
        "block_min_q4_1(base, k)"
    } else {
        "0.0"
    };
    let source = format!(
        "{COMMON}\n{QUANT}\n{MATMUL}\nfn load4(base: u32, k: u32) -> vec4<f32> {{ return load4_{suffix}(base, k); }}\n\
         fn block_min(base: u32, k: u32) -> f32 {{ return {block_min}; }}\n"
    );
    let name = format!("matmul.wgsl ({})", ty.name());
    let module = compile(ctx, &name, &source)?;
    let mm = layout(
        ctx,
        &[
            (0, Slot::Read),
            (1, Slot::Read),
            (2, Slot::ReadWrite),
            (3, Slot::Uniform),
            (4, Slot::Uniform),
            (6, Slot::Read),
        ],
    );
    let gr = layout(
        ctx,
        &[
            (0, Slot::Read),
            (2, Slot::ReadWrite),
            (3, Slot::Uniform),
            (4, Slot::Uniform),
            (5, Slot::Read),
        ],
    );
    Ok(MatmulKernels {
        matvec: pipeline(ctx, &name, &module, "matvec", &mm)?,
        tiled: pipeline(ctx, &name, &module, "matmul_tiled", &mm)?,
        get_rows: pipeline(ctx, &name, &module, "get_rows", &gr)?,
    })
}

fn check_kernel_limits(l: &wgpu::Limits, adapter: &str) -> Result<(), GpuError> {
    let checks: [(&'static str, u64, u64, &str); 4] = [
        (
            "max_compute_invocations_per_workgroup",
            256,
            l.max_compute_invocations_per_workgroup as u64,
            "workgroups of 256 invocations",
        ),
        (
            "max_compute_workgroup_size_x",
            256,
            l.max_compute_workgroup_size_x as u64,
            "workgroups of 256 invocations",
        ),
        (
            "max_compute_workgroup_storage_size",
            12288,
            l.max_compute_workgroup_storage_size as u64,
            "the 64x32 matmul tiles in workgroup memory",
        ),
        (
            "max_storage_buffers_per_shader_stage",
            5,
            l.max_storage_buffers_per_shader_stage as u64,
            "the attention kernels' buffers",
        ),
    ];
    for (limit, needed, available, what) in checks {
        if available < needed {
            return Err(GpuError::Limit {
                adapter: adapter.to_string(),
                limit,
                needed,
                available,
                what: what.to_string(),
            });
        }
    }
    Ok(())
}

fn compile(ctx: &GpuContext, name: &str, source: &str) -> Result<wgpu::ShaderModule, GpuError> {
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(GpuError::Shader {
            shader: name.to_string(),
            message: flatten(&e.to_string()),
        });
    }
    Ok(module)
}

fn layout(ctx: &GpuContext, slots: &[(u32, Slot)]) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
        .iter()
        .map(|&(binding, slot)| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match slot {
                    Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Slot::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    Slot::Uniform => wgpu::BufferBindingType::Uniform,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    ctx.device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &entries,
        })
}

fn pipeline(
    ctx: &GpuContext,
    name: &str,
    module: &wgpu::ShaderModule,
    entry: &str,
    bgl: &wgpu::BindGroupLayout,
) -> Result<Kernel, GpuError> {
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let pl = ctx
        .device
        .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(bgl)],
            immediate_size: 0,
        });
    let pipeline = ctx
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pl),
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(GpuError::Shader {
            shader: format!("{name}, entry point {entry}"),
            message: flatten(&e.to_string()),
        });
    }
    Ok(Kernel {
        pipeline,
        layout: bgl.clone(),
    })
}

/// The (cos, sin) table `rope.wgsl` reads for positions pos0..pos0+n: for pair i,
/// the angle pos · base^(-2i/head_dim) (divided by `factors[i]` if given, times
/// `freq_scale`), built in f32 by repeated multiplication and taken through libm,
/// as ggml's CPU RoPE does.
pub(crate) fn rope_table(
    pos0: usize,
    n: usize,
    head_dim: usize,
    freq_base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
) -> Vec<f32> {
    let half = head_dim / 2;
    let theta_scale = freq_base.powf(-2.0 / head_dim as f32);
    let mut out = Vec::with_capacity(n * head_dim);
    for t in 0..n {
        let mut theta = (pos0 + t) as f32;
        for i in 0..half {
            let ff = factors.map_or(1.0, |f| f[i]);
            let angle = freq_scale * (theta / ff);
            out.push(angle.cos());
            out.push(angle.sin());
            theta *= theta_scale;
        }
    }
    out
}

/// A 32-byte uniform of eight words (every params struct fits in it).
pub(crate) fn uniform(ctx: &GpuContext, words: [u32; 8]) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
}

/// A storage buffer holding `bytes`, padded to whole words plus one, since the
/// unaligned reads of `quant.wgsl` may touch the word after the last byte.
pub(crate) fn storage_with(ctx: &GpuContext, label: &str, bytes: &[u8]) -> wgpu::Buffer {
    let mut padded = Vec::with_capacity(bytes.len() + 8);
    padded.extend_from_slice(bytes);
    padded.resize(bytes.len().next_multiple_of(4) + 4, 0);
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &padded,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        })
}

/// A zeroed storage buffer of `bytes` (at least 4).
pub(crate) fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

pub(crate) fn bind(
    ctx: &GpuContext,
    kernel: &Kernel,
    entries: &[(u32, &wgpu::Buffer)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = entries
        .iter()
        .map(|&(binding, buf)| wgpu::BindGroupEntry {
            binding,
            resource: buf.as_entire_binding(),
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &kernel.layout,
        entries: &entries,
    })
}

/// Workgroups for `matvec` over `n` rows.
pub(crate) fn matvec_grid(n: u32) -> (u32, u32) {
    let x = n.clamp(1, MATVEC_MAX_X);
    (x, n.div_ceil(x))
}

pub(crate) fn tiled_grid(n: u32, m: u32) -> (u32, u32) {
    (n.div_ceil(TILE_N), m.div_ceil(TILE_M))
}

/// Copies `bytes` bytes of `src` back to the host.
pub(crate) fn read_back(
    ctx: &GpuContext,
    encoder: wgpu::CommandEncoder,
    src: &wgpu::Buffer,
    bytes: u64,
    staging: &wgpu::Buffer,
) -> Result<Vec<u8>, GpuError> {
    let mut encoder = encoder;
    encoder.copy_buffer_to_buffer(src, 0, staging, 0, bytes);
    ctx.queue.submit([encoder.finish()]);
    let slice = staging.slice(..bytes);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| GpuError::Device {
            during: "waiting for the GPU",
            message: e.to_string(),
        })?;
    rx.recv()
        .map_err(|_| GpuError::Device {
            during: "reading results back",
            message: "the map callback never ran".into(),
        })?
        .map_err(|e| GpuError::Device {
            during: "reading results back",
            message: e.to_string(),
        })?;
    let out = {
        let view = slice.get_mapped_range().map_err(|e| GpuError::Device {
            during: "reading results back",
            message: e.to_string(),
        })?;
        view.to_vec()
    };
    staging.unmap();
    Ok(out)
}

pub(crate) fn staging(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("staging"),
        size: bytes.max(4).next_multiple_of(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

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
        let row_bytes = row_size(ty, k as i64);
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
        let table = rope_table(pos0 as usize, m, head_dim, freq_base, freq_scale, factors);
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
    /// into an f16 cache by `kv_store` first, exactly as the forward pass does.
    /// `AttentionPath::SplitK` takes one token only.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
        pos0: usize,
        path: AttentionPath,
    ) -> Result<Vec<f32>, GpuError> {
        let split = path == AttentionPath::SplitK;
        let q_row = n_head * head_dim;
        let kv_row = n_head_kv * head_dim;
        if q_row == 0
            || kv_row == 0
            || !n_head.is_multiple_of(n_head_kv)
            || !head_dim.is_multiple_of(2)
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
        // Rows 0..pos0 first (a pass at position 0), then this pass's rows.
        let kc = storage(&self.ctx, "k cache", (rows * kv_row * 2) as u64);
        let vc = storage(&self.ctx, "v cache", (rows * kv_row * 2) as u64);
        let store_p = uniform(&self.ctx, [kv_row as u32, 0, 0, 0, 0, 0, 0, 0]);
        let kb = storage_with(&self.ctx, "k", f32_bytes(k));
        let vb = storage_with(&self.ctx, "v", f32_bytes(v));
        let all = self.step(rows as u32, 0);
        let gx = ((kv_row / 2) as u32).div_ceil(64);
        self.run(
            &self.kernels.kv_store,
            &[
                (0, &kb),
                (1, &vb),
                (2, &kc),
                (3, &store_p),
                (4, &all),
                (5, &vc),
            ],
            (gx, rows as u32, 1),
            &kc,
            1,
        )?;

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
                0,
                0,
            ],
        );
        let step = self.step(m as u32, pos0 as u32);
        let entries = [
            (0, &qb),
            (1, &kc),
            (2, &vc),
            (3, &p),
            (4, &step),
            (5, &o),
            (6, &part),
        ];
        if split {
            self.run_many(
                &[
                    (&self.kernels.attn_split, (n_head as u32, max_splits, 1)),
                    (&self.kernels.attn_combine, (n_head as u32, 1, 1)),
                ],
                &entries,
                &o,
                q.len(),
            )
        } else {
            let kernel = if path == AttentionPath::Tiled {
                &self.kernels.attn_tiled
            } else {
                &self.kernels.attn_f16_serial
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_device_fails_with_the_limit_named() {
        let mut l = wgpu::Limits::downlevel_defaults();
        l.max_compute_workgroup_storage_size = 8192;
        let err = check_kernel_limits(&l, "Tiny GPU").unwrap_err();
        assert!(
            matches!(
                &err,
                GpuError::Limit {
                    limit: "max_compute_workgroup_storage_size",
                    needed: 12288,
                    available: 8192,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("Tiny GPU") && msg.contains("matmul tiles"),
            "{msg}"
        );
        // WebGPU's default limits are what every real adapter offers at least.
        check_kernel_limits(&wgpu::Limits::default(), "any GPU").unwrap();
    }

    #[test]
    fn a_shader_that_does_not_compile_is_named_in_the_error() {
        let ctx = match GpuContext::new(AdapterPolicy::Any) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIPPED a_shader_that_does_not_compile_is_named_in_the_error: {e}");
                return;
            }
        };
        let broken = format!("{COMMON}\nfn oops( -> f32 {{ return 1.0; }}");
        let err = compile(&ctx, "broken.wgsl", &broken).unwrap_err();
        match &err {
            GpuError::Shader { shader, message } => {
                assert_eq!(shader, "broken.wgsl");
                assert!(!message.is_empty() && !message.contains('\n'), "{message}");
            }
            other => panic!("expected a shader error, got {other:?}"),
        }
        // An entry point the module lacks fails at pipeline creation, also named.
        let module = compile(&ctx, "common.wgsl", COMMON).unwrap();
        let bgl = layout(&ctx, &[(0, Slot::Read)]);
        let Err(err) = pipeline(&ctx, "common.wgsl", &module, "no_such_entry", &bgl) else {
            panic!("a pipeline for a missing entry point was created");
        };
        assert!(
            matches!(&err, GpuError::Shader { shader, .. } if shader.contains("no_such_entry")),
            "{err:?}"
        );
    }
}
