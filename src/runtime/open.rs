//! `open`: a run state on the backend a user chose, with `auto`'s fallback to the
//! CPU explained rather than silent.

use super::error::RuntimeError;
use super::options::RunOptions;
use super::state::RunState;
use crate::backend::ggml::{DeviceKind, Session};
use crate::kvplan::{KvPlan, ShareMap};
use crate::model::Model;

/// The backend a user asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// ggml on the CPU.
    Cpu,
    /// The WGSL forward pass on any wgpu adapter, software ones included.
    Wgpu,
    /// wgpu on a real GPU when there is one and it can run the options; else the CPU.
    Auto,
    /// ggml's own GPU backends (each needs a build with that cargo feature).
    Cuda,
    Vulkan,
    Metal,
}

impl BackendChoice {
    pub const ALL: [BackendChoice; 6] = [
        BackendChoice::Cpu,
        BackendChoice::Wgpu,
        BackendChoice::Auto,
        BackendChoice::Cuda,
        BackendChoice::Vulkan,
        BackendChoice::Metal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Cpu => "cpu",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Auto => "auto",
            BackendChoice::Cuda => "cuda",
            BackendChoice::Vulkan => "vulkan",
            BackendChoice::Metal => "metal",
        }
    }

    /// The ggml device this choice runs the graph on directly (`wgpu` and `auto`
    /// are decided when opening).
    pub fn ggml_device(self) -> Option<DeviceKind> {
        match self {
            BackendChoice::Cpu => Some(DeviceKind::Cpu),
            BackendChoice::Cuda => Some(DeviceKind::Cuda),
            BackendChoice::Vulkan => Some(DeviceKind::Vulkan),
            BackendChoice::Metal => Some(DeviceKind::Metal),
            BackendChoice::Wgpu | BackendChoice::Auto => None,
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        BackendChoice::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown backend '{s}'"))
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A run state, and why `auto` did not take the GPU (when it did not).
pub struct Opened<'m> {
    pub state: Box<dyn RunState<'m> + 'm>,
    pub fallback: Option<String>,
}

/// Opens a run state for `model` with `map` and `opts` (its `type_k`/`type_v` for
/// every slot) on `choice`.
pub fn open<'m>(
    choice: BackendChoice,
    model: &'m Model,
    map: &ShareMap,
    opts: &RunOptions,
) -> Result<Opened<'m>, RuntimeError> {
    open_plan(
        choice,
        model,
        &KvPlan::uniform(map, opts.type_k, opts.type_v),
        opts,
    )
}

/// Opens a run state for `model` with `plan` and `opts` on `choice`. Every backend
/// checks the plan and `opts` against its own capabilities and refuses what it
/// cannot do; `auto` then takes the CPU and says why in `fallback`.
pub fn open_plan<'m>(
    choice: BackendChoice,
    model: &'m Model,
    plan: &KvPlan,
    opts: &RunOptions,
) -> Result<Opened<'m>, RuntimeError> {
    let mut fallback = None;
    if let Some(device) = choice.ggml_device() {
        return Ok(Opened {
            state: Box::new(Session::with_plan(device, model, plan, opts)?),
            fallback,
        });
    }
    #[cfg(feature = "wgpu")]
    {
        use crate::backend::wgpu::{AdapterPolicy, GpuSession};
        let policy = match choice {
            BackendChoice::Auto => AdapterPolicy::HardwareOnly,
            _ => AdapterPolicy::Any,
        };
        match GpuSession::open_plan(model, plan, opts, policy) {
            Ok(s) => {
                return Ok(Opened {
                    state: Box::new(s),
                    fallback,
                })
            }
            Err(e @ RuntimeError::Unsupported { .. }) if choice == BackendChoice::Auto => {
                fallback = Some(format!("{e}; using the CPU backend (ggml)"))
            }
            Err(e) if choice == BackendChoice::Auto => {
                fallback = Some(format!("no usable GPU ({e}); using the CPU backend (ggml)"))
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "wgpu"))]
    {
        if choice == BackendChoice::Wgpu {
            return Err(RuntimeError::NotBuilt {
                backend: "wgpu",
                feature: "wgpu",
            });
        }
        fallback = Some("this build has no wgpu backend; using the CPU backend (ggml)".into());
    }
    Ok(Opened {
        state: Box::new(Session::with_plan(DeviceKind::Cpu, model, plan, opts)?),
        fallback,
    })
}
