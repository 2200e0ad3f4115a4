//! What Automerge bytes will cost to parse and apply, read from their column headers and
//! run lengths before Automerge decodes anything.
//!
//! Automerge stores ops in columns, and most columns are run-length encoded: a change of
//! a few dozen bytes can claim millions of ops (a list of two million nulls, made with the
//! ordinary API, is a 111-byte change that takes half a second to parse and six seconds and
//! 100 MB to apply). The size of the bytes says nothing about their cost; the row counts
//! do. [`count_ops`] walks every column of every chunk and reports the largest row count
//! (ops, predecessors, changes), costing one pass over the bytes and no allocation beyond
//! the inflation of a compressed chunk (itself capped).

use std::io::Read;

use super::automerge_bytes::MAX_INFLATED_BYTES;
use crate::error::ModelError;

/// Most ops one sync message or one import may bring (counted by [`count_ops`]). About
/// twelve seconds of the store's writer and 400 MB at Automerge's cost per op; a 16 MiB
/// JSON document, the largest the API takes, maps to at most about eight million ops only
/// when it is nothing but one-byte values, and documents of real data to far fewer.
pub const MAX_OPS: u64 = 4 << 20;

/// The bytes every Automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

fn invalid(reason: &str) -> ModelError {
    ModelError::InvalidAutomerge(reason.to_owned())
}

/// The ops (rows of the longest column) that `bytes` (chunks back to back) hold: for a
/// change its ops or their predecessors, for a document its ops plus its changes. Bundles
/// and unknown chunks are refused here as in [`super::automerge_bytes::check_chunk_kinds`].
pub fn count_ops(mut bytes: &[u8]) -> Result<u64, ModelError> {
    let mut total = 0u64;
    let mut inflated_budget = MAX_INFLATED_BYTES;
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != MAGIC {
            return Err(invalid("not an Automerge chunk"));
        }
        let kind = bytes[8];
        let mut rest = &bytes[9..];
        let len = read_uleb(&mut rest)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| invalid("a chunk longer than the data"))?;
        let (body, after) = rest.split_at(len);
        let ops = match kind {
            0 => document_ops(body, &mut inflated_budget)?,
            1 => change_ops(body)?,
            2 => change_ops(&inflate(body, &mut inflated_budget)?)?,
            3 => return Err(invalid("bundle chunks are not accepted")),
            _ => return Err(invalid("unknown chunk type")),
        };
        total = total.saturating_add(ops);
        bytes = after;
    }
    Ok(total)
}

/// Refuses bytes holding more than `limit` ops (see [`count_ops`]).
pub fn check_ops(bytes: &[u8], limit: u64) -> Result<u64, ModelError> {
    let ops = count_ops(bytes)?;
    if ops > limit {
        return Err(ModelError::TooManyOps { ops, limit });
    }
    Ok(ops)
}

/// A change body: dependencies, actor, seq, start op, time, message, other actors, then
/// the op columns (none of them compressed: Automerge compresses whole changes instead).
fn change_ops(mut body: &[u8]) -> Result<u64, ModelError> {
    let deps = read_len(&mut body)?;
    skip(&mut body, deps.saturating_mul(32))?;
    skip_prefixed(&mut body)?; // actor
    read_uleb(&mut body).ok_or_else(|| invalid("no seq"))?;
    read_uleb(&mut body).ok_or_else(|| invalid("no start op"))?;
    read_sleb(&mut body).ok_or_else(|| invalid("no time"))?;
    skip_prefixed(&mut body)?; // message
    let others = read_len(&mut body)?;
    for _ in 0..others {
        skip_prefixed(&mut body)?;
    }
    let columns = read_columns(&mut body)?;
    let mut most = 0u64;
    for (spec, data) in split_columns(&columns, body)? {
        if spec.deflated() {
            return Err(invalid("a change with a compressed column"));
        }
        most = most.max(column_rows(spec, data)?);
    }
    Ok(most)
}

