//! Checks on Automerge bytes that come from outside: a peer's sync message or an app's
//! import. Automerge itself skips change bytes it cannot parse, silently; Tidesync refuses
//! them instead, and refuses changes whose dependencies neither side has.
//!
//! Automerge's parser can also panic on crafted bytes (fuzzing found a 97-byte document
//! that panics inside its column decoder). These checks run on the store's single writer
//! thread, where a panic would stop every write of the node, so each parse of outside
//! bytes is contained: a panic is reported as invalid data.
//!
//! Some bytes cost far more than their size: a compressed change that inflates to
//! gigabytes, a bundle chunk whose columns make Automerge's decoder run for seconds (fuzzing
//! found 120-byte ones taking 15 s and 1 GB), a change that nests objects 100,000 deep. The
//! chunk headers are checked first ([`check_chunk_kinds`]): documents, changes and
//! compressed changes are accepted (what Automerge's sync and save produce), bundles are
//! not, and a compressed change must inflate to at most [`MAX_INFLATED_BYTES`]. A peer's
//! changes are checked for depth on their own ([`check_peer_chunk`]) before they queue
//! for the store, so the single writer thread never applies a too-deep chain to find out.

use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::{Automerge, ChangeHash, LoadOptions, OnPartialLoad, ReadDoc};

use super::json::MAX_DEPTH;
use crate::error::ModelError;

/// Largest a compressed change may inflate to, in bytes.
pub const MAX_INFLATED_BYTES: u64 = 64 << 20;

/// The bytes every Automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

fn invalid(reason: impl Into<String>) -> ModelError {
    ModelError::InvalidAutomerge(reason.into())
}

/// Walks the chunk headers of `bytes` (one chunk or several back to back) before
/// Automerge parses anything: only documents, changes and compressed changes, each within
/// the data, and compressed ones inflating to at most [`MAX_INFLATED_BYTES`].
pub fn check_chunk_kinds(mut bytes: &[u8]) -> Result<(), ModelError> {
    if bytes.is_empty() {
        return Err(invalid("no data"));
    }
    while !bytes.is_empty() {
        // Magic (4), checksum (4), type (1), then the body's length.
        if bytes.len() < 9 || bytes[..4] != MAGIC {
            return Err(invalid("not an Automerge chunk"));
        }
        let kind = bytes[8];
        let mut rest = &bytes[9..];
        let len = leb128::read::unsigned(&mut rest)
            .ok()
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| invalid("a chunk longer than the data"))?;
        let (body, after) = rest.split_at(len);
        match kind {
            0 | 1 => {}
            2 => check_inflated_size(body)?,
            3 => return Err(invalid("bundle chunks are not accepted")),
            other => return Err(invalid(format!("unknown chunk type {other}"))),
        }
        bytes = after;
    }
    Ok(())
}

/// Inflates a compressed change into nothing, stopping past the limit.
fn check_inflated_size(deflated: &[u8]) -> Result<(), ModelError> {
    use std::io::Read;
    let mut inflated = flate2::read::DeflateDecoder::new(deflated).take(MAX_INFLATED_BYTES + 1);
    let size = std::io::copy(&mut inflated, &mut std::io::sink())
        .map_err(|e| invalid(format!("a compressed change does not inflate: {e}")))?;
    if size > MAX_INFLATED_BYTES {
        return Err(ModelError::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit: usize::try_from(MAX_INFLATED_BYTES).unwrap_or(usize::MAX),
        });
    }
    Ok(())
}

/// Checks one chunk of a peer's sync message before it queues for the store, parsing it
/// once: valid Automerge data (a change, a compressed change, or a saved document, as
/// version 2 sync messages send one when most is missing) whose changes nest objects no deeper
/// than [`MAX_DEPTH`] within one change. Each object a change makes is one below its
/// parent, and a parent outside the change counts as the root (the store checks the
/// document as a whole after applying). A saved document is loaded on its own and walked
/// from its root; a change needs no document. So a deep chain made in one go is refused by the connection
/// that received it, not by the store's single writer.
///
/// Returns the ops the chunk holds ([`super::op_count::count_ops`]), counted before
/// anything is parsed and refused over [`super::op_count::MAX_OPS`].
pub fn check_peer_chunk(chunk: &[u8]) -> Result<u64, ModelError> {
    check_chunk_kinds(chunk)?;
    let ops = super::op_count::check_ops(chunk, super::op_count::MAX_OPS)?;
    let parsed = catch_unwind(AssertUnwindSafe(|| automerge::Change::try_from(chunk)));
    if let Ok(Ok(change)) = parsed {
        return check_one_change_depth(&change).map(|()| ops);
    }
    let doc = contained(|| {
        Automerge::load_with_options(
            chunk,
            LoadOptions::new().on_partial_load(OnPartialLoad::Error),
        )
        .map_err(|e| invalid(e.to_string()))
    });
    let doc = match doc {
        Ok(doc) => doc,
        // A document whose dependencies are in the receiver's copy: valid, its changes
        // are checked when they are applied.
        Err(_) => return check_parses(chunk).map(|()| ops),
    };
    check_doc_depth(&doc).map(|()| ops)
}

