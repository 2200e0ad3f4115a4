//! JSON content through the model: checks, a replace, a merge patch, and reading back.
//! What passes the checks and is written reads back as written.
#![no_main]

use automerge::Automerge;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tidesync_core::model::{conflicts, json};

fn object(data: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(data) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    // Two documents from one input: the content, then a patch.
    let (a, b) = data.split_at(data.iter().position(|&c| c == 0).unwrap_or(data.len()));
    let Some(content) = object(a) else {
        return;
    };
    if json::check_root_keys(&content).is_err() || json::check_depth(&content).is_err() {
        return;
    }
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    json::write_replace(&mut tx, &content, json::Strings::Auto).expect("a checked object writes");
    tx.commit();
    assert_eq!(json::read_root(&doc).expect("reads"), content);
    let _ = conflicts(&doc);
    if let Some(patch) = b.get(1..).and_then(object) {
        if json::check_root_keys(&patch).is_ok() && json::check_depth(&patch).is_ok() {
            let mut tx = doc.transaction();
            json::write_merge_patch(&mut tx, &patch, json::Strings::Text).expect("a checked patch applies");
            tx.commit();
            let _ = json::read_root(&doc);
        }
    }
});
