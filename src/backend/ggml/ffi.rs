//! Safe wrapper over the parts of ggml's C API that kvsharer uses: a backend (the CPU,
//! or a CUDA/Vulkan/Metal device found through ggml's registry when built with that
//! cargo feature), tensors placed in backend buffers (the model's mmap'd weights or
//! their copy on a device, the KV cache), and per-forward compute graphs. All of the
//! crate's ggml `unsafe` lives here.
//!
//! Lifetimes: a `Tensor<'a>` borrows the context that owns its metadata. Weights live
//! as long as the `TensorArena` they were placed in; graph tensors as long as their
//! `GraphCtx`. Shape errors in graph building are programming errors and abort inside
//! ggml, so every op here is called only with shapes the model code has derived from a
//! validated `LlamaConfig`.

use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use crate::backend::ggml::decode_attention;
use crate::gguf::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgmlError {
    #[error("ggml: could not create the CPU backend")]
    BackendInit,
    #[error("ggml: this kvsharer was built without the {backend} backend (hint: rebuild with --features {backend})")]
    BackendNotBuilt { backend: &'static str },
    #[error("ggml: no {backend} device found: {cause}")]
    NoDevice {
        backend: &'static str,
        cause: &'static str,
    },
    #[error("ggml: could not start the {backend} backend on device {device}")]
    DeviceInit {
        backend: &'static str,
        device: String,
    },
    #[error("ggml: device {device} cannot run op {op} (tensor {tensor})")]
    UnsupportedOp {
        device: String,
        op: String,
        tensor: String,
    },
    #[error("ggml: could not create a context of {0} bytes")]
    ContextInit(usize),
    #[error("ggml: could not allocate a {what} buffer of {bytes} bytes")]
    Alloc { what: &'static str, bytes: usize },
    #[error("ggml: tensor {name} does not fit in its buffer")]
    Placement { name: String },
    #[error("ggml: graph computation failed with status {0}")]
    Compute(i32),
    #[error("ggml: quantization to {0} is not supported here")]
    Quantize(&'static str),
    #[error("ggml: {0}")]
    Other(String),
}

/// Converts our type enum to ggml's. The discriminants are ggml's own values.
fn raw_type(ty: GgmlType) -> sys::ggml_type {
    ty as u32 as sys::ggml_type
}

/// The ggml backends a session can run on. Every kind but `Cpu` is a cargo feature
/// passed through to llama-cpp-sys-2; all of them run the same graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Vulkan,
    Metal,
}

impl DeviceKind {
    /// The name users type (`--backend`) and the cargo feature that builds it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Vulkan => "vulkan",
            DeviceKind::Metal => "metal",
        }
    }

    /// The name ggml's backend registry knows this backend by.
    fn registry_name(self) -> &'static std::ffi::CStr {
        match self {
            DeviceKind::Cpu => c"CPU",
            DeviceKind::Cuda => c"CUDA",
            DeviceKind::Vulkan => c"Vulkan",
            DeviceKind::Metal => c"MTL",
        }
    }

    fn registry_label(self) -> &'static str {
        self.registry_name().to_str().unwrap_or("ggml")
    }

    /// Whether this binary was built with the backend (its cargo feature).
    pub fn compiled_in(self) -> bool {
        match self {
            DeviceKind::Cpu => true,
            DeviceKind::Cuda => cfg!(feature = "cuda"),
            DeviceKind::Vulkan => cfg!(feature = "vulkan"),
            DeviceKind::Metal => cfg!(feature = "metal"),
        }
    }

    /// Why ggml may list no device of this kind, for the error a user sees.
    fn missing_device_cause(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "ggml's CPU backend is not registered",
            DeviceKind::Cuda => "the CUDA runtime reports no GPU (check the driver and CUDA_VISIBLE_DEVICES)",
            DeviceKind::Vulkan => "ggml's Vulkan backend lists no GPU; it skips CPU-type Vulkan devices such as lavapipe unless GGML_VK_VISIBLE_DEVICES names them (e.g. GGML_VK_VISIBLE_DEVICES=0), and GGML_DISABLE_VULKAN turns it off",
            DeviceKind::Metal => "Metal reports no GPU",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A ggml backend on one device: the CPU (created exactly as before, with its thread
/// count), or the first device of a GPU backend found through ggml's registry. One
/// per model/session user.
pub struct GgmlBackend {
    raw: NonNull<sys::ggml_backend>,
    kind: DeviceKind,
    device: String,
    n_threads: usize,
}

impl GgmlBackend {
    /// ggml's CPU backend with `n_threads` threads.
    pub fn cpu(n_threads: usize) -> Result<Self, GgmlError> {
        // SAFETY: plain constructor; a null return is handled below.
        let raw = unsafe { sys::ggml_backend_cpu_init() };
        let raw = NonNull::new(raw).ok_or(GgmlError::BackendInit)?;
        let mut b = GgmlBackend {
            raw,
            kind: DeviceKind::Cpu,
            device: "CPU".to_string(),
            n_threads: 0,
        };
        b.set_threads(n_threads);
        Ok(b)
    }

    /// The backend of `kind`: the CPU as `new` makes it, or the first device ggml's
    /// registry lists for that backend. Errors say whether the backend was not built
    /// in or has no device.
    pub fn on_device(kind: DeviceKind, n_threads: usize) -> Result<Self, GgmlError> {
        if kind == DeviceKind::Cpu {
            return Self::cpu(n_threads);
        }
        if !kind.compiled_in() {
            return Err(GgmlError::BackendNotBuilt {
                backend: kind.name(),
            });
        }
        let no_device = || GgmlError::NoDevice {
            backend: kind.registry_label(),
            cause: kind.missing_device_cause(),
        };
        // SAFETY: the registry is a process-wide static; the name is a C string literal.
        let reg = unsafe { sys::ggml_backend_reg_by_name(kind.registry_name().as_ptr()) };
        if reg.is_null() {
            return Err(no_device());
        }
        // SAFETY: `reg` is a live registry entry.
        if unsafe { sys::ggml_backend_reg_dev_count(reg) } == 0 {
            return Err(no_device());
        }
        // SAFETY: index 0 is below the device count checked above.
        let dev = unsafe { sys::ggml_backend_reg_dev_get(reg, 0) };
        if dev.is_null() {
            return Err(no_device());
        }
        let device = device_label(dev);
        // SAFETY: `dev` is a live device of the registry; null params ask for defaults.
        let raw = unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) };
        let raw = NonNull::new(raw).ok_or_else(|| GgmlError::DeviceInit {
            backend: kind.registry_label(),
            device: device.clone(),
        })?;
        Ok(GgmlBackend {
            raw,
            kind,
            device,
            n_threads: n_threads.max(1),
        })
    }

    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// True on ggml's CPU backend: weights are used in place from the mmap, and
    /// CPU-only custom ops (`ggml_map_custom*`) may be put in the graph.
    pub fn is_cpu(&self) -> bool {
        self.kind == DeviceKind::Cpu
    }

    /// The device in words, e.g. `Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits))`.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// Sets the CPU thread count; GPU backends schedule their own work, so there it
    /// is only remembered.
    pub fn set_threads(&mut self, n: usize) {
        let n = n.max(1);
        if self.is_cpu() {
            // SAFETY: `raw` is a live CPU backend owned by self.
            unsafe { sys::ggml_backend_cpu_set_n_threads(self.raw.as_ptr(), n as i32) };
        }
        self.n_threads = n;
    }

    pub fn threads(&self) -> usize {
        self.n_threads
    }

    /// Runs a graph whose tensors are all allocated (weights, cache, `GraphAllocator`).
    pub fn compute(&self, graph: &Graph<'_>) -> Result<(), GgmlError> {
        // SAFETY: the graph and every tensor it references are alive for the
        // borrow of `graph`, and the allocator has placed all intermediate tensors.
        let status = unsafe { sys::ggml_backend_graph_compute(self.raw.as_ptr(), graph.raw) };
        if status == sys::GGML_STATUS_SUCCESS {
            Ok(())
        } else {
            Err(GgmlError::Compute(status))
        }
    }

    /// Checks that the device implements every op of `graph` with its operand types
    /// (a GPU backend aborts the process on an op it lacks). The CPU runs everything,
    /// so there this returns at once.
    pub fn check_supported(&self, graph: &Graph<'_>) -> Result<(), GgmlError> {
        if self.is_cpu() {
            return Ok(());
        }
        // SAFETY: live graph for the borrow of `graph`.
        let n = unsafe { sys::ggml_graph_n_nodes(graph.raw) };
        for i in 0..n {
            // SAFETY: `i` is below the node count; nodes are live tensors.
            let node = unsafe { sys::ggml_graph_node(graph.raw, i) };
            if node.is_null() {
                continue;
            }
            // SAFETY: live backend and node.
            if !unsafe { sys::ggml_backend_supports_op(self.raw.as_ptr(), node) } {
                // SAFETY: ggml returns static or tensor-owned NUL-terminated strings.
                let (op, tensor) = unsafe {
                    (
                        c_text(sys::ggml_op_desc(node)),
                        c_text(sys::ggml_get_name(node)),
                    )
                };
                return Err(GgmlError::UnsupportedOp {
                    device: self.device.clone(),
                    op,
                    tensor,
                });
            }
        }
        Ok(())
    }

    fn default_buffer_type(&self) -> sys::ggml_backend_buffer_type_t {
        // SAFETY: `raw` is a live backend.
        unsafe { sys::ggml_backend_get_default_buffer_type(self.raw.as_ptr()) }
    }
}

