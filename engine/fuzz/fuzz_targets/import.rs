//! Raw Automerge bytes as `POST …/automerge` imports them: refused, or merged into a
//! document that reads and shows its conflicts without panicking.
#![no_main]

use automerge::Automerge;
use libfuzzer_sys::fuzz_target;
use tidesync_core::model::{automerge_bytes, conflicts, json};

fuzz_target!(|data: &[u8]| {
    tidesync_fuzz::contain_panics();
    let Ok(doc) = automerge_bytes::import(&Automerge::new(), data) else {
        return;
    };
    let _ = json::read_root(&doc);
    let _ = json::is_deleted(&doc);
    let _ = conflicts(&doc);
});
