//! Blob references: how a document names a blob it depends on.
//!
//! A reference is a JSON object anywhere in a document's content with a string
//! `"@blob"` (the blob's BLAKE3 hash, 64 lowercase or uppercase hex digits) and a number
//! `"size"` (its length in bytes); `"type"` and `"name"` may ride along for people. An
//! object that looks like a reference but is not well formed is plain content: it names
//! nothing, so nothing is fetched for it and it keeps no blob alive.

use serde_json::{Map, Value as Json};

/// The key that marks an object as a blob reference.
pub const BLOB_KEY: &str = "@blob";

/// Most references one document contributes; more are ignored (a document is not a
/// manifest of millions of files, and the index must stay bounded per document).
pub const MAX_REFS_PER_DOC: usize = 4096;

/// A blob a document references.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobRef {
    /// The blob's BLAKE3 hash.
    pub hash: [u8; 32],
    /// Its length in bytes, as the reference states it.
    pub size: u64,
}

/// Parses a BLAKE3 hash written as 64 hex digits.
pub fn parse_blob_hash(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Writes a hash as [`parse_blob_hash`] reads it (lowercase).
pub fn format_blob_hash(hash: &[u8; 32]) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The reference `value` is, if it is one.
pub fn as_blob_ref(value: &Map<String, Json>) -> Option<BlobRef> {
    let hash = parse_blob_hash(value.get(BLOB_KEY)?.as_str()?)?;
    let size = value.get("size")?.as_u64()?;
    Some(BlobRef { hash, size })
}

/// Every blob `content` references, sorted and without repeats, at most
/// [`MAX_REFS_PER_DOC`]. Iterative, so any depth of content is safe to walk.
pub fn blob_refs(content: &Map<String, Json>) -> Vec<BlobRef> {
    let mut found = Vec::new();
    let mut stack: Vec<&Json> = content.values().collect();
    while let Some(value) = stack.pop() {
        match value {
            Json::Object(map) => match as_blob_ref(map) {
                Some(r) => {
                    found.push(r);
                    if found.len() >= MAX_REFS_PER_DOC {
                        break;
                    }
                }
                None => stack.extend(map.values()),
            },
            Json::Array(items) => stack.extend(items.iter()),
            _ => {}
        }
    }
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const H: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    fn refs(v: Json) -> Vec<BlobRef> {
        match v {
            Json::Object(m) => blob_refs(&m),
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn references_are_found_at_any_depth_and_once() {
        let found = refs(json!({
            "model": {"weights": {"@blob": H, "size": 10, "type": "application/octet-stream"}},
            "shards": [{"@blob": H, "size": 10}, {"x": [{"@blob": H.to_uppercase(), "size": 10}]}],
        }));
        assert_eq!(found.len(), 1);
        assert_eq!(format_blob_hash(&found[0].hash), H);
        assert_eq!(found[0].size, 10);
    }

    #[test]
    fn malformed_references_name_nothing() {
        for bad in [
            json!({"r": {"@blob": H}}),
            json!({"r": {"@blob": H, "size": -1}}),
            json!({"r": {"@blob": H, "size": "10"}}),
            json!({"r": {"@blob": &H[1..], "size": 1}}),
            json!({"r": {"@blob": format!("{}zz", &H[2..]), "size": 1}}),
            json!({"r": {"@blob": 7, "size": 1}}),
        ] {
            assert!(refs(bad.clone()).is_empty(), "{bad}");
        }
    }

    #[test]
    fn a_document_contributes_a_bounded_number_of_references() {
        let many: Vec<Json> = (0..MAX_REFS_PER_DOC + 10)
            .map(|i| json!({"@blob": format!("{i:064x}"), "size": i}))
            .collect();
        assert_eq!(refs(json!({"all": many})).len(), MAX_REFS_PER_DOC);
    }

    #[test]
    fn a_deep_document_is_walked_without_recursion() {
        let mut v = json!({"@blob": H, "size": 3});
        for _ in 0..1000 {
            v = json!([v]);
        }
        assert_eq!(refs(json!({"deep": v})).len(), 1);
    }
}
