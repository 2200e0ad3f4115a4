//! Compaction: one snapshot in place of a snapshot and its trailing changes.
//!
//! The writer calls this inside the batch's transaction when a document's change chunks
//! would outweigh its snapshot (and a floor, so tiny documents are not re-saved on every
//! write). Loading then costs one snapshot parse instead of replaying many changes, and
//! because it shares the transaction, a crash leaves either the old chunks or the new
//! snapshot, never neither.

use redb::Table;

use super::schema::DocMeta;
use crate::error::StoreError;

/// Drops every chunk of the document and stores `snapshot` (a full `save()`) as its only one.
pub(crate) fn replace_with_snapshot(
    chunks: &mut Table<(u64, u64), &[u8]>,
    meta: &mut DocMeta,
    snapshot: &[u8],
) -> Result<(), StoreError> {
    for n in meta.first_chunk..meta.next_chunk {
        chunks.remove((meta.key, n))?;
    }
    chunks.insert((meta.key, meta.next_chunk), snapshot)?;
    meta.first_chunk = meta.next_chunk;
    meta.next_chunk += 1;
    meta.snapshot_bytes = snapshot.len() as u64;
    meta.incremental_bytes = 0;
    Ok(())
}
