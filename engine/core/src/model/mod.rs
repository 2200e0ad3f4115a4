//! The data model: validated names, grants, the JSON <-> Automerge mapping, merge patch,
//! conflicts, checks on Automerge bytes, and the plain types that name feed positions and
//! nodes.
//!
//! Pure functions over Automerge documents and plain values; no storage, no I/O.

pub mod automerge_bytes;
pub mod blob_ref;
pub mod class;
pub mod conflicts;
pub mod feed;
pub mod grants;
pub mod ids;
pub mod json;
pub mod op_count;
pub mod peer;

pub use blob_ref::{blob_refs, format_blob_hash, parse_blob_hash, BlobRef};
pub use class::{Class, ClassId, Classes, Mode, Priority, Window};
pub use conflicts::{conflicts, Conflict};
pub use feed::{Cursor, FeedEntry, FeedSeq};
pub use grants::{Access, Grant, Grants, NsPattern};
pub use ids::{DocId, Namespace, NodeId};
pub use peer::{Identity, Role, SyncPeer};

use automerge::ChangeHash;

use crate::error::ModelError;

/// Formats heads the way the API shows them: hex hashes, sorted, comma-separated.
pub fn format_heads(heads: &[ChangeHash]) -> String {
    let mut hex: Vec<String> = heads.iter().map(ToString::to_string).collect();
    hex.sort();
    hex.join(",")
}

/// Parses heads as [`format_heads`] writes them (order does not matter; empty means none).
pub fn parse_heads(s: &str) -> Result<Vec<ChangeHash>, ModelError> {
    let s = s.trim().trim_matches('"');
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let mut heads = s
        .split(',')
        .map(|h| h.trim().parse::<ChangeHash>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ModelError::InvalidHeads(s.to_owned()))?;
    heads.sort();
    Ok(heads)
}

/// Whether two head sets name the same changes, whatever their order.
pub fn same_heads(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip() {
        let h1 = ChangeHash([1; 32]);
        let h2 = ChangeHash([2; 32]);
        let text = format_heads(&[h2, h1]);
        assert_eq!(parse_heads(&text).expect("parse"), vec![h1, h2]);
        assert_eq!(
            parse_heads(&format!("\"{text}\"")).expect("quoted"),
            vec![h1, h2]
        );
        assert!(parse_heads("").expect("empty").is_empty());
        assert!(matches!(
            parse_heads("zz"),
            Err(ModelError::InvalidHeads(_))
        ));
    }
}
