//! Two stores that hold the same documents except for a chosen number of differences the
//! feed walk will not repair (each side's cursor into the other's feed is already at its
//! end, as after a restore or a lost sync state): what an audit must find.

use std::path::Path;

use anyhow::{ensure, Result};
use futures_util::future::try_join_all;
use serde_json::json;
use tidesync::model::{Cursor, DocId, Namespace, NodeId};
use tidesync::store::{Store, StoreConfig};

/// Writes at once per batch while filling the stores.
const CHUNK: usize = 2000;

/// The documents' namespace.
pub const NS: &str = "audit";

/// The document ids that differ, sorted.
pub type Differing = Vec<String>;

fn doc_id(i: usize) -> Result<DocId> {
    Ok(DocId::new(format!("doc-{i:07}"))?)
}

/// Fills `a` and `b` (new redb files of nodes `a_id` and `b_id`) with `shared` documents
/// holding the same changes, then makes `differing` differences (see [`diverge`]).
/// Returns the ids that differ.
pub async fn prepare(
    a: &Path,
    a_id: &NodeId,
    b: &Path,
    b_id: &NodeId,
    shared: usize,
    differing: usize,
) -> Result<Differing> {
    fill(a, b, shared).await?;
    diverge(a, a_id, b, b_id, shared, differing).await
}

/// The namespace and both stores, opened.
fn open(a: &Path, b: &Path) -> Result<(Namespace, Store, Store)> {
    Ok((
        Namespace::new(NS)?,
        Store::open(a, StoreConfig::default())?,
        Store::open(b, StoreConfig::default())?,
    ))
}

/// Fills `a` and `b` with `shared` documents holding the same changes.
pub async fn fill(a: &Path, b: &Path, shared: usize) -> Result<()> {
    let (ns, sa, sb) = open(a, b)?;
    for start in (0..shared).step_by(CHUNK) {
        let ids: Vec<DocId> = (start..(start + CHUNK).min(shared))
            .map(doc_id)
            .collect::<Result<_>>()?;
        try_join_all(ids.iter().map(|id| {
            let body = json!({ "model": "resnet", "version": 1, "id": id.as_str() });
            sa.put(&ns, id, body, None)
        }))
        .await?;
        // The same changes on b: imported, not written again, so the heads match.
        let exported: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| Ok(sa.export(&ns, id)?.map(|d| d.bytes).unwrap_or_default()))
            .collect::<Result<_>>()?;
        try_join_all(
            ids.iter()
                .zip(exported)
                .map(|(id, bytes)| sb.import(&ns, id, bytes)),
        )
        .await?;
    }
    Ok(())
}

/// Makes `differing` differences between two filled stores that the feed walk will not
/// repair: three in four are writes to a shared document on `a` alone, one in four a
/// document only `b` holds; then each side's cursor into the other's feed is set to its
/// end. Returns the ids that differ.
pub async fn diverge(
    a: &Path,
    a_id: &NodeId,
    b: &Path,
    b_id: &NodeId,
    shared: usize,
    differing: usize,
) -> Result<Differing> {
    ensure!(differing <= shared, "more differences than documents");
    let (ns, sa, sb) = open(a, b)?;
    let mut differ = Vec::new();
    for i in 0..differing {
        if i % 4 == 3 {
            let id = DocId::new(format!("only-b-{i:07}"))?;
            sb.put(&ns, &id, json!({ "only": "b" }), None).await?;
            differ.push(id.to_string());
        } else {
            // Spread over the shared documents.
            let id = doc_id(i * (shared / differing.max(1)))?;
            sa.patch(&ns, &id, json!({ "version": 2 }), None).await?;
            differ.push(id.to_string());
        }
    }
    differ.sort();
    differ.dedup();
    // Each side has "received" all of the other's feed: the walk sends nothing.
    let at_end = |s: &Store| Cursor {
        epoch: s.feed_epoch(),
        seq: s.last_seq().0,
    };
    sa.set_peer_cursor(b_id, at_end(&sb)).await?;
    sb.set_peer_cursor(a_id, at_end(&sa)).await?;
    Ok(differ)
}

/// The ids whose heads differ between two stores (or that one lacks).
pub fn differing(a: &Store, b: &Store) -> Result<Differing> {
    let ns = Namespace::new(NS)?;
    let list = |s: &Store| -> Result<std::collections::BTreeMap<String, Vec<_>>> {
        Ok(s.list(&ns)?
            .into_iter()
            .map(|d| (d.id.to_string(), d.heads))
            .collect())
    };
    let (la, lb) = (list(a)?, list(b)?);
    let mut out: Differing = la
        .iter()
        .filter(|(id, heads)| lb.get(*id) != Some(heads))
        .map(|(id, _)| id.clone())
        .collect();
    out.extend(lb.keys().filter(|id| !la.contains_key(*id)).cloned());
    out.sort();
    Ok(out)
}
