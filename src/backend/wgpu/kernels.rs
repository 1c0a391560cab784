//! WGSL modules, their pipelines (compiled once) and bind group layouts, and a
//! harness that runs one kernel on host data for the parity tests.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use wgpu::util::DeviceExt;

use super::device::{flatten, GpuContext};
use super::GpuError;
use crate::gguf::GgmlType;

const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const QUANT: &str = include_str!("../../../shaders/quant.wgsl");
const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
const RMS_NORM: &str = include_str!("../../../shaders/rms_norm.wgsl");
const ROPE: &str = include_str!("../../../shaders/rope.wgsl");
const QKV_EXTRAS: &str = include_str!("../../../shaders/qkv_extras.wgsl");
const SWIGLU: &str = include_str!("../../../shaders/swiglu.wgsl");
const KV_CACHE: &str = include_str!("../../../shaders/kv_cache.wgsl");
const KV_STORE: &str = include_str!("../../../shaders/kv_store.wgsl");
const KV_LOAD: &str = include_str!("../../../shaders/kv_load.wgsl");
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

/// The name of a cache type's functions in `kv_cache.wgsl` and entry point in
/// `kv_store.wgsl`.
fn cache_suffix(ty: GgmlType) -> Result<&'static str, GpuError> {
    Ok(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::IQ4_NL => "iq4_nl",
        GgmlType::Q4_0 => "q4_0",
        _ => return Err(GpuError::UnsupportedCacheType(ty.name())),
    })
}

