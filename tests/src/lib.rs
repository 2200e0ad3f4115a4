//! Shared helpers for cross-process tests and benchmarks.