/// Refuses a document with an object more than [`MAX_DEPTH`] levels below the root,
/// conflicting values included. Walks the tree from the root and stops one level past the
/// limit, so a 100,000-level chain costs a hundred lookups, not a decode of every op.
fn check_doc_depth(doc: &Automerge) -> Result<(), ModelError> {
    use automerge::{ObjType, Value};
    let mut stack = vec![(automerge::ROOT, 0usize)];
    while let Some((obj, depth)) = stack.pop() {
        let children = |values: Vec<(Value<'_>, automerge::ObjId)>| {
            values
                .into_iter()
                .filter(|(v, _)| v.is_object())
                .map(|(_, id)| id)
                .collect::<Vec<_>>()
        };
        let mut found = Vec::new();
        match doc.object_type(&obj) {
            Ok(ObjType::Map | ObjType::Table) => {
                for key in doc.keys(&obj) {
                    found.extend(children(doc.get_all(&obj, key).unwrap_or_default()));
                }
            }
            Ok(ObjType::List) => {
                for i in 0..doc.length(&obj) {
                    found.extend(children(doc.get_all(&obj, i).unwrap_or_default()));
                }
            }
            // Text holds characters and marks, never objects.
            Ok(ObjType::Text) | Err(_) => {}
        }
        if !found.is_empty() && depth + 1 > MAX_DEPTH {
            return Err(ModelError::TooDeep { limit: MAX_DEPTH });
        }
        stack.extend(found.into_iter().map(|id| (id, depth + 1)));
    }
    Ok(())
}

fn check_one_change_depth(change: &automerge::Change) -> Result<(), ModelError> {
    use automerge::legacy::{ObjectId, OpId, OpType};
    let expanded = contained(|| Ok(change.decode()))?;
    let actor = change.actor_id();
    let start = change.start_op().get();
    let mut depth: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, op) in expanded.operations.iter().enumerate() {
        if !matches!(op.action, OpType::Make(_)) {
            continue;
        }
        let parent = match &op.obj {
            ObjectId::Id(OpId(counter, a)) if a == actor => depth.get(counter).copied(),
            _ => None,
        };
        let d = parent.unwrap_or(0) + 1;
        if d > MAX_DEPTH {
            return Err(ModelError::TooDeep { limit: MAX_DEPTH });
        }
        depth.insert(start + i as u64, d);
    }
    Ok(())
}

/// Runs a parse of outside bytes, turning a panic inside Automerge into an error. The
/// closure only reads its input or changes a value it owns, which is dropped on panic.
fn contained<T>(parse: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    catch_unwind(AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(ModelError::InvalidAutomerge(
            "Automerge could not parse the data (it panicked)".into(),
        ))
    })
}

/// Checks that `bytes` parse completely as Automerge data, whether or not the changes they
/// depend on are among them (they may be in the document the bytes are merged into).
pub fn check_parses(bytes: &[u8]) -> Result<(), ModelError> {
    contained(|| {
        match Automerge::load_with_options(
            bytes,
            LoadOptions::new().on_partial_load(OnPartialLoad::Error),
        ) {
            // MissingDeps is raised only after every chunk parsed.
            Ok(_) | Err(automerge::AutomergeError::MissingDeps) => Ok(()),
            Err(e) => Err(ModelError::InvalidAutomerge(e.to_string())),
        }
    })
}

/// Merges Automerge bytes into a copy of `doc`, refusing anything that does not parse
/// completely or depends on changes neither side has.
pub fn import(doc: &Automerge, bytes: &[u8]) -> Result<Automerge, ModelError> {
    let invalid = |e: automerge::AutomergeError| ModelError::InvalidAutomerge(e.to_string());
    check_chunk_kinds(bytes)?;
    super::op_count::check_ops(bytes, super::op_count::MAX_OPS)?;
    // Changes that build on this document's history are settled by the merge below.
    check_parses(bytes)?;
    let merged = contained(|| {
        let mut merged = doc.clone();
        merged.load_incremental(bytes).map_err(invalid)?;
        Ok(merged)
    })?;
    let missing = merged.get_missing_deps(&[]);
    if !missing.is_empty() {
        return Err(ModelError::MissingDependencies(missing.len()));
    }
    check_new_depth(&merged, &doc.get_heads())?;
    Ok(merged)
}