/// A document body: actors, heads, change columns, op columns, their data (columns may be
/// compressed, each inflating within the chunk's budget), then head indexes.
fn document_ops(mut body: &[u8], budget: &mut u64) -> Result<u64, ModelError> {
    let actors = read_len(&mut body)?;
    for _ in 0..actors {
        skip_prefixed(&mut body)?;
    }
    let heads = read_len(&mut body)?;
    skip(&mut body, heads.saturating_mul(32))?;
    let change_columns = read_columns(&mut body)?;
    let op_columns = read_columns(&mut body)?;
    let change_len = total_len(&change_columns)?;
    if change_len > body.len() {
        return Err(invalid("document columns longer than the data"));
    }
    let (change_data, op_data) = body.split_at(change_len);
    let mut total = 0u64;
    for (columns, data) in [(&change_columns, change_data), (&op_columns, op_data)] {
        let mut most = 0u64;
        for (spec, data) in split_columns(columns, data)? {
            let rows = if spec.deflated() {
                column_rows(spec, &inflate(data, budget)?)?
            } else {
                column_rows(spec, data)?
            };
            most = most.max(rows);
        }
        total = total.saturating_add(most);
    }
    Ok(total)
}

/// A column's specification: its id, whether it is deflated, and how its values are encoded.
#[derive(Clone, Copy, Debug)]
struct Spec(u64);

impl Spec {
    fn deflated(self) -> bool {
        self.0 & 0b1000 != 0
    }
    fn encoding(self) -> u64 {
        self.0 & 0b0111
    }
}

fn read_columns(body: &mut &[u8]) -> Result<Vec<(Spec, usize)>, ModelError> {
    let count = read_len(body)?;
    // Each column takes at least two bytes to describe, so the data bounds the count.
    if count > body.len() / 2 {
        return Err(invalid("more columns than the data describes"));
    }
    (0..count)
        .map(|_| {
            let spec = read_uleb(body).ok_or_else(|| invalid("truncated column spec"))?;
            let len = read_len(body)?;
            Ok((Spec(spec), len))
        })
        .collect()
}

fn total_len(columns: &[(Spec, usize)]) -> Result<usize, ModelError> {
    columns
        .iter()
        .try_fold(0usize, |sum, &(_, len)| sum.checked_add(len))
        .ok_or_else(|| invalid("column lengths overflow"))
}

fn split_columns<'a>(
    columns: &[(Spec, usize)],
    mut data: &'a [u8],
) -> Result<Vec<(Spec, &'a [u8])>, ModelError> {
    columns
        .iter()
        .map(|&(spec, len)| {
            if len > data.len() {
                return Err(invalid("a column longer than the data"));
            }
            let (column, rest) = data.split_at(len);
            data = rest;
            Ok((spec, column))
        })
        .collect()
}

/// Rows in one column, from its run lengths. Raw value bytes (encoding 7) hold no rows of
/// their own: the value metadata column beside them counts them.
fn column_rows(spec: Spec, mut data: &[u8]) -> Result<u64, ModelError> {
    let truncated = || invalid("a truncated column");
    let mut rows = 0u64;
    match spec.encoding() {
        // Boolean: alternating run lengths.
        4 => {
            while !data.is_empty() {
                rows = rows.saturating_add(read_uleb(&mut data).ok_or_else(truncated)?);
            }
        }
        7 => {}
        encoding => {
            // Run-length encoded: a positive count and one value, a negative count and
            // that many literal values, or zero and a count of nulls.
            let skip_value = |data: &mut &[u8]| -> Option<()> {
                match encoding {
                    3 => read_sleb(data).map(|_| ()),
                    5 => {
                        let len = usize::try_from(read_uleb(data)?).ok()?;
                        (len <= data.len()).then(|| *data = &data[len..])
                    }
                    _ => read_uleb(data).map(|_| ()),
                }
            };
            while !data.is_empty() {
                let count = read_sleb(&mut data).ok_or_else(truncated)?;
                if count > 0 {
                    skip_value(&mut data).ok_or_else(truncated)?;
                    rows = rows.saturating_add(count.unsigned_abs());
                } else if count < 0 {
                    // Each literal takes at least one byte: the data bounds this loop.
                    for _ in 0..count.unsigned_abs() {
                        skip_value(&mut data).ok_or_else(truncated)?;
                    }
                    rows = rows.saturating_add(count.unsigned_abs());
                } else {
                    rows = rows.saturating_add(read_uleb(&mut data).ok_or_else(truncated)?);
                }
            }
        }
    }
    Ok(rows)
}

/// Inflates raw deflate data, refusing it once the chunk's budget is spent.
fn inflate(deflated: &[u8], budget: &mut u64) -> Result<Vec<u8>, ModelError> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(deflated)
        .take(budget.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            ModelError::InvalidAutomerge(format!("compressed data does not inflate: {e}"))
        })?;
    let used = out.len() as u64;
    if used > *budget {
        return Err(ModelError::TooLarge {
            size: usize::try_from(used).unwrap_or(usize::MAX),
            limit: usize::try_from(MAX_INFLATED_BYTES).unwrap_or(usize::MAX),
        });
    }
    *budget -= used;
    Ok(out)
}