/// "name (description)" of a registry device.
fn device_label(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: `dev` is a live registry device; ggml returns strings it owns.
    let (name, desc) = unsafe {
        (
            c_text(sys::ggml_backend_dev_name(dev)),
            c_text(sys::ggml_backend_dev_description(dev)),
        )
    };
    if desc.is_empty() || desc == name {
        name
    } else {
        format!("{name} ({desc})")
    }
}

/// Copies a C string ggml owns; null reads as empty.
///
/// # Safety
/// `p` is null or points at a NUL-terminated string alive for this call.
unsafe fn c_text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for GgmlBackend {
    fn drop(&mut self) {
        // SAFETY: we own the backend and free it once.
        unsafe { sys::ggml_backend_free(self.raw.as_ptr()) };
    }
}

// SAFETY: the backend object is only used through &self/&mut self; ggml does not tie
// CPU, CUDA, Vulkan or Metal backends to the creating thread.
unsafe impl Send for GgmlBackend {}

/// A handle to a tensor whose metadata lives in a context borrowed for `'a`.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    raw: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'a ()>,
}

impl<'a> Tensor<'a> {
    fn from_raw(raw: *mut sys::ggml_tensor) -> Self {
        Tensor {
            raw: NonNull::new(raw).expect("ggml returned a null tensor (out of context memory)"),
            _ctx: PhantomData,
        }
    }

    fn ptr(&self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }

    fn meta(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor's context outlives 'a, so the metadata is valid to read.
        unsafe { self.raw.as_ref() }
    }

    pub fn ne(&self) -> [i64; 4] {
        self.meta().ne
    }

    pub fn nb(&self) -> [usize; 4] {
        self.meta().nb
    }

    pub fn n_bytes(&self) -> usize {
        // SAFETY: metadata read of a live tensor.
        unsafe { sys::ggml_nbytes(self.ptr()) }
    }

    pub fn n_elements(&self) -> i64 {
        self.ne().iter().product()
    }

    /// Copies host data into the tensor's buffer; `data` must be exactly its size.
    pub fn write<T: Element>(&self, data: &[T]) {
        let bytes = std::mem::size_of_val(data);
        assert_eq!(bytes, self.n_bytes(), "tensor write of the wrong size");
        assert!(!self.meta().buffer.is_null(), "tensor has no buffer");
        // SAFETY: sizes checked above; the tensor is allocated in a host buffer.
        unsafe {
            sys::ggml_backend_tensor_set(self.ptr(), data.as_ptr() as *const c_void, 0, bytes)
        };
    }

