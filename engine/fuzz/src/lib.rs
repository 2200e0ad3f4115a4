//! What the fuzz targets share.

/// Tidesync contains panics inside Automerge's parser (see `model::automerge_bytes`), but
/// libFuzzer's hook aborts on any panic, caught or not. Install a silent hook instead: an
/// uncaught panic still ends the run, since libfuzzer-sys aborts when one escapes.
pub fn contain_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}
