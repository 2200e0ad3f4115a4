//! The consistency audit's reconciliation: two nodes find which documents they hold
//! differently without shipping them, at a cost that grows with the differences, not with
//! the documents.
//!
//! It is range-based set reconciliation (Meyer, "Range-Based Set Reconciliation", 2022;
//! the idea behind negentropy and iroh's ranger) over the items (namespace, id, heads).
//! Each item sits at a position given by the hash of its name, and carries a fingerprint,
//! the hash of its name and heads. A range of positions is summed up by the sum of its
//! fingerprints: equal sums, equal ranges. The ranges are fixed: level `l` cuts the
//! position space into `4^l` equal ranges, so a claim names its range by `(level, index)`
//! and no bound ever travels. One side claims a fingerprint for a range; the other, if
//! its own differs, answers with the fingerprints of the four sub-ranges, or, once its
//! range holds few items, with the items themselves (a short tag each). The side that
//! gets items compares them with its own: every difference in that range is found there.
//!
//! It repairs nothing: it reports which documents this side should send (it holds them,
//! and the peer lacks them or holds other heads) and which the peer should send (this
//! side lacks them). Both then run the normal per-document sync for exactly those.

use std::collections::HashSet;

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::model::{DocId, Namespace};

/// Sub-ranges per range: `4^level` ranges at a level.
const BRANCH_BITS: u32 = 2;
/// Deepest level: `4^24` ranges, 48 bits of position. Items still together there are
/// listed whatever their number.
pub const MAX_LEVEL: u8 = 24;
/// A differing range with at most this many items here is answered with its items (a tag
/// each, 8 bytes) rather than four fingerprints (20 bytes).
pub const LEAF_ITEMS: usize = 3;
/// Most item tags one claim may list.
pub const MAX_LISTED: usize = 1024;
/// Most claims, and most lacking tags, in one audit message.
pub const MAX_CLAIMS: usize = 1 << 16;

/// A range's fingerprint on the wire: 40 bits of the sum.
pub type RangePrint = [u8; 5];
/// An item on the wire: 32 bits of its position (the bits its range does not fix) and 32
/// bits of its fingerprint.
pub type ItemTag = [u8; 8];

/// What one side says of one range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The range's level: `4^level` ranges cut the position space.
    pub level: u8,
    /// The range at that level, below `4^level`.
    pub index: u64,
    /// What the sender holds there.
    pub body: ClaimBody,
}

/// The content of a [`Claim`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimBody {
    /// The range's fingerprint.
    Print(RangePrint),
    /// The fingerprints of the range's four sub-ranges (at `level + 1`).
    Split([RangePrint; 4]),
    /// Every item the sender holds in the range.
    Items(Vec<ItemTag>),
}

/// One side's answer to the other's claims.
#[derive(Debug, Default)]
pub struct Step {
    /// Claims for the peer to answer; none once this side has nothing left to compare.
    pub claims: Vec<Claim>,
    /// Items the peer holds and this side lacks: the peer should send them.
    pub lacking: Vec<ItemTag>,
}

struct Item {
    position: u64,
    print: u64,
    key: (Namespace, DocId),
}

/// One side's items, ordered by position, and the state of its comparison.
pub struct Reconciler {
    items: Vec<Item>,
    /// `sums[i]`: the fingerprints of `items[..i]`, summed (wrapping).
    sums: Vec<u64>,
    /// Documents this side should send: found differing, held here.
    to_send: Vec<(Namespace, DocId)>,
    /// Differences found on this side (each found on one side only).
    found: u64,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("items", &self.items.len())
            .field("found", &self.found)
            .finish()
    }
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u32).to_le_bytes());
        h.update(p);
    }
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Where a document sits, from its name alone.
fn position(ns: &Namespace, id: &DocId) -> u64 {
    hash64(&[ns.as_str().as_bytes(), id.as_str().as_bytes()])
}

/// What a document holds: its name and its heads, in order.
fn print(ns: &Namespace, id: &DocId, heads: &[ChangeHash]) -> u64 {
    let mut heads: Vec<&[u8]> = heads.iter().map(|h| h.0.as_slice()).collect();
    heads.sort_unstable();
    let mut parts: Vec<&[u8]> = vec![ns.as_str().as_bytes(), id.as_str().as_bytes()];
    parts.extend(heads);
    hash64(&parts)
}

/// The first position of range `(level, index)`, and the first after it (`None`: the end
/// of the space).
fn span(level: u8, index: u64) -> (u64, Option<u64>) {
    if level == 0 {
        return (0, None);
    }
    let shift = 64 - BRANCH_BITS * u32::from(level);
    let start = index << shift;
    let end = (index + 1).checked_shl(shift).filter(|e| *e != 0);
    (start, end)
}

fn check_range(level: u8, index: u64) -> Result<(), ProtocolError> {
    let ranges = 1u64 << (BRANCH_BITS * u32::from(level.min(MAX_LEVEL)));
    if level > MAX_LEVEL || index >= ranges {
        return Err(ProtocolError::protocol(format!(
            "audit range {index} at level {level} does not exist"
        )));
    }
    Ok(())
}