    /// Reads the whole tensor as f32 (the tensor must be F32 and allocated).
    pub fn read_f32(&self) -> Vec<f32> {
        assert_eq!(self.meta().type_, raw_type(GgmlType::F32));
        let n = self.n_elements() as usize;
        let mut out = vec![0f32; n];
        // SAFETY: `out` has exactly the tensor's byte size; the tensor is allocated.
        unsafe {
            sys::ggml_backend_tensor_get(self.ptr(), out.as_mut_ptr() as *mut c_void, 0, n * 4)
        };
        out
    }

    /// Reads `len` bytes at `offset` (raw storage, any type).
    pub fn read_bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.n_bytes());
        let mut out = vec![0u8; len];
        // SAFETY: range checked above against the tensor's size.
        unsafe {
            sys::ggml_backend_tensor_get(self.ptr(), out.as_mut_ptr() as *mut c_void, offset, len)
        };
        out
    }

    /// Writes `data` at byte `offset` (raw storage, any type).
    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.n_bytes());
        // SAFETY: range checked above against the tensor's size.
        unsafe {
            sys::ggml_backend_tensor_set(
                self.ptr(),
                data.as_ptr() as *const c_void,
                offset,
                data.len(),
            )
        };
    }
}

/// Plain-old-data element types that may be copied byte-wise into tensors.
///
/// # Safety
/// Implementors must be plain data with no padding or invalid bit patterns.
pub unsafe trait Element: Copy {}
// SAFETY: primitive numeric types are plain data.
unsafe impl Element for f32 {}
// SAFETY: as above.
unsafe impl Element for i32 {}
// SAFETY: as above.
unsafe impl Element for i64 {}
// SAFETY: as above.
unsafe impl Element for u16 {}
// SAFETY: as above.
unsafe impl Element for u8 {}

/// A no-alloc ggml context plus the one backend buffer that holds its tensors' data:
/// the model's weights (a buffer wrapping the mmap'd file) or the KV cache.
pub struct TensorArena {
    ctx: NonNull<sys::ggml_context>,
    buffer: *mut sys::ggml_backend_buffer,
    tensors: Vec<NonNull<sys::ggml_tensor>>,
    capacity: usize,
}

