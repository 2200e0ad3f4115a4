//! Checks on Automerge bytes that come from outside: a peer's sync message or an app's
//! import. Automerge itself skips change bytes it cannot parse, silently; Tidesync refuses
//! them instead, and refuses changes whose dependencies neither side has.

use automerge::{Automerge, LoadOptions, OnPartialLoad, ReadDoc};

use crate::error::ModelError;

/// Checks that a sync message's chunk is valid Automerge data: a change, a bundle of
/// changes, or a saved document (version 2 messages send one when most is missing).
pub fn validate_chunk(chunk: &[u8]) -> Result<(), ModelError> {
    if automerge::Change::try_from(chunk).is_ok() {
        return Ok(());
    }
    check_parses(chunk)
}

/// Checks that `bytes` parse completely as Automerge data, whether or not the changes they
/// depend on are among them (they may be in the document the bytes are merged into).
pub fn check_parses(bytes: &[u8]) -> Result<(), ModelError> {
    match Automerge::load_with_options(
        bytes,
        LoadOptions::new().on_partial_load(OnPartialLoad::Error),
    ) {
        // MissingDeps is raised only after every chunk parsed.
        Ok(_) | Err(automerge::AutomergeError::MissingDeps) => Ok(()),
        Err(e) => Err(ModelError::InvalidAutomerge(e.to_string())),
    }
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
    let mut merged = doc.clone();
    merged.load_incremental(bytes).map_err(invalid)?;
    let missing = merged.get_missing_deps(&[]);
    if !missing.is_empty() {
        return Err(ModelError::MissingDependencies(missing.len()));
    }
    Ok(merged)
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
