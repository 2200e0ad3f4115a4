//! Raw Automerge bytes as `POST …/automerge` imports them: refused, or merged into a
//! document that reads and shows its conflicts without panicking. The op count that
//! bounds a write's cost is checked against Automerge's own: it may never count fewer ops
//! than Automerge decodes, or the bound would let a bomb through.
#![no_main]

use automerge::{Automerge, ReadDoc};
use libfuzzer_sys::fuzz_target;
use tidesync_core::model::{automerge_bytes, conflicts, json, op_count};

fuzz_target!(|data: &[u8]| {
    tidesync_fuzz::contain_panics();
    let counted = op_count::count_ops(data);
    // Within the bound, Automerge's own count must not be higher (beyond it the bytes
    // are refused, and parsing them here would only spend the fuzzer's time).
    if let Ok(counted) = counted {
        if counted <= op_count::MAX_OPS && automerge_bytes::check_chunk_kinds(data).is_ok() {
            if let Ok(change) = automerge::Change::try_from(data) {
                assert!(counted >= change.len() as u64, "undercounted a change");
            }
        }
    }
    let Ok(doc) = automerge_bytes::import(&Automerge::new(), data) else {
        return;
    };
    let counted = counted.expect("imported bytes that could not be counted");
    assert!(counted >= doc.stats().num_ops, "undercounted a document");
    let _ = json::read_root(&doc);
    let _ = json::is_deleted(&doc);
    let _ = conflicts(&doc);
});