fn no_alloc_context(n_tensors: usize) -> Result<NonNull<sys::ggml_context>, GgmlError> {
    // SAFETY: plain size query.
    let mem_size = unsafe { sys::ggml_tensor_overhead() } * (n_tensors + 1);
    let params = sys::ggml_init_params {
        mem_size,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: ggml_init copies the params; null on failure is handled.
    let ctx = unsafe { sys::ggml_init(params) };
    NonNull::new(ctx).ok_or(GgmlError::ContextInit(mem_size))
}

/// Where one weight tensor lives in the mapped bytes.
pub struct WeightPlacement<'n> {
    pub name: &'n str,
    pub ty: GgmlType,
    pub ne: Vec<i64>,
    /// Byte offset from the start of the mapping.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorArena {
    /// An arena for up to `capacity` tensors, allocated together by `allocate`.
    pub fn new(capacity: usize) -> Result<Self, GgmlError> {
        Ok(TensorArena {
            ctx: no_alloc_context(capacity)?,
            buffer: std::ptr::null_mut(),
            tensors: Vec::new(),
            capacity,
        })
    }

    /// Adds a tensor (not yet backed by memory) and returns its index.
    pub fn add_tensor(&mut self, ty: GgmlType, ne: &[i64], name: &str) -> usize {
        assert!(self.tensors.len() < self.capacity, "tensor arena is full");
        assert!(self.buffer.is_null(), "tensor arena is already allocated");
        let t = new_tensor_in(self.ctx.as_ptr(), ty, ne);
        set_name(t, name);
        self.tensors.push(t.raw);
        self.tensors.len() - 1
    }

    pub fn tensor(&self, index: usize) -> Tensor<'_> {
        Tensor {
            raw: self.tensors[index],
            _ctx: PhantomData,
        }
    }

    /// Allocates one zeroed backend buffer for every tensor of the arena; returns its size.
    pub fn allocate(&mut self, backend: &GgmlBackend) -> Result<usize, GgmlError> {
        // SAFETY: ctx is live and no_alloc; the returned buffer is owned by self.
        let buf =
            unsafe { sys::ggml_backend_alloc_ctx_tensors(self.ctx.as_ptr(), backend.raw.as_ptr()) };
        if buf.is_null() {
            return Err(GgmlError::Alloc {
                what: "tensor arena",
                bytes: self
                    .tensors
                    .iter()
                    .map(|t| {
                        Tensor {
                            raw: *t,
                            _ctx: PhantomData,
                        }
                        .n_bytes()
                    })
                    .sum(),
            });
        }
        self.buffer = buf;
        self.clear();
        Ok(self.buffer_bytes())
    }

    /// Weights used in place from a read-only memory map: the mapped bytes become one
    /// CPU backend buffer and each tensor points into it. No copy, no dequantization.
    /// The caller keeps `bytes` mapped and unchanged for as long as the arena lives.
    pub fn from_mapped(
        bytes: &[u8],
        placements: &[WeightPlacement<'_>],
    ) -> Result<Self, GgmlError> {
        let mut arena = TensorArena::new(placements.len())?;
        for p in placements {
            arena.add_tensor(p.ty, &p.ne, p.name);
        }
        let base = bytes.as_ptr() as *mut c_void;
        // SAFETY: ggml only reads weight tensors (they are never graph outputs or copy
        // destinations), so wrapping read-only mapped memory is sound; the pointer and
        // length describe the caller's live mapping.
        let buf = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(base, bytes.len()) };
        if buf.is_null() {
            return Err(GgmlError::Alloc {
                what: "mapped weights",
                bytes: bytes.len(),
            });
        }
        arena.buffer = buf;
        for (i, p) in placements.iter().enumerate() {
            let t = arena.tensor(i);
            let end = p.offset.checked_add(p.n_bytes);
            if end.is_none_or(|e| e > bytes.len()) || t.n_bytes() != p.n_bytes {
                return Err(GgmlError::Placement {
                    name: p.name.to_string(),
                });
            }
            // SAFETY: offset + size lie inside the buffer (checked above); the
            // tensor is fresh and unallocated.
            let status = unsafe {
                sys::ggml_backend_tensor_alloc(
                    buf,
                    t.ptr(),
                    (base as *mut u8).add(p.offset) as *mut c_void,
                )
            };
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(GgmlError::Placement {
                    name: p.name.to_string(),
                });
            }
        }
        Ok(arena)
    }

    /// A copy of every tensor of this (allocated, host-readable) arena in `backend`'s
    /// device memory, for backends that cannot read the mapped weights in place.
    /// Names, types and shapes are kept; bytes are copied as they are.
    pub fn copy_to_device(&self, backend: &GgmlBackend) -> Result<TensorArena, GgmlError> {
        // SAFETY: a non-null buffer of self is live.
        if self.buffer.is_null() || !unsafe { sys::ggml_backend_buffer_is_host(self.buffer) } {
            return Err(GgmlError::Other(
                "only weights in host memory can be copied to a device".into(),
            ));
        }
        let mut copy = TensorArena::new(self.tensors.len())?;
        for t in &self.tensors {
            // SAFETY: `t` is a live tensor of self; the new context has room reserved
            // for one tensor's metadata per source tensor.
            let dup = unsafe { sys::ggml_dup_tensor(copy.ctx.as_ptr(), t.as_ptr()) };
            let dup = Tensor::from_raw(dup);
            // SAFETY: ggml copies the source's NUL-terminated name into the tensor.
            unsafe { sys::ggml_set_name(dup.ptr(), sys::ggml_get_name(t.as_ptr())) };
            copy.tensors.push(dup.raw);
        }
        let total: usize = self
            .tensors
            .iter()
            .map(|t| {
                Tensor {
                    raw: *t,
                    _ctx: PhantomData,
                }
                .n_bytes()
            })
            .sum();
        // SAFETY: the new context is live and no_alloc; the buffer becomes copy's.
        let buf = unsafe {
            sys::ggml_backend_alloc_ctx_tensors_from_buft(
                copy.ctx.as_ptr(),
                backend.default_buffer_type(),
            )
        };
        if buf.is_null() {
            return Err(GgmlError::Alloc {
                what: "device weights",
                bytes: total,
            });
        }
        copy.buffer = buf;
        for (src, dst) in self.tensors.iter().zip(&copy.tensors) {
            // SAFETY: metadata read of live tensors.
            let (data, bytes) = unsafe { ((*src.as_ptr()).data, sys::ggml_nbytes(src.as_ptr())) };
            if data.is_null() {
                return Err(GgmlError::Placement {
                    // SAFETY: the tensor's name is a NUL-terminated array it owns.
                    name: unsafe { c_text(sys::ggml_get_name(src.as_ptr())) },
                });
            }
            // SAFETY: the source holds `bytes` host-readable bytes at `data` (the
            // arena was built from a mapping or a host buffer); the destination has
            // the same type and shape, so the same size, in the new buffer.
            unsafe { sys::ggml_backend_tensor_set(dst.as_ptr(), data, 0, bytes) };
        }
        Ok(copy)
    }

    pub fn clear(&self) {
        if !self.buffer.is_null() {
            // SAFETY: live buffer owned by self.
            unsafe { sys::ggml_backend_buffer_clear(self.buffer, 0) };
        }
    }

    pub fn buffer_bytes(&self) -> usize {
        if self.buffer.is_null() {
            0
        } else {
            // SAFETY: live buffer owned by self.
            unsafe { sys::ggml_backend_buffer_get_size(self.buffer) }
        }
    }
}

impl Drop for TensorArena {
    fn drop(&mut self) {
        // SAFETY: we own both; tensors handed out borrow self so none outlive this.
        unsafe {
            if !self.buffer.is_null() {
                sys::ggml_backend_buffer_free(self.buffer);
            }
            sys::ggml_free(self.ctx.as_ptr());
        }
    }
}

// SAFETY: the arena's metadata is immutable after allocation; buffer contents are only
// written through ggml calls made by the one thread that holds the arena.
unsafe impl Send for TensorArena {}
// SAFETY: shared references only read metadata or run read-only ggml calls.
unsafe impl Sync for TensorArena {}

fn new_tensor_in<'a>(ctx: *mut sys::ggml_context, ty: GgmlType, ne: &[i64]) -> Tensor<'a> {
    assert!((1..=4).contains(&ne.len()));
    // SAFETY: ctx is a live context with room reserved for this tensor's metadata.
    let raw = unsafe { sys::ggml_new_tensor(ctx, raw_type(ty), ne.len() as i32, ne.as_ptr()) };
    Tensor::from_raw(raw)
}

fn set_name(t: Tensor<'_>, name: &str) {
    let c = CString::new(name.replace('\0', "")).unwrap_or_default();
    // SAFETY: ggml copies (and truncates) the name into the tensor's fixed buffer.
    unsafe { sys::ggml_set_name(t.ptr(), c.as_ptr()) };
}

/// Reuses graph memory across forward passes (ggml's graph allocator).
pub struct GraphAllocator {
    raw: NonNull<sys::ggml_gallocr>,
}

impl GraphAllocator {
    pub fn new(backend: &GgmlBackend) -> Result<Self, GgmlError> {
        // SAFETY: buffer type of a live backend.
        let raw = unsafe { sys::ggml_gallocr_new(backend.default_buffer_type()) };
        Ok(GraphAllocator {
            raw: NonNull::new(raw).ok_or(GgmlError::Alloc {
                what: "graph allocator",
                bytes: 0,
            })?,
        })
    }

