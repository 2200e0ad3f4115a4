//! Raw Automerge bytes as `POST …/automerge` imports them: refused, or merged into a
//! document that reads and shows its conflicts without panicking.
#![no_main]

use automerge::Automerge;
use libfuzzer_sys::fuzz_target;

/// Tidesync contains panics inside Automerge's parser (see `model::automerge_bytes`), but
/// libFuzzer's hook aborts on any panic, caught or not. Keep the default hook instead: an
/// uncaught panic still ends the run, since libfuzzer-sys aborts when one escapes.
fn contain_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}
use tidesync_core::model::{automerge_bytes, conflicts, json};

fuzz_target!(|data: &[u8]| {
    contain_panics();
    let Ok(doc) = automerge_bytes::import(&Automerge::new(), data) else {
        return;
    };
    let _ = json::read_root(&doc);
    let _ = json::is_deleted(&doc);
    let _ = conflicts(&doc);
});
