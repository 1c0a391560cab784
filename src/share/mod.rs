//! The sharing search (calibration): the calibration set and the paper's search
//! (`calibrate`), the stepwise strategies (`search`), the one evaluator they run on
//! over any `RunState` (`evaluator`), and what a search leaves behind (`report`).
//! The map itself and its GGUF round trip live in `kvplan`.

pub mod calibrate;
pub mod evaluator;
pub mod report;
pub mod search;