fn read_uleb(data: &mut &[u8]) -> Option<u64> {
    leb128::read::unsigned(data).ok()
}

fn read_sleb(data: &mut &[u8]) -> Option<i64> {
    leb128::read::signed(data).ok()
}

fn read_len(data: &mut &[u8]) -> Result<usize, ModelError> {
    read_uleb(data)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| invalid("a truncated length"))
}

fn skip(data: &mut &[u8], len: usize) -> Result<(), ModelError> {
    if len > data.len() {
        return Err(invalid("a field longer than the data"));
    }
    *data = &data[len..];
    Ok(())
}

fn skip_prefixed(data: &mut &[u8]) -> Result<(), ModelError> {
    let len = read_len(data)?;
    skip(data, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ObjType, ReadDoc, ScalarValue, ROOT};

    fn list_of_nulls(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let list = tx.put_object(ROOT, "l", ObjType::List).expect("list");
        for i in 0..n {
            tx.insert(&list, i, ScalarValue::Null).expect("insert");
        }
        tx.commit();
        doc
    }

    /// The counts agree with Automerge's own for what it makes: changes, compressed
    /// changes (as `Change::bytes` gives them once large) and saved documents.
    #[test]
    fn counts_match_automerge() {
        for n in [0usize, 1, 7, 300, 20_000] {
            let doc = list_of_nulls(n);
            let mut change = doc.get_last_local_change().expect("a change").clone();
            let ops = change.len() as u64;
            assert_eq!(count_ops(change.raw_bytes()).expect("raw"), ops, "{n}");
            assert_eq!(count_ops(&change.bytes()).expect("maybe compressed"), ops);
            let saved = doc.save();
            // A document counts its ops plus its changes (one here).
            assert_eq!(count_ops(&saved).expect("doc"), doc.stats().num_ops + 1);
            let two = [change.raw_bytes(), change.raw_bytes()].concat();
            assert_eq!(count_ops(&two).expect("two"), 2 * ops);
        }
    }

    /// A text of many characters compresses well; the count is of its characters.
    #[test]
    fn compressed_changes_are_counted_inflated() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let text = tx.put_object(ROOT, "t", ObjType::Text).expect("text");
        tx.splice_text(&text, 0, 0, &"a".repeat(100_000))
            .expect("splice");
        tx.commit();
        let mut change = doc.get_last_local_change().expect("a change").clone();
        let compressed = change.bytes();
        assert_eq!(compressed[8], 2, "Automerge compressed it");
        assert!(compressed.len() < 5_000);
        assert_eq!(count_ops(&compressed).expect("count"), 100_001);
        let saved = doc.save();
        assert_eq!(count_ops(&saved).expect("doc"), 100_002);
    }

    /// A list built by inserting nulls at its head: every column ends in one long run.
    fn prepended_nulls(n: usize) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let list = tx.put_object(ROOT, "l", ObjType::List).expect("list");
        for _ in 0..n {
            tx.insert(&list, 0, ScalarValue::Null).expect("insert");
        }
        tx.commit();
        doc
    }

    /// The bomb: a small change whose columns claim millions of ops is refused before
    /// Automerge parses it, in about the time it takes to read its bytes.
    #[test]
    fn a_run_length_bomb_is_refused_from_its_columns() {
        let small = prepended_nulls(10)
            .get_last_local_change()
            .expect("a change")
            .raw_bytes()
            .to_vec();
        // The rewriting makes valid changes: Automerge counts what we count.
        let thousand = lengthen_runs(&small, 1_000);
        let parsed = automerge::Change::try_from(&thousand[..]).expect("a valid change");
        assert_eq!(parsed.len(), 1_011);
        assert_eq!(count_ops(&thousand).expect("count"), 1_011);

        let bomb = lengthen_runs(&small, 10_000_000);
        assert!(bomb.len() < 200, "{} bytes", bomb.len());
        let started = std::time::Instant::now();
        let e = check_ops(&bomb, MAX_OPS).expect_err("refused");
        assert!(
            matches!(e, ModelError::TooManyOps { ops, .. } if ops > 10_000_000),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        check_ops(&small, MAX_OPS).expect("an ordinary change passes");
    }

    #[test]
    fn truncated_and_hostile_headers_are_errors_not_panics() {
        let doc = list_of_nulls(50);
        let change = doc
            .get_last_local_change()
            .expect("a change")
            .raw_bytes()
            .to_vec();
        for cut in 0..change.len() {
            let mut bytes = change[..cut].to_vec();
            // Keep the header's length honest so the body itself is what is short.
            if cut > 10 {
                bytes = rewrap(1, &change[10..cut]);
            }
            let _ = count_ops(&bytes);
        }
        // A column count far beyond the data.
        let mut body = vec![0u8, 1, 0, 1, 1, 0, 0, 0];
        leb128::write::unsigned(&mut body, u64::MAX >> 1).expect("write");
        assert!(count_ops(&rewrap(1, &body)).is_err());
        assert!(count_ops(&rewrap(3, &[0])).is_err(), "bundle");
        assert!(count_ops(b"nope").is_err());
    }

    /// Rewrites a change so that the last run of each column is `n` rows longer: a
    /// change of `n` more ops, a few bytes longer.
    fn lengthen_runs(change: &[u8], n: u64) -> Vec<u8> {
        let mut body = &change[9..];
        let len = read_len(&mut body).expect("len");
        let body = &body[..len];
        let mut rest = body;
        let deps = read_len(&mut rest).expect("deps");
        skip(&mut rest, deps * 32).expect("deps");
        skip_prefixed(&mut rest).expect("actor");
        read_uleb(&mut rest).expect("seq");
        read_uleb(&mut rest).expect("start");
        read_sleb(&mut rest).expect("time");
        skip_prefixed(&mut rest).expect("message");
        let others = read_len(&mut rest).expect("others");
        for _ in 0..others {
            skip_prefixed(&mut rest).expect("other");
        }
        let prefix = &body[..body.len() - rest.len()];
        let columns = read_columns(&mut rest).expect("columns");
        let new_columns: Vec<(Spec, Vec<u8>)> = split_columns(&columns, rest)
            .expect("split")
            .into_iter()
            .map(|(spec, col)| (spec, lengthen_last_run(spec, col, n)))
            .collect();
        let mut out = prefix.to_vec();
        leb128::write::unsigned(&mut out, new_columns.len() as u64).expect("write");
        for (spec, col) in &new_columns {
            leb128::write::unsigned(&mut out, spec.0).expect("write");
            leb128::write::unsigned(&mut out, col.len() as u64).expect("write");
        }
        for (_, col) in &new_columns {
            out.extend_from_slice(col);
        }
        rewrap(1, &out)
    }

    fn lengthen_last_run(spec: Spec, col: &[u8], n: u64) -> Vec<u8> {
        let mut data = col;
        let mut last = 0;
        let mut out = Vec::new();
        match spec.encoding() {
            _ if col.is_empty() => return Vec::new(),
            7 => return col.to_vec(),
            4 => {
                while !data.is_empty() {
                    last = col.len() - data.len();
                    read_uleb(&mut data).expect("run");
                }
                let mut run = &col[last..];
                let len = read_uleb(&mut run).expect("run");
                out.extend_from_slice(&col[..last]);
                leb128::write::unsigned(&mut out, len + n).expect("write");
            }
            enc => {
                let skip_value = |data: &mut &[u8]| match enc {
                    3 => {
                        read_sleb(data).expect("value");
                    }
                    5 => {
                        let len = read_len(data).expect("string");
                        skip(data, len).expect("string");
                    }
                    _ => {
                        read_uleb(data).expect("value");
                    }
                };
                let mut value_len = 0;
                while !data.is_empty() {
                    last = col.len() - data.len();
                    let count = read_sleb(&mut data).expect("count");
                    let before = data.len();
                    if count > 0 {
                        skip_value(&mut data);
                    } else if count < 0 {
                        for _ in 0..count.unsigned_abs() {
                            skip_value(&mut data);
                        }
                    } else {
                        read_uleb(&mut data).expect("nulls");
                    }
                    value_len = before - data.len();
                }
                let mut run = &col[last..];
                let count = read_sleb(&mut run).expect("count");
                assert!(count >= 0, "a literal run ends column {}", spec.0);
                out.extend_from_slice(&col[..last]);
                if count > 0 {
                    leb128::write::signed(&mut out, count + n as i64).expect("write");
                    out.extend_from_slice(&run[..value_len]);
                } else {
                    let nulls = read_uleb(&mut run).expect("nulls");
                    leb128::write::signed(&mut out, 0).expect("write");
                    leb128::write::unsigned(&mut out, nulls + n).expect("write");
                }
            }
        }
        out
    }

    fn rewrap(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[0, 0, 0, 0, kind]);
        leb128::write::unsigned(&mut out, body.len() as u64).expect("write");
        out.extend_from_slice(body);
        out
    }
}