    pub fn allocate(&mut self, graph: &Graph<'_>) -> Result<(), GgmlError> {
        // SAFETY: live allocator and graph; tensors already placed are left alone.
        if unsafe { sys::ggml_gallocr_alloc_graph(self.raw.as_ptr(), graph.raw) } {
            Ok(())
        } else {
            Err(GgmlError::Alloc {
                what: "compute graph",
                bytes: 0,
            })
        }
    }

    pub fn buffer_bytes(&self) -> usize {
        // SAFETY: live allocator; buffer 0 is the only one (single buffer type).
        unsafe { sys::ggml_gallocr_get_buffer_size(self.raw.as_ptr(), 0) }
    }
}

impl Drop for GraphAllocator {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { sys::ggml_gallocr_free(self.raw.as_ptr()) };
    }
}

// SAFETY: used only through &mut self.
unsafe impl Send for GraphAllocator {}

/// A built compute graph.
pub struct Graph<'a> {
    raw: *mut sys::ggml_cgraph,
    _ctx: PhantomData<&'a ()>,
}

/// Rope parameters as ggml_rope_ext takes them.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub n_dims: i32,
    pub mode: i32,
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// The context one forward pass builds its graph in. Ops mirror ggml's names.
pub struct GraphCtx {
    ctx: NonNull<sys::ggml_context>,
    graph: NonNull<sys::ggml_cgraph>,
}

impl GraphCtx {
    pub fn new(max_nodes: usize) -> Result<Self, GgmlError> {
        // SAFETY: plain size queries.
        let mem_size = unsafe {
            sys::ggml_tensor_overhead() * max_nodes
                + sys::ggml_graph_overhead_custom(max_nodes, false)
        };
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml_init copies params; null handled.
        let ctx = unsafe { sys::ggml_init(params) };
        let ctx = NonNull::new(ctx).ok_or(GgmlError::ContextInit(mem_size))?;
        // SAFETY: live context sized for max_nodes graph nodes plus the graph itself.
        let graph = unsafe { sys::ggml_new_graph_custom(ctx.as_ptr(), max_nodes, false) };
        let graph = NonNull::new(graph).ok_or(GgmlError::ContextInit(mem_size))?;
        Ok(GraphCtx { ctx, graph })
    }

    fn c(&self) -> *mut sys::ggml_context {
        self.ctx.as_ptr()
    }

    /// A graph input; its data is written after allocation with `Tensor::write`.
    pub fn input(&self, ty: GgmlType, ne: &[i64], name: &str) -> Tensor<'_> {
        let t = new_tensor_in(self.c(), ty, ne);
        set_name(t, name);
        // SAFETY: live tensor of this context.
        unsafe { sys::ggml_set_input(t.ptr()) };
        t
    }

    pub fn mark_output(&self, t: Tensor<'_>) {
        // SAFETY: live tensor.
        unsafe { sys::ggml_set_output(t.ptr()) };
    }

    /// Adds `t` and everything it depends on to the graph, after what is already
    /// there: the order of `expand` calls is the order of side effects (cache writes).
    pub fn expand(&self, t: Tensor<'_>) {
        // SAFETY: live graph; t belongs to this or a longer-lived context.
        unsafe { sys::ggml_build_forward_expand(self.graph.as_ptr(), t.ptr()) };
    }

    /// The graph tensor (input or node) with this name, if the graph uses it.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: live graph; ggml compares names and returns a tensor of this
        // graph (or null).
        let t = unsafe { sys::ggml_graph_get_tensor(self.graph.as_ptr(), c.as_ptr()) };
        NonNull::new(t).map(|raw| Tensor {
            raw,
            _ctx: PhantomData,
        })
    }

    pub fn name(&self, t: Tensor<'_>, name: &str) {
        set_name(t, name);
    }

    pub fn graph(&self) -> Graph<'_> {
        Graph {
            raw: self.graph.as_ptr(),
            _ctx: PhantomData,
        }
    }

    pub fn mul_mat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: live context and tensors; shapes are the caller's contract.
        Tensor::from_raw(unsafe { sys::ggml_mul_mat(self.c(), a.ptr(), b.ptr()) })
    }

    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_mul(self.c(), a.ptr(), b.ptr()) })
    }

    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_add(self.c(), a.ptr(), b.ptr()) })
    }

    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_scale(self.c(), a.ptr(), s) })
    }

    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_rms_norm(self.c(), a.ptr(), eps) })
    }

    pub fn get_rows<'a>(&'a self, a: Tensor<'a>, rows: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_get_rows(self.c(), a.ptr(), rows.ptr()) })
    }

    /// silu(gate) * up
    pub fn swiglu<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_swiglu_split(self.c(), gate.ptr(), up.ptr()) })
    }

    pub fn reshape_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        // SAFETY: as for mul_mat (ggml checks element counts).
        Tensor::from_raw(unsafe { sys::ggml_reshape_2d(self.c(), a.ptr(), ne0, ne1) })
    }

    pub fn reshape_3d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_reshape_3d(self.c(), a.ptr(), ne0, ne1, ne2) })
    }

    pub fn view_2d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne0: i64,
        ne1: i64,
        nb1: usize,
        offset: usize,
    ) -> Tensor<'a> {
        // SAFETY: as for mul_mat; the view stays inside `a` by the caller's contract.
        Tensor::from_raw(unsafe { sys::ggml_view_2d(self.c(), a.ptr(), ne0, ne1, nb1, offset) })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn view_3d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne: [i64; 3],
        nb1: usize,
        nb2: usize,
        offset: usize,
    ) -> Tensor<'a> {
        // SAFETY: as for view_2d.
        Tensor::from_raw(unsafe {
            sys::ggml_view_3d(self.c(), a.ptr(), ne[0], ne[1], ne[2], nb1, nb2, offset)
        })
    }

    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe {
            sys::ggml_permute(self.c(), a.ptr(), axes[0], axes[1], axes[2], axes[3])
        })
    }

    /// `a` and `b` joined along dimension `dim` (their other dimensions agree).
    pub fn concat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, dim: i32) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_concat(self.c(), a.ptr(), b.ptr(), dim) })
    }

    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_cont(self.c(), a.ptr()) })
    }

    pub fn cast<'a>(&'a self, a: Tensor<'a>, ty: GgmlType) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_cast(self.c(), a.ptr(), raw_type(ty)) })
    }

    pub fn cpy<'a>(&'a self, src: Tensor<'a>, dst: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_cpy(self.c(), src.ptr(), dst.ptr()) })
    }

    /// Writes the rows of `src` into `dst` at the row indices `idx` (I64); returns the
    /// node that must be part of the graph for the write to happen.
    pub fn set_rows<'a>(&'a self, dst: Tensor<'a>, src: Tensor<'a>, idx: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        Tensor::from_raw(unsafe { sys::ggml_set_rows(self.c(), dst.ptr(), src.ptr(), idx.ptr()) })
    }

    pub fn rope<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        freq_factors: Option<Tensor<'a>>,
        p: &RopeParams,
    ) -> Tensor<'a> {
        let ff = freq_factors.map_or(std::ptr::null_mut(), |t| t.ptr());
        // SAFETY: as for mul_mat; a null freq-factors tensor means "none" to ggml.
        Tensor::from_raw(unsafe {
            sys::ggml_rope_ext(
                self.c(),
                a.ptr(),
                pos.ptr(),
                ff,
                p.n_dims,
                p.mode,
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// Fused attention with f32 accumulation.
    /// q: [d, n_tokens, n_head], k/v: [d, n_kv, n_kv_head], mask: [n_kv, n_tokens] f16.
    /// Result: [d, n_head, n_tokens].
    pub fn flash_attn<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        v: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
    ) -> Tensor<'a> {
        // SAFETY: as for mul_mat.
        let t = unsafe {
            sys::ggml_flash_attn_ext(
                self.c(),
                q.ptr(),
                k.ptr(),
                v.ptr(),
                mask.ptr(),
                scale,
                0.0,
                0.0,
            )
        };
        // SAFETY: t is the live node just created.
        unsafe { sys::ggml_prec_set_acc(t, sys::GGML_PREC_F32) };
        Tensor::from_raw(t)
    }
}

