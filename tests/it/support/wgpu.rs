//! Opening the wgpu backend in a test, as every wgpu suite does: without an adapter
//! the test is skipped (the reason printed), any other error fails it.

use kvsharer::backend::wgpu::GpuError;

use super::{skip, NO_WGPU_ADAPTER};

/// What `opened` holds (a kernel harness, a session, an evaluator), or `None`, with
/// `TEST: SKIPPED: no wgpu adapter ...` printed, when wgpu found no adapter. Any
/// other error fails `test`.
/// Works for any error that shows the backend's (`GpuError` itself, or a library
/// error wrapping it transparently: `RuntimeError`, `CalibrateError`).
pub fn or_skip_without_adapter<T, E: std::fmt::Display>(
    test: &str,
    opened: Result<T, E>,
) -> Option<T> {
    match opened {
        Ok(t) => Some(t),
        Err(e) if e.to_string() == GpuError::NoAdapter.to_string() => {
            skip(test, &format!("{NO_WGPU_ADAPTER} ({e})"));
            None
        }
        Err(e) => panic!("{test}: the wgpu backend failed to start: {e}"),
    }
}
