//! Adapter choice and device creation, with the failures named.

use std::sync::Arc;

use super::GpuError;

/// Which adapters `GpuContext::new` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterPolicy {
    /// The best adapter there is, software renderers (lavapipe, WARP) included:
    /// `--backend wgpu` and the parity tests.
    Any,
    /// Only a real GPU: `--backend auto`, where a software adapter would be slower
    /// than ggml's CPU path.
    HardwareOnly,
}

/// An open wgpu device and queue, and what they run on. Clones are handles to the
/// same device and queue.
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// One allocation per opened device, shared by its clones: `same_device`
    /// compares these, since wgpu's device ids repeat across instances.
    opened: Arc<()>,
}

fn preference(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl GpuContext {
    pub fn new(policy: AdapterPolicy) -> Result<Self, GpuError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY.with_env(),
            // No API validation layers unless WGPU_DEBUG/WGPU_VALIDATION ask for them.
            flags: wgpu::InstanceFlags::empty().with_env(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        adapters.sort_by_key(|a| preference(a.get_info().device_type));
        let adapter = adapters.into_iter().next().ok_or(GpuError::NoAdapter)?;
        let info = adapter.get_info();
        if policy == AdapterPolicy::HardwareOnly && info.device_type == wgpu::DeviceType::Cpu {
            return Err(GpuError::SoftwareOnly(describe(&info)));
        }
        // The adapter's own limits: a model's largest tensor decides what it needs,
        // and GpuSession checks that against these with a named error.
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kvsharer"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: describe(&info),
            message: e.to_string(),
        })?;
        // Errors outside an error scope would otherwise panic inside wgpu; every
        // operation that can fail runs inside a scope, so this only reports.
        device.on_uncaptured_error(Arc::new(|e| eprintln!("wgpu: uncaptured error: {e}")));
        Ok(GpuContext {
            device,
            queue,
            info,
            opened: Arc::new(()),
        })
    }

    /// "NVIDIA GeForce RTX 4090 (Vulkan, discrete GPU, driver ...)".
    pub fn adapter_description(&self) -> String {
        describe(&self.info)
    }

    /// True when `other` is a clone of this context (one device and queue).
    pub fn same_device(&self, other: &GpuContext) -> bool {
        Arc::ptr_eq(&self.opened, &other.opened)
    }

    /// True for software renderers such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    pub(crate) fn limits(&self) -> wgpu::Limits {
        self.device.limits()
    }

    /// Runs `f` inside validation and out-of-memory error scopes, turning what they
    /// catch into `GpuError::Device`.
    pub(crate) fn scoped<T>(
        &self,
        during: &'static str,
        f: impl FnOnce() -> Result<T, GpuError>,
    ) -> Result<T, GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(GpuError::Device {
                during,
                message: flatten(&e.to_string()),
            });
        }
        out
    }
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => "discrete GPU",
        wgpu::DeviceType::IntegratedGpu => "integrated GPU",
        wgpu::DeviceType::VirtualGpu => "virtual GPU",
        wgpu::DeviceType::Cpu => "software rasterizer on the CPU",
        wgpu::DeviceType::Other => "other",
    };
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if driver.is_empty() {
        format!("{} ({:?}, {kind})", info.name, info.backend)
    } else {
        format!("{} ({:?}, {kind}, {driver})", info.name, info.backend)
    }
}

/// wgpu's errors span several lines; the CLI prints one.
pub(crate) fn flatten(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