impl GraphCtx {
    /// Attention of one token (`q`: `[head_dim, n_head, 1]` f32, after RoPE) over the
    /// first `mask.ne[0]` cells of a cache slot pair (quantized, or f16 in a plan
    /// mixing types), by kvsharer's own kernel (`backend::ggml::decode_attention`).
    /// Result: `[head_dim, n_head, 1]`, as `flash_attn` gives. Only for the types in `DECODE_CACHE_TYPES`.
    pub fn decode_attention<'a>(
        &'a self,
        q: Tensor<'a>,
        k_slot: Tensor<'a>,
        v_slot: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
    ) -> Tensor<'a> {
        let [hd, n_head, ..] = q.ne();
        let mut args = [q.ptr(), k_slot.ptr(), v_slot.ptr(), mask.ptr()];
        // The scale travels in the userdata pointer's bits: it is all the ops need
        // beyond their tensors, and a pointer to it would have to outlive the graph.
        let scale_bits = scale.to_bits() as usize as *mut c_void;
        // SAFETY: the args are live tensors of this context; ggml copies the array.
        let partials = Tensor::from_raw(unsafe {
            sys::ggml_custom_4d(
                self.c(),
                raw_type(GgmlType::F32),
                decode_attention::partial_len(hd as usize) as i64,
                n_head,
                decode_attention::CACHE_CHUNKS as i64,
                1,
                args.as_mut_ptr(),
                args.len() as i32,
                Some(decode_attention_partials),
                -1, // GGML_N_TASKS_MAX: every thread
                scale_bits,
            )
        });
        let mut args = [partials.ptr(), q.ptr(), k_slot.ptr(), mask.ptr()];
        // SAFETY: as above.
        Tensor::from_raw(unsafe {
            sys::ggml_custom_4d(
                self.c(),
                raw_type(GgmlType::F32),
                hd,
                n_head,
                1,
                1,
                args.as_mut_ptr(),
                args.len() as i32,
                Some(decode_attention_reduce),
                -1,
                scale_bits,
            )
        })
    }
}

/// The geometry of a `decode_attention` op, from its source tensors
/// (`q`, `k_slot`, `mask` at `srcs[0..3]`).
fn decode_geometry(
    q: &sys::ggml_tensor,
    k: &sys::ggml_tensor,
    mask: &sys::ggml_tensor,
    userdata: *mut c_void,
) -> decode_attention::Geometry {
    let head_dim = q.ne[0] as usize;
    decode_attention::Geometry {
        head_dim,
        n_head: q.ne[1] as usize,
        n_head_kv: k.ne[0] as usize / head_dim,
        n_kv: mask.ne[0] as usize,
        n_chunks: decode_attention::CACHE_CHUNKS,
        scale: f32::from_bits(userdata as usize as u32),
    }
}

/// A cache slot's rows `0..n_kv` as bytes.
///
/// # Safety
/// `t` must be a live, allocated 2-D cache slot with at least `n_kv` rows.
unsafe fn cache_rows(
    t: &sys::ggml_tensor,
    n_kv: usize,
    n_head_kv: usize,
) -> decode_attention::CacheRows<'_> {
    let row_bytes = t.nb[1];
    decode_attention::CacheRows {
        // SAFETY: the slot holds ne[1] >= n_kv rows of nb[1] bytes (caller's contract).
        data: unsafe { std::slice::from_raw_parts(t.data as *const u8, n_kv * row_bytes) },
        ty: GgmlType::from_u32(t.type_).expect("a cache type kvsharer created"),
        row_bytes,
        head_bytes: row_bytes / n_head_kv,
    }
}