/// `kv_cache.wgsl` reading `buffer`, its functions prefixed `prefix`, with
/// `{prefix}4` and `{prefix}1` reading a slot of type `ty`.
fn cache_reader(buffer: &str, prefix: &str, ty: GgmlType) -> Result<String, GpuError> {
    let suffix = cache_suffix(ty)?;
    Ok(format!(
        "{}\nfn {prefix}4(base: u32, i: u32) -> vec4<f32> {{ return {prefix}4_{suffix}(base, i); }}\n\
         fn {prefix}1(base: u32, i: u32) -> f32 {{ return {prefix}1_{suffix}(base, i); }}\n",
        KV_CACHE.replace("CACHE", buffer).replace("cache", prefix)
    ))
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

/// The attention kernels for one (key slot type, value slot type).
#[derive(Clone)]
pub(crate) struct AttnKernels {
    pub tiled: Kernel,
    pub split: Kernel,
    pub split_group: Kernel,
    pub combine: Kernel,
    pub f16_serial: Kernel,
}

/// Query heads per KV head `attn_split_group` takes at once (its MAX_GROUP).
const MAX_GROUP: u32 = 8;

impl AttnKernels {
    /// The split-K decode kernel for `n_head` query heads over `n_head_kv` KV heads,
    /// and its workgroups along x: a whole GQA group per workgroup where the group
    /// fits, so each key and value is dequantized once for it.
    pub fn split_for(&self, n_head: u32, n_head_kv: u32) -> (&Kernel, u32) {
        if n_head / n_head_kv.max(1) <= MAX_GROUP {
            (&self.split_group, n_head_kv)
        } else {
            (&self.split, n_head)
        }
    }
}

/// Every pipeline the forward pass uses.
#[derive(Clone)]
pub(crate) struct Kernels {
    pub matmul: HashMap<GgmlType, MatmulKernels>,
    pub rms_norm: Kernel,
    pub rope: Kernel,
    /// qwen2's Q/K/V biases and qwen3's per-head Q/K norms (`qkv_extras.wgsl`).
    pub add_bias: Kernel,
    pub head_norm: Kernel,
    pub swiglu: Kernel,
    /// Per cache type: f32 rows into a slot, and a slot's rows back to f32.
    /// `kv_store.wgsl`, compiled once; its entry points become pipelines per slot
    /// type as plans need them (`add_cache_pairs`).
    store_module: wgpu::ShaderModule,
    rows_layout: wgpu::BindGroupLayout,
    store_layout: wgpu::BindGroupLayout,
    pub kv_store: HashMap<GgmlType, Kernel>,
    pub kv_load: HashMap<GgmlType, Kernel>,
    /// Per (key, value) slot types a plan reads together (`add_cache_pairs`).
    pub attention: HashMap<(GgmlType, GgmlType), AttnKernels>,
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
        let extras = [(0, ReadWrite), (1, Read), (3, Uniform)];
        let add_bias = single("qkv_extras.wgsl", QKV_EXTRAS, "add_bias", &extras)?;
        let head_norm = single("qkv_extras.wgsl", QKV_EXTRAS, "head_norm", &extras)?;
        let swiglu = single(
            "swiglu.wgsl",
            SWIGLU,
            "swiglu",
            &[(0, ReadWrite), (1, Read), (3, Uniform)],
        )?;
        let store_module = compile(ctx, "kv_store.wgsl", &format!("{COMMON}\n{KV_STORE}"))?;
        // Both move rows between an f32 buffer and a slot: (0) in, (2) out; a
        // store also reads its rows (7).
        let rows_layout = layout(
            ctx,
            &[(0, Read), (2, ReadWrite), (3, Uniform), (4, Uniform)],
        );
        let store_layout = layout(
            ctx,
            &[
                (0, Read),
                (2, ReadWrite),
                (3, Uniform),
                (4, Uniform),
                (7, Read),
            ],
        );
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
        let mut kernels = Kernels {
            matmul: HashMap::new(),
            rms_norm,
            rope,
            add_bias,
            head_norm,
            swiglu,
            store_module,
            rows_layout,
            store_layout,
            kv_store: HashMap::new(),
            kv_load: HashMap::new(),
            attention: HashMap::new(),
            argmax,
            act_round,
        };
        kernels.add_types(ctx, types)?;
        kernels.add_cache_pairs(ctx, &[(GgmlType::F16, GgmlType::F16)])?;
        Ok(kernels)
    }

    /// Compiles the attention kernels of those (key type, value type) pairs not
    /// compiled yet.
    pub fn add_cache_pairs(
        &mut self,
        ctx: &GpuContext,
        pairs: &[(GgmlType, GgmlType)],
    ) -> Result<(), GpuError> {
        for &(tk, tv) in pairs {
            if let Entry::Vacant(slot) = self.attention.entry((tk, tv)) {
                slot.insert(attention_kernels(ctx, tk, tv)?);
            }
            self.add_slot_type(ctx, tk)?;
            self.add_slot_type(ctx, tv)?;
        }
        Ok(())
    }

    /// Compiles the store and load kernels of a slot type not compiled yet (only
    /// the types a plan holds, so a session does not pay for every type's shaders).
    fn add_slot_type(&mut self, ctx: &GpuContext, ty: GgmlType) -> Result<(), GpuError> {
        if self.kv_store.contains_key(&ty) {
            return Ok(());
        }
        let suffix = cache_suffix(ty)?;
        let entry = format!("store_{suffix}");
        let store = pipeline(
            ctx,
            "kv_store.wgsl",
            &self.store_module,
            &entry,
            &self.store_layout,
        )?;
        let name = format!("kv_load.wgsl ({suffix})");
        let source = format!("{COMMON}\n{}\n{KV_LOAD}", cache_reader("KC", "kc", ty)?);
        let module = compile(ctx, &name, &source)?;
        let load = pipeline(ctx, &name, &module, "kv_load", &self.rows_layout)?;
        self.kv_store.insert(ty, store);
        self.kv_load.insert(ty, load);
        Ok(())
    }

    /// The attention kernels for a key slot of `tk` and a value slot of `tv`
    /// (compiled by `add_cache_pairs`).
    pub fn attention_for(&self, tk: GgmlType, tv: GgmlType) -> &AttnKernels {
        &self.attention[&(tk, tv)]
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

/// The attention kernels reading keys of `tk` and values of `tv`.
fn attention_kernels(
    ctx: &GpuContext,
    tk: GgmlType,
    tv: GgmlType,
) -> Result<AttnKernels, GpuError> {
    let name = format!("attention.wgsl (K {}, V {})", tk.name(), tv.name());
    let source = format!(
        "{COMMON}\n{}\n{}\n{ATTENTION}",
        cache_reader("KC", "kc", tk)?,
        cache_reader("VC", "vc", tv)?
    );
    let module = compile(ctx, &name, &source)?;
    use Slot::*;
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
            (7, Read),
        ],
    );
    let attn = |entry| pipeline(ctx, &name, &module, entry, &attn_layout);
    Ok(AttnKernels {
        tiled: attn("attn_tiled")?,
        split: attn("attn_split")?,
        split_group: attn("attn_split_group")?,
        combine: attn("attn_combine")?,
        f16_serial: attn("attn_f16_serial")?,
    })
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
    pos0: i64,
    n: usize,
    head_dim: usize,
    freq_base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
) -> Vec<f32> {
    rope_table_at(
        (0..n).map(|t| pos0 + t as i64),
        head_dim,
        freq_base,
        freq_scale,
        factors,
    )
}