impl Reconciler {
    /// This side's documents and their heads, in any order.
    pub fn new(docs: Vec<(Namespace, DocId, Vec<ChangeHash>)>) -> Self {
        let mut items: Vec<Item> = docs
            .into_iter()
            .map(|(ns, id, heads)| Item {
                position: position(&ns, &id),
                print: print(&ns, &id, &heads),
                key: (ns, id),
            })
            .collect();
        items.sort_unstable_by_key(|i| i.position);
        let mut sums = Vec::with_capacity(items.len() + 1);
        let mut sum = 0u64;
        sums.push(sum);
        for i in &items {
            sum = sum.wrapping_add(i.print);
            sums.push(sum);
        }
        Self {
            items,
            sums,
            to_send: Vec::new(),
            found: 0,
        }
    }

    /// Documents compared on this side.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether this side holds no document to compare.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Differences found on this side so far.
    pub fn found(&self) -> u64 {
        self.found
    }

    /// Documents found since the last call that this side should send.
    pub fn take_to_send(&mut self) -> Vec<(Namespace, DocId)> {
        std::mem::take(&mut self.to_send)
    }

    /// The first claim: the fingerprint of everything.
    pub fn opening(&self) -> Vec<Claim> {
        vec![Claim {
            level: 0,
            index: 0,
            body: ClaimBody::Print(self.range_print(0, 0)),
        }]
    }

    /// The peer lacks the documents of these tags (this side listed them): they are to
    /// be sent. Tags of no document here are ignored.
    pub fn peer_lacks(&mut self, tags: &[ItemTag]) -> Result<(), ProtocolError> {
        if tags.len() > MAX_CLAIMS {
            return Err(ProtocolError::protocol(
                "too many lacking documents in one audit step",
            ));
        }
        if tags.is_empty() {
            return Ok(());
        }
        let wanted: HashSet<ItemTag> = tags.iter().copied().collect();
        // One scan per step the peer sends; a tag is 64 bits, so a stray match is rare.
        for item in &self.items {
            if wanted.contains(&tag(item.position, item.print)) {
                self.to_send.push(item.key.clone());
            }
        }
        Ok(())
    }

    /// Answers the peer's claims.
    pub fn answer(&mut self, claims: &[Claim]) -> Result<Step, ProtocolError> {
        if claims.len() > MAX_CLAIMS {
            return Err(ProtocolError::protocol("too many claims in one audit step"));
        }
        let mut step = Step::default();
        for claim in claims {
            check_range(claim.level, claim.index)?;
            match &claim.body {
                ClaimBody::Print(theirs) => {
                    if self.range_print(claim.level, claim.index) != *theirs {
                        step.claims.push(self.differing(claim.level, claim.index));
                    }
                }
                ClaimBody::Split(prints) => {
                    if claim.level >= MAX_LEVEL {
                        return Err(ProtocolError::protocol(
                            "audit range split past the last level",
                        ));
                    }
                    for (c, theirs) in prints.iter().enumerate() {
                        let index = (claim.index << BRANCH_BITS) | c as u64;
                        if self.range_print(claim.level + 1, index) != *theirs {
                            step.claims.push(self.differing(claim.level + 1, index));
                        }
                    }
                }
                ClaimBody::Items(tags) => {
                    if tags.len() > MAX_LISTED {
                        return Err(ProtocolError::protocol("too many items in one audit range"));
                    }
                    self.compare_items(claim.level, claim.index, tags, &mut step.lacking);
                }
            }
        }
        Ok(step)
    }

    /// What this side claims of a range found differing: its items if few, else the
    /// fingerprints of its sub-ranges.
    fn differing(&self, level: u8, index: u64) -> Claim {
        let range = self.range(level, index);
        let body = if range.len() <= LEAF_ITEMS || level >= MAX_LEVEL {
            ClaimBody::Items(
                self.items[range]
                    .iter()
                    .take(MAX_LISTED)
                    .map(|i| tag(i.position, i.print))
                    .collect(),
            )
        } else {
            let mut prints = [[0u8; 5]; 4];
            for (c, p) in prints.iter_mut().enumerate() {
                *p = self.range_print(level + 1, (index << BRANCH_BITS) | c as u64);
            }
            ClaimBody::Split(prints)
        };
        Claim { level, index, body }
    }

    /// Every difference in one range, from the peer's items there and ours.
    fn compare_items(
        &mut self,
        level: u8,
        index: u64,
        theirs: &[ItemTag],
        lacking: &mut Vec<ItemTag>,
    ) {
        let range = self.range(level, index);
        let mut unmatched: Vec<(u32, u32)> = theirs
            .iter()
            .map(|t| {
                let (p, f) = t.split_at(4);
                let word = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
                (word(p), word(f))
            })
            .collect();
        for item in &self.items[range] {
            let (p, f) = (item.position as u32, item.print as u32);
            match unmatched.iter().position(|(tp, _)| *tp == p) {
                Some(at) => {
                    let (_, tf) = unmatched.swap_remove(at);
                    if tf != f {
                        // Both hold it, with other heads: one sync from this side settles
                        // both ways.
                        self.found += 1;
                        self.to_send.push(item.key.clone());
                    }
                }
                None => {
                    self.found += 1;
                    self.to_send.push(item.key.clone());
                }
            }
        }
        for (p, f) in unmatched {
            self.found += 1;
            let mut t = [0u8; 8];
            t[..4].copy_from_slice(&p.to_le_bytes());
            t[4..].copy_from_slice(&f.to_le_bytes());
            lacking.push(t);
        }
    }

