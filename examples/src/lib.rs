//! Example apps built on Tidesync; see `examples/`.
