//! Tidesync's demo and example apps. Each module is one runnable example (see
//! `examples/*.rs`); its `run` narrates to a writer and returns what it ended with, so
//! the tests in `tests/` check the same code a reader runs.

pub mod automerge_interop;
pub mod demo;
pub mod local;
pub mod model_registry;
pub mod model_rollout;
pub mod offline_todo;