/// Refuses changes after `before` that create an object nested deeper than
/// [`MAX_DEPTH`]: each object they make is looked up and its ancestors counted, at most
/// `MAX_DEPTH` of them, so a deep chain costs no more than a shallow one per object.
pub fn check_new_depth(doc: &Automerge, before: &[ChangeHash]) -> Result<(), ModelError> {
    for change in doc.get_changes(before) {
        let actor = change.actor_id().to_hex_string();
        let start = change.start_op().get();
        let made = change
            .decode()
            .operations
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op.action, automerge::legacy::OpType::Make(_)))
            .map(|(i, _)| start + i as u64)
            .collect::<Vec<_>>();
        for counter in made {
            // The object a make op creates has the op's id.
            let Ok(obj) = doc.import_obj(&format!("{counter}@{actor}")) else {
                continue;
            };
            let ancestors = doc
                .parents(&obj)
                .map_or(0, |p| p.take(MAX_DEPTH + 1).count());
            if ancestors > MAX_DEPTH {
                return Err(ModelError::TooDeep { limit: MAX_DEPTH });
            }
        }
    }
    Ok(())
}

/// Whether `doc` holds every change in `hashes` (applied, not waiting for dependencies):
/// a lookup in its change graph per hash. `get_change_by_hash` would rebuild each change
/// from the op set, which costs the whole document, and a peer can give a document
/// thousands of heads; `get_missing_deps` also reports what queued changes lack.
pub fn holds_all(doc: &Automerge, hashes: &[ChangeHash]) -> bool {
    hashes
        .iter()
        .all(|h| doc.get_change_meta_by_hash(h).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;

    /// Regression, found by the `import` fuzz target: bundle chunks of about a hundred
    /// bytes that took Automerge's decoder up to 23 s and 1 GB. Refused from the header.
    #[test]
    fn bundle_chunks_are_refused_before_automerge_parses_them() {
        for seed in [
            &include_bytes!("../../../fuzz/corpus/import/regression-bundle-15s")[..],
            &include_bytes!("../../../fuzz/corpus/import/regression-bundle-23s")[..],
            &include_bytes!("../../../fuzz/corpus/import/regression-bundle-slow-decode")[..],
        ] {
            let e = check_peer_chunk(seed).expect_err("refused");
            assert!(e.to_string().contains("bundle"), "{e}");
            let e = import(&Automerge::new(), seed).expect_err("refused");
            assert!(e.to_string().contains("bundle"), "{e}");
        }
    }

    /// A compressed change that would inflate to 100 MB, in about 100 KB: refused as too
    /// large before Automerge inflates it.
    #[test]
    fn a_deflate_bomb_is_refused_by_its_inflated_size() {
        use std::io::Write;
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..100 {
            enc.write_all(&zeros).expect("deflate");
        }
        let deflated = enc.finish().expect("deflate");
        let mut chunk = MAGIC.to_vec();
        chunk.extend_from_slice(&[0, 0, 0, 0, 2]);
        leb128::write::unsigned(&mut chunk, deflated.len() as u64).expect("leb");
        chunk.extend_from_slice(&deflated);
        assert!(chunk.len() < 200 << 10);
        let e = check_peer_chunk(&chunk).expect_err("refused");
        assert!(matches!(e, ModelError::TooLarge { .. }), "{e}");
    }

    /// One change that nests 1,000 maps: refused from its own ops, no document needed; a
    /// change nesting exactly the limit passes.
    #[test]
    fn a_change_nesting_past_the_limit_is_refused_on_its_own() {
        let nested = |levels: usize| {
            let mut doc = Automerge::new();
            let mut tx = doc.transaction();
            let mut obj = ROOT;
            for _ in 0..levels {
                obj = tx
                    .put_object(&obj, "a", automerge::ObjType::Map)
                    .expect("put");
            }
            tx.commit();
            doc.get_changes(&[])
                .first()
                .expect("one change")
                .raw_bytes()
                .to_vec()
        };
        assert!(matches!(
            check_peer_chunk(&nested(1_000)),
            Err(ModelError::TooDeep { .. })
        ));
        check_peer_chunk(&nested(MAX_DEPTH)).expect("at the limit");
        // The same as a saved document, as a sync message sends one whole.
        let doc = |levels| Automerge::load(&nested(levels)).expect("loads").save();
        assert!(matches!(
            check_peer_chunk(&doc(1_000)),
            Err(ModelError::TooDeep { .. })
        ));
        check_peer_chunk(&doc(MAX_DEPTH)).expect("at the limit");
    }

    /// Regression: sync messages carry changes whose dependencies are in the receiving
    /// document, not in the message; the simulation found them refused as invalid, which
    /// stalled convergence. Only bytes that do not parse are invalid.
    #[test]
    fn chunks_with_outside_dependencies_are_valid_and_garbage_is_not() {
        let mut doc = Automerge::new();
        for i in 0..3 {
            let mut tx = doc.transaction();
            tx.put(ROOT, "x", i).expect("put");
            tx.commit();
        }
        let first = doc.get_changes(&[])[0].hash();
        let later = doc.save_after(&[first]);
        assert!(check_parses(&later).is_ok(), "changes with outside deps");
        for c in doc.get_changes(&[first]) {
            assert!(check_peer_chunk(c.raw_bytes()).is_ok());
        }
        assert!(check_peer_chunk(&doc.save()).is_ok(), "a whole document");
        assert!(check_peer_chunk(b"definitely not a change").is_err());
        let mut truncated = later.clone();
        truncated.truncate(later.len() - 3);
        assert!(check_parses(&truncated).is_err());
    }

    /// A chain of `levels` nested maps under the root.
    fn nested(levels: usize) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let mut obj = automerge::ROOT;
        for _ in 0..levels {
            obj = tx
                .put_object(&obj, "a", automerge::ObjType::Map)
                .expect("put");
        }
        tx.commit();
        doc
    }

    #[test]
    fn changes_nesting_past_the_limit_are_refused() {
        let empty = Automerge::new();
        assert!(import(&empty, &nested(MAX_DEPTH).save()).is_ok());
        assert!(matches!(
            import(&empty, &nested(MAX_DEPTH + 1).save()),
            Err(ModelError::TooDeep { .. })
        ));
        let deep = nested(100_000);
        assert!(matches!(
            check_new_depth(&deep, &[]),
            Err(ModelError::TooDeep { .. })
        ));
        // Whatever is already stored, readers stop at the limit instead of recursing on.
        assert!(matches!(
            crate::model::json::read_root(&deep),
            Err(ModelError::TooDeep { .. })
        ));
        assert!(matches!(
            crate::model::conflicts(&deep),
            Err(ModelError::TooDeep { .. })
        ));
    }

    /// Regression, found by the `import` fuzz target: these bytes make Automerge 0.12's
    /// column decoder panic. On the store's writer thread that stopped every write.
    const PANICS_AUTOMERGE: &[u8] = &[
        0x85, 0x6f, 0x4a, 0x83, 0x22, 0x89, 0x2a, 0xb3, 0x03, 0x57, 0x01, 0x08, 0x8e, 0xc8, 0xf7,
        0xec, 0x1d, 0x1d, 0x59, 0xd9, 0x4b, 0x7f, 0xf3, 0xfa, 0x00, 0x01, 0x57, 0x01, 0x08, 0xff,
        0x00, 0x00, 0x03, 0x7f, 0x02, 0x00, 0x03, 0x7f, 0x00, 0x94, 0x32, 0x7f, 0x17, 0x00, 0x00,
        0x08, 0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x04, 0x13, 0x04, 0x15, 0x0f, 0x21, 0x02,
        0x23, 0x05, 0x30, 0x02, 0x42, 0x04, 0x56, 0x06, 0x57, 0xff, 0x5c, 0x10, 0x6e, 0xb7, 0x85,
        0x6f, 0x80, 0x01, 0x02, 0x02, 0x00, 0x02, 0x42, 0x02, 0x56, 0x03, 0xfa, 0x9b, 0x04, 0x00,
        0x85, 0x6f, 0x4a, 0x83, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn bytes_that_panic_automerge_are_refused_as_invalid() {
        assert!(matches!(
            import(&Automerge::new(), PANICS_AUTOMERGE),
            Err(ModelError::InvalidAutomerge(_))
        ));
        assert!(check_peer_chunk(PANICS_AUTOMERGE).is_err());
    }

    #[test]
    fn an_import_missing_dependencies_changes_nothing() {
        let mut doc = Automerge::new();
        for i in 0..2 {
            let mut tx = doc.transaction();
            tx.put(ROOT, "x", i).expect("put");
            tx.commit();
        }
        let first = doc.get_changes(&[])[0].hash();
        let later = doc.save_after(&[first]);
        let empty = Automerge::new();
        assert!(matches!(
            import(&empty, &later),
            Err(ModelError::MissingDependencies(1))
        ));
        assert!(import(&empty, &doc.save()).is_ok());
        assert!(import(&empty, &[]).is_err());
    }
}
