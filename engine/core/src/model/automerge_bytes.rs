//! Checks on Automerge bytes that come from outside: a peer's sync message or an app's
//! import. Automerge itself skips change bytes it cannot parse, silently; Tidesync refuses
//! them instead, and refuses changes whose dependencies neither side has.
//!
//! Automerge's parser can also panic on crafted bytes (fuzzing found a 97-byte document
//! that panics inside its column decoder). These checks run on the store's single writer
//! thread, where a panic would stop every write of the node, so each parse of outside
//! bytes is contained: a panic is reported as invalid data.

use std::panic::{catch_unwind, AssertUnwindSafe};

use automerge::{Automerge, ChangeHash, LoadOptions, OnPartialLoad, ReadDoc};

use super::json::MAX_DEPTH;
use crate::error::ModelError;

/// Checks that a sync message's chunk is valid Automerge data: a change, a bundle of
/// changes, or a saved document (version 2 messages send one when most is missing).
pub fn validate_chunk(chunk: &[u8]) -> Result<(), ModelError> {
    if contained(|| Ok(automerge::Change::try_from(chunk).is_ok()))? {
        return Ok(());
    }
    check_parses(chunk)
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
    if bytes.is_empty() {
        return Err(ModelError::InvalidAutomerge("no data".into()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;

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
            assert!(validate_chunk(c.raw_bytes()).is_ok());
        }
        assert!(validate_chunk(&doc.save()).is_ok(), "a whole document");
        assert!(validate_chunk(b"definitely not a change").is_err());
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
        assert!(validate_chunk(PANICS_AUTOMERGE).is_err());
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