/// ggml calls this on every thread (`ith` of `nth`) for the partials op.
unsafe extern "C" fn decode_attention_partials(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    userdata: *mut c_void,
) {
    // SAFETY: ggml passes the live op node; its sources are the four tensors
    // `decode_attention` gave it, computed before this op runs.
    let (dst, q, k, v, mask) = unsafe {
        let d = &*dst;
        (d, &*d.src[0], &*d.src[1], &*d.src[2], &*d.src[3])
    };
    let geo = decode_geometry(q, k, mask, userdata);
    // SAFETY: q is a contiguous [head_dim, n_head] f32 tensor; the mask row holds
    // n_kv f16 values; the slots hold n_ctx >= n_kv rows.
    let (q, mask, k, v) = unsafe {
        (
            std::slice::from_raw_parts(q.data as *const f32, geo.head_dim * geo.n_head),
            std::slice::from_raw_parts(mask.data as *const u16, geo.n_kv),
            cache_rows(k, geo.n_kv, geo.n_head_kv),
            cache_rows(v, geo.n_kv, geo.n_head_kv),
        )
    };
    for task in (ith as usize..geo.n_tasks()).step_by(nth.max(1) as usize) {
        let (offset, len) = geo.task_region(task);
        // SAFETY: tasks' regions are disjoint and inside dst ([p, n_head, n_chunks]
        // f32, contiguous), and each task runs on exactly one thread.
        let out =
            unsafe { std::slice::from_raw_parts_mut((dst.data as *mut f32).add(offset), len) };
        decode_attention::partials(&geo, q, &k, &v, mask, task, out);
    }
}

/// ggml calls this on every thread for the merge op; threads split the query heads.
unsafe extern "C" fn decode_attention_reduce(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    userdata: *mut c_void,
) {
    // SAFETY: as for the partials op; src[0] is the finished partials tensor.
    let (dst, partials, q, k, mask) = unsafe {
        let d = &*dst;
        (d, &*d.src[0], &*d.src[1], &*d.src[2], &*d.src[3])
    };
    let geo = decode_geometry(q, k, mask, userdata);
    let per_thread = geo.n_head.div_ceil(nth.max(1) as usize);
    let first = (ith as usize * per_thread).min(geo.n_head);
    let last = (first + per_thread).min(geo.n_head);
    if first == last {
        return;
    }
    let p = decode_attention::partial_len(geo.head_dim);
    // SAFETY: partials is contiguous [p, n_head, n_chunks] f32; each thread writes
    // only its own heads' rows of dst ([head_dim, n_head] f32, contiguous).
    let (partials, out) = unsafe {
        (
            std::slice::from_raw_parts(partials.data as *const f32, p * geo.n_head * geo.n_chunks),
            std::slice::from_raw_parts_mut(
                (dst.data as *mut f32).add(first * geo.head_dim),
                (last - first) * geo.head_dim,
            ),
        )
    };
    decode_attention::reduce(&geo, partials, first..last, out);
}

impl Drop for GraphCtx {
    fn drop(&mut self) {
        // SAFETY: owned; tensors and graphs borrow self so none outlive this.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) };
    }
}

/// Bytes of one row of `n` elements of `ty`.
pub fn row_size(ty: GgmlType, n: i64) -> usize {
    // SAFETY: pure arithmetic on ggml's type table.
    unsafe { sys::ggml_row_size(raw_type(ty), n) }
}

/// Quantizes `data` (rows of `n_per_row`) to `ty` with ggml's reference quantizer.
pub fn quantize(ty: GgmlType, data: &[f32], n_per_row: usize) -> Result<Vec<u8>, GgmlError> {
    let raw = raw_type(ty);
    if n_per_row == 0 || !data.len().is_multiple_of(n_per_row) {
        return Err(GgmlError::Other("quantize: data is not whole rows".into()));
    }
    // SAFETY: pure query on ggml's type table for a valid type id.
    let needs_imatrix = unsafe { sys::ggml_quantize_requires_imatrix(raw) };
    // SAFETY: as above.
    let traits = unsafe { &*sys::ggml_get_type_traits(raw) };
    if needs_imatrix || (n_per_row as i64) % traits.blck_size != 0 {
        return Err(GgmlError::Quantize(ty.name()));
    }
    let n_rows = data.len() / n_per_row;
    let out_len = row_size(ty, n_per_row as i64) * n_rows;
    let mut out = vec![0u8; out_len];
    if ty == GgmlType::F32 {
        for (o, v) in out.chunks_exact_mut(4).zip(data) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        return Ok(out);
    }
    // SAFETY: ggml initializes its quantization tables lazily; this call is
    // idempotent and thread-safe.
    unsafe { sys::ggml_quantize_init(raw) };
    // SAFETY: src holds n_rows*n_per_row floats; dst holds exactly the row bytes.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            raw,
            data.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            0,
            n_rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != out_len {
        return Err(GgmlError::Quantize(ty.name()));
    }
    Ok(out)
}

/// Quantizes rows as ggml's CPU backend stores them into a KV cache (`set_rows`
/// and `cpy` call the type's CPU `from_float`), which for some types differs from
/// [`quantize`]'s file quantizer (iq4_nl: no scale search).
pub fn quantize_as_cache(ty: GgmlType, data: &[f32]) -> Result<Vec<u8>, GgmlError> {
    let raw = raw_type(ty);
    // SAFETY: pure queries on ggml's type tables for a valid type id.
    let (traits, cpu) = unsafe {
        (
            &*sys::ggml_get_type_traits(raw),
            sys::ggml_get_type_traits_cpu(raw).as_ref(),
        )
    };
    let from_float = cpu.and_then(|c| c.from_float);
    let Some(from_float) = from_float.filter(|_| traits.blck_size > 0) else {
        return Err(GgmlError::Quantize(ty.name()));
    };
    if !data.len().is_multiple_of(traits.blck_size as usize) {
        return Err(GgmlError::Quantize(ty.name()));
    }
    let mut out = vec![0u8; row_size(ty, data.len() as i64)];
    // SAFETY: `data` holds whole blocks and `out` exactly their bytes.
    unsafe {
        from_float(
            data.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            data.len() as i64,
        )
    };
    Ok(out)
}