    fn range(&self, level: u8, index: u64) -> std::ops::Range<usize> {
        let (start, end) = span(level, index);
        let first = self.items.partition_point(|i| i.position < start);
        let last = match end {
            Some(end) => self.items.partition_point(|i| i.position < end),
            None => self.items.len(),
        };
        first..last
    }

    fn range_print(&self, level: u8, index: u64) -> RangePrint {
        let range = self.range(level, index);
        let sum = self.sums[range.end].wrapping_sub(self.sums[range.start]);
        // The count is mixed in, so ranges whose sums happen to match still differ.
        let mixed = sum ^ (range.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut out = [0u8; 5];
        out.copy_from_slice(&mixed.to_le_bytes()[..5]);
        out
    }
}

fn tag(position: u64, print: u64) -> ItemTag {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&(position as u32).to_le_bytes());
    out[4..].copy_from_slice(&(print as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(i: u32, version: u8) -> (Namespace, DocId, Vec<ChangeHash>) {
        (
            Namespace::new("app").expect("ns"),
            DocId::new(format!("d{i}")).expect("id"),
            vec![ChangeHash([version; 32])],
        )
    }

    /// Runs a whole audit between two sides; returns what each should send, the number
    /// of differences found, and the messages exchanged.
    fn reconcile(
        a: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
        b: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
    ) -> (Vec<String>, Vec<String>, u64, usize) {
        let (mut a, mut b) = (Reconciler::new(a), Reconciler::new(b));
        let mut claims = a.opening();
        let mut messages = 1;
        let mut turn_b = true;
        while !claims.is_empty() {
            let (me, other) = if turn_b {
                (&mut b, &mut a)
            } else {
                (&mut a, &mut b)
            };
            let step = me.answer(&claims).expect("answer");
            other.peer_lacks(&step.lacking).expect("lacks");
            claims = step.claims;
            messages += 1;
            turn_b = !turn_b;
        }
        let names = |r: &mut Reconciler| {
            let mut v: Vec<String> = r.take_to_send().iter().map(|k| k.1.to_string()).collect();
            v.sort();
            v
        };
        let found = a.found() + b.found();
        (names(&mut a), names(&mut b), found, messages)
    }

    #[test]
    fn identical_sides_agree_in_one_round_trip() {
        let docs: Vec<_> = (0..1000).map(|i| doc(i, 1)).collect();
        let (a, b, found, messages) = reconcile(docs.clone(), docs);
        assert!(a.is_empty() && b.is_empty());
        assert_eq!(found, 0);
        assert_eq!(messages, 2, "the opening claim and an empty answer");
    }

    #[test]
    fn every_kind_of_difference_is_found_once_by_exactly_one_side() {
        let mut a: Vec<_> = (0..5000).map(|i| doc(i, 1)).collect();
        let mut b = a.clone();
        a[10] = doc(10, 2); // other heads
        a.push(doc(9001, 1)); // only on a
        b.push(doc(9002, 1)); // only on b
        b.remove(77); // d77 only on a
        let (to_send_a, to_send_b, found, _) = reconcile(a, b);
        assert_eq!(found, 4);
        let mut all = to_send_a.clone();
        all.extend(to_send_b.clone());
        all.sort();
        assert_eq!(all, vec!["d10", "d77", "d9001", "d9002"]);
        assert!(
            to_send_b.contains(&"d9002".to_string()),
            "only b holds d9002"
        );
        assert!(to_send_a.contains(&"d9001".to_string()));
        assert!(to_send_a.contains(&"d77".to_string()));
    }

    #[test]
    fn one_empty_side_gets_everything() {
        let docs: Vec<_> = (0..300).map(|i| doc(i, 1)).collect();
        let (a, b, found, _) = reconcile(Vec::new(), docs);
        assert!(a.is_empty());
        assert_eq!(b.len(), 300);
        assert_eq!(found, 300);
    }

    #[test]
    fn ranges_that_do_not_exist_are_refused() {
        let mut r = Reconciler::new(Vec::new());
        for (level, index) in [(0, 1), (1, 4), (MAX_LEVEL + 1, 0)] {
            let claim = Claim {
                level,
                index,
                body: ClaimBody::Print([0; 5]),
            };
            assert!(r.answer(&[claim]).is_err(), "{level}/{index}");
        }
        let split = Claim {
            level: MAX_LEVEL,
            index: 0,
            body: ClaimBody::Split([[0; 5]; 4]),
        };
        assert!(r.answer(&[split]).is_err());
    }
}