/// `rope_table` for any positions, one row per position.
pub(crate) fn rope_table_at(
    positions: impl ExactSizeIterator<Item = i64>,
    head_dim: usize,
    freq_base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
) -> Vec<f32> {
    let half = head_dim / 2;
    let theta_scale = freq_base.powf(-2.0 / head_dim as f32);
    let mut out = Vec::with_capacity(positions.len() * head_dim);
    for pos in positions {
        let mut theta = pos as f32;
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

/// Workgroups along x for `kv_store` of one row of `n` elements into a slot of `ty`
/// (an invocation per element, pair or block).
pub(crate) fn store_groups(ty: GgmlType, n: usize) -> u32 {
    let per = match ty {
        GgmlType::F32 => 1,
        GgmlType::F16 => 2,
        _ => 32,
    };
    (n / per).div_ceil(64) as u32
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

/// The `ROWS` buffer of `common.wgsl`: per token, (cache row, first row attended).
pub(crate) fn rows_buffer(
    ctx: &GpuContext,
    rows: impl IntoIterator<Item = [u32; 2]>,
) -> wgpu::Buffer {
    let flat: Vec<u32> = rows.into_iter().flatten().collect();
    storage_with(ctx, "rows", bytemuck::cast_slice(&flat))
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
    let mut out = read_back_all(ctx, encoder, &[(Some(src), bytes, staging)])?;
    Ok(out.pop().unwrap_or_default())
}

/// Submits `encoder` with copies of each `(src, bytes, staging)` appended (none
/// where `src` is `None`: the encoder fills that staging buffer itself), and reads
/// every one back after a single wait.
pub(crate) fn read_back_all(
    ctx: &GpuContext,
    encoder: wgpu::CommandEncoder,
    reads: &[(Option<&wgpu::Buffer>, u64, &wgpu::Buffer)],
) -> Result<Vec<Vec<u8>>, GpuError> {
    let mut encoder = encoder;
    for &(src, bytes, staging) in reads {
        if let Some(src) = src {
            encoder.copy_buffer_to_buffer(src, 0, staging, 0, bytes);
        }
    }
    ctx.queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, &(_, bytes, staging)) in reads.iter().enumerate() {
        let tx = tx.clone();
        staging
            .slice(..bytes)
            .map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send((i, r));
            });
    }
    drop(tx);
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| GpuError::Device {
            during: "waiting for the GPU",
            message: e.to_string(),
        })?;
    // Every callback has run once the wait returns (try_recv: a callback that never
    // ran would keep its sender alive, and recv would block).
    let mut mapped = 0;
    while let Ok((_, r)) = rx.try_recv() {
        r.map_err(|e| GpuError::Device {
            during: "reading results back",
            message: e.to_string(),
        })?;
        mapped += 1;
    }
    if mapped != reads.len() {
        return Err(GpuError::Device {
            during: "reading results back",
            message: "a map callback never ran".into(),
        });
    }
    let mut out = Vec::with_capacity(reads.len());
    for &(_, bytes, staging) in reads {
        let data = {
            let view = staging
                .slice(..bytes)
                .get_mapped_range()
                .map_err(|e| GpuError::Device {
                    during: "reading results back",
                    message: e.to_string(),
                })?;
            view.to_vec()
        };
        staging.unmap();
        out.push(data);
    }
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

#[cfg(feature = "test-support")]
mod harness;
#[cfg(feature = "test-support")]
pub use harness::{AttentionPath, KernelHarness};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::wgpu::AdapterPolicy;

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