/// Dequantizes `n` elements of `ty` stored in `bytes` with ggml's reference routine.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, GgmlError> {
    let raw = raw_type(ty);
    // SAFETY: pure query on ggml's type table for a valid type id.
    let traits = unsafe { &*sys::ggml_get_type_traits(raw) };
    if traits.blck_size <= 0
        || n as i64 % traits.blck_size != 0
        || row_size(ty, n as i64) != bytes.len()
    {
        return Err(GgmlError::Other(format!(
            "dequantize: {} bytes do not hold {n} elements of {}",
            bytes.len(),
            ty.name()
        )));
    }
    let mut out = vec![0f32; n];
    if ty == GgmlType::F32 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return Ok(out);
    }
    let to_float = traits.to_float.ok_or(GgmlError::Other(format!(
        "no dequantizer for {}",
        ty.name()
    )))?;
    // SAFETY: sizes checked above: `bytes` holds exactly n elements of ty.
    unsafe { to_float(bytes.as_ptr() as *const c_void, out.as_mut_ptr(), n as i64) };
    Ok(out)
}

/// f32 -> IEEE half bits, as ggml stores F16.
pub fn f32_to_f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// ggml's own block size, bytes per block and name for a raw type id, or `None`
/// for ids ggml does not know (checks our type table against the linked library).
pub fn raw_type_traits(id: u32) -> Option<(i64, usize, String)> {
    if id >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: `id` is below GGML_TYPE_COUNT, so these index ggml's static type table.
    let (block, size, name) = unsafe {
        (
            sys::ggml_blck_size(id as sys::ggml_type),
            sys::ggml_type_size(id as sys::ggml_type),
            sys::ggml_type_name(id as sys::ggml_type),
        )
    };
    if block == 0 || name.is_null() {
        return None;
    }
    // SAFETY: ggml returns a pointer to a static NUL-terminated name (checked non-null).
    let name = unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    Some((block, size, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_backend_is_the_cpu_device() {
        let b = GgmlBackend::cpu(2).unwrap();
        assert!(b.is_cpu());
        assert_eq!(b.kind(), DeviceKind::Cpu);
        assert_eq!(b.threads(), 2);
        let b = GgmlBackend::on_device(DeviceKind::Cpu, 3).unwrap();
        assert!(b.is_cpu());
        assert_eq!(b.threads(), 3);
    }

    #[test]
    fn a_backend_missing_from_the_build_names_the_feature() {
        for kind in [DeviceKind::Cuda, DeviceKind::Vulkan, DeviceKind::Metal] {
            if kind.compiled_in() {
                continue;
            }
            let err = GgmlBackend::on_device(kind, 1).err().unwrap();
            assert!(
                matches!(err, GgmlError::BackendNotBuilt { backend } if backend == kind.name()),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("rebuild with --features {}", kind.name())),
                "{text}"
            );
        }
    }

    /// The device upload path, run with the CPU as the target so it is checked on
    /// every machine: every tensor keeps its name, type, shape and exact bytes.
    #[test]
    fn copy_to_device_keeps_every_tensor() {
        let backend = GgmlBackend::cpu(1).unwrap();
        let mut src = TensorArena::new(3).unwrap();
        let a = src.add_tensor(GgmlType::F32, &[5, 3], "a.weight");
        let b = src.add_tensor(GgmlType::I32, &[7], "b.weight");
        let q = src.add_tensor(GgmlType::Q8_0, &[64, 2], "q.weight");
        src.allocate(&backend).unwrap();
        let fa: Vec<f32> = (0..15).map(|i| i as f32 * 0.25 - 1.0).collect();
        let ib: Vec<i32> = (0..7).map(|i| i * 1000 - 3).collect();
        let row: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let qb = quantize(GgmlType::Q8_0, &row, 64).unwrap();
        src.tensor(a).write(&fa);
        src.tensor(b).write(&ib);
        src.tensor(q).write(&qb);

        let copy = src.copy_to_device(&backend).unwrap();
        for i in [a, b, q] {
            let (s, d) = (src.tensor(i), copy.tensor(i));
            assert_eq!(s.ne(), d.ne());
            assert_eq!(s.meta().type_, d.meta().type_);
            // SAFETY: names of live tensors, NUL-terminated by ggml.
            let (sn, dn) = unsafe {
                (
                    c_text(sys::ggml_get_name(s.ptr())),
                    c_text(sys::ggml_get_name(d.ptr())),
                )
            };
            assert_eq!(sn, dn);
            assert_ne!(s.meta().data, d.meta().data, "{sn} was not copied");
            assert_eq!(d.read_bytes(0, d.n_bytes()), s.read_bytes(0, s.n_bytes()));
        }
        assert_eq!(copy.tensor(a).read_f32(), fa);
        // The copy is independent of its source.
        src.tensor(a).write(&[0f32; 15]);
        assert_eq!(copy.tensor(a).read_f32(), fa);
    }

    #[test]
    fn copy_to_device_of_an_unallocated_arena_is_an_error() {
        let backend = GgmlBackend::cpu(1).unwrap();
        let mut src = TensorArena::new(1).unwrap();
        src.add_tensor(GgmlType::F32, &[4], "unplaced");
        assert!(src.copy_to_device(&backend).is_err());
    }

    #[test]
    fn the_cpu_supports_every_graph() {
        let backend = GgmlBackend::cpu(1).unwrap();
        let g = GraphCtx::new(16).unwrap();
        let x = g.input(GgmlType::F32, &[4, 2], "x");
        g.expand(g.rms_norm(x, 1e-5));
        assert!(backend.check_supported(&g.graph()).is_ok());
    }
}
