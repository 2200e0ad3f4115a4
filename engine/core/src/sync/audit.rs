//! The consistency audit's reconciliation: two nodes find which documents they hold
//! differently without shipping them, at a cost that grows with the differences, not with
//! the documents.
//!
//! It is range-based set reconciliation (Meyer, "Range-Based Set Reconciliation", 2022;
//! the idea behind negentropy and iroh's ranger) over the items (namespace, id, heads).
//! Each item sits at a position given by the hash of its name, and carries a fingerprint,
//! the hash of its name and heads. A range of positions is summed up by the sum of its
//! fingerprints: equal sums, equal ranges. The ranges are fixed: level `l` cuts the
//! position space into `4^l` equal ranges. Nothing names a range on the wire: each side
//! remembers the ranges it claimed in its last message, in order, and the answer marks
//! the differing ones in a bitmap and answers each of those, in the same order, with the
//! fingerprints of its four sub-ranges (claims in their turn), or, once the answering
//! side holds few items there, with the items themselves (a short tag each). The side
//! that gets items compares them with its own: every difference in that range is found
//! there.
//!
//! It repairs nothing: it reports which documents this side should send (it holds them,
//! and the peer lacks them or holds other heads) and which the peer should send (this
//! side lacks them). Both then run the normal per-document sync for exactly those.

use std::collections::HashMap;

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
/// each, 8 bytes) rather than four fingerprints (16 bytes, and more to come below them).
pub const LEAF_ITEMS: usize = 3;
/// Most item tags one answer may list at the last level.
pub const MAX_LISTED: usize = 1024;
/// Most answers, ranges claimed and lacking tags in one audit message: a message stays
/// under [`MAX_AUDIT_FRAME`]. An audit that needs more (many thousands of differences
/// scattered over a large store) stops with [`AuditFault::TooManyDifferences`].
pub const MAX_CLAIMS: usize = 1 << 15;
/// Largest audit message, in bytes, checked before it is decoded.
pub const MAX_AUDIT_FRAME: usize = 2 << 20;

/// Why an audit step cannot be answered.
#[derive(Debug)]
pub enum AuditFault {
    /// The peer broke the protocol.
    Peer(ProtocolError),
    /// This side's answer would not fit one message: too many differences at once.
    TooManyDifferences,
}

impl From<ProtocolError> for AuditFault {
    fn from(e: ProtocolError) -> Self {
        Self::Peer(e)
    }
}

/// A range's fingerprint on the wire: 32 bits of the sum. Every hash is keyed with the
/// audit's random salt, so two different ranges that happen to match fool one audit, not
/// every audit after it.
pub type RangePrint = [u8; 4];
/// An item on the wire: 32 bits of its position (the bits its range does not fix) and 32
/// bits of its fingerprint.
pub type ItemTag = [u8; 8];

/// The answer for one range the other side claimed and this side holds differently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The fingerprints of the range's four sub-ranges: this side's claims for them.
    Split([RangePrint; 4]),
    /// Every item this side holds in the range.
    Items(Vec<ItemTag>),
}

/// One audit message after the opening: the answer to the other side's claims.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// One bit per range the receiver claimed in its last message, in order (least
    /// significant bit first): set where the sender holds it differently.
    pub differ: Vec<u8>,
    /// For each set bit, in order, the sender's answer for that range. None: the sender
    /// claims nothing more, and the audit's comparison is over.
    pub answers: Vec<Answer>,
    /// Items of the receiver's last listings that the sender lacks: the receiver sends
    /// those documents.
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
    /// The ranges this side claimed in its last message, in order: what the peer's next
    /// step answers.
    claimed: Vec<(u8, u64)>,
    /// The items this side listed in its last message: what the peer may say it lacks.
    listed: HashMap<ItemTag, (Namespace, DocId)>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("items", &self.items.len())
            .field("found", &self.found)
            .finish()
    }
}

fn hash64(salt: u64, parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&salt.to_le_bytes());
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
fn position(salt: u64, ns: &Namespace, id: &DocId) -> u64 {
    hash64(salt, &[ns.as_str().as_bytes(), id.as_str().as_bytes()])
}

/// What a document holds: its name and its heads, in order.
fn print(salt: u64, ns: &Namespace, id: &DocId, heads: &[ChangeHash]) -> u64 {
    let mut heads: Vec<&[u8]> = heads.iter().map(|h| h.0.as_slice()).collect();
    heads.sort_unstable();
    let mut parts: Vec<&[u8]> = vec![ns.as_str().as_bytes(), id.as_str().as_bytes()];
    parts.extend(heads);
    hash64(salt, &parts)
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

impl Reconciler {
    /// This side's documents and their heads, in any order, hashed with the audit's
    /// `salt` (the same on both sides).
    pub fn new(docs: Vec<(Namespace, DocId, Vec<ChangeHash>)>, salt: u64) -> Self {
        let mut items: Vec<Item> = docs
            .into_iter()
            .map(|(ns, id, heads)| Item {
                position: position(salt, &ns, &id),
                print: print(salt, &ns, &id, &heads),
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
            claimed: Vec::new(),
            listed: HashMap::new(),
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

    /// The opening claim: the fingerprint of everything.
    pub fn opening(&mut self) -> RangePrint {
        self.claimed = vec![(0, 0)];
        self.range_print(0, 0)
    }

    /// The answer to the peer's opening claim.
    pub fn answer_opening(&mut self, root: RangePrint) -> Step {
        let mut step = Step::default();
        self.claimed.clear();
        self.listed.clear();
        self.compare_print(0, 0, root, 0, &mut step);
        step
    }

    /// Takes the peer's answer to this side's last claims: compares what it claims in
    /// turn, notes the documents to send, and returns this side's answer. `None` when the
    /// peer answered nothing: the comparison is over, and nothing is sent back. A step
    /// with answers is always answered, if only with what this side lacks, so a side that
    /// sends one knows when the comparison is over.
    pub fn answer(&mut self, theirs: &Step) -> Result<Option<Step>, AuditFault> {
        let refuse = |why: &str| AuditFault::Peer(ProtocolError::protocol(why.to_owned()));
        if theirs.answers.len() > MAX_CLAIMS || theirs.lacking.len() > MAX_CLAIMS {
            return Err(refuse("too large an audit step"));
        }
        if theirs.differ.len() != self.claimed.len().div_ceil(8) {
            return Err(refuse("audit step answers other ranges than claimed"));
        }
        self.peer_lacks(&theirs.lacking);
        self.listed.clear();
        let claimed = std::mem::take(&mut self.claimed);
        let differing = claimed
            .iter()
            .enumerate()
            .filter(|(k, _)| theirs.differ[k / 8] & (1 << (k % 8)) != 0)
            .map(|(_, r)| *r);
        let mut answers = theirs.answers.iter();
        let mut step = Step::default();
        let mut bit = 0usize;
        for (level, index) in differing {
            let Some(answer) = answers.next() else {
                return Err(refuse("an audit step lacks answers"));
            };
            match answer {
                Answer::Split(prints) => {
                    if level >= MAX_LEVEL {
                        return Err(refuse("audit range split past the last level"));
                    }
                    for (c, print) in prints.iter().enumerate() {
                        let child = (index << BRANCH_BITS) | c as u64;
                        self.compare_print(level + 1, child, *print, bit, &mut step);
                        bit += 1;
                    }
                }
                Answer::Items(tags) => {
                    // An honest side lists a range only once it holds few items there.
                    let most = if level >= MAX_LEVEL {
                        MAX_LISTED
                    } else {
                        LEAF_ITEMS
                    };
                    if tags.len() > most {
                        return Err(refuse("too many items in one audit range"));
                    }
                    self.compare_items(level, index, tags, &mut step.lacking);
                }
            }
        }
        if answers.next().is_some() {
            return Err(refuse("an audit step has more answers than ranges"));
        }
        if step.answers.len() > MAX_CLAIMS
            || self.claimed.len() > MAX_CLAIMS
            || step.lacking.len() > MAX_CLAIMS
        {
            return Err(AuditFault::TooManyDifferences);
        }
        if theirs.answers.is_empty() {
            return Ok(None);
        }
        Ok(Some(step))
    }

    /// The peer claims `theirs` for a range, the `bit`th it claimed in its message:
    /// marks it and answers it in `step` if this side holds it differently.
    fn compare_print(
        &mut self,
        level: u8,
        index: u64,
        theirs: RangePrint,
        bit: usize,
        step: &mut Step,
    ) {
        if step.differ.len() <= bit / 8 {
            step.differ.resize(bit / 8 + 1, 0);
        }
        if self.range_print(level, index) == theirs {
            return;
        }
        step.differ[bit / 8] |= 1 << (bit % 8);
        let range = self.range(level, index);
        let answer = if range.len() <= LEAF_ITEMS || level >= MAX_LEVEL {
            let mut tags = Vec::with_capacity(range.len().min(MAX_LISTED));
            for item in self.items[range].iter().take(MAX_LISTED) {
                let t = tag(item.position, item.print);
                self.listed.insert(t, item.key.clone());
                tags.push(t);
            }
            Answer::Items(tags)
        } else {
            let mut prints = [[0u8; 4]; 4];
            for (c, p) in prints.iter_mut().enumerate() {
                let child = (index << BRANCH_BITS) | c as u64;
                *p = self.range_print(level + 1, child);
                self.claimed.push((level + 1, child));
            }
            Answer::Split(prints)
        };
        step.answers.push(answer);
    }

    /// The peer lacks the documents of these tags: those this side listed in its last
    /// message are to be sent; others are ignored.
    fn peer_lacks(&mut self, tags: &[ItemTag]) {
        for t in tags {
            if let Some(key) = self.listed.remove(t) {
                self.to_send.push(key);
            }
        }
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
        let word = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
        // Position bits to print bits; a duplicate tag from the peer counts once.
        let mut unmatched: HashMap<u32, u32> = theirs
            .iter()
            .map(|t| (word(&t[..4]), word(&t[4..])))
            .collect();
        for item in &self.items[range] {
            let (p, f) = (item.position as u32, item.print as u32);
            match unmatched.remove(&p) {
                Some(tf) => {
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
        let mut unmatched: Vec<(u32, u32)> = unmatched.into_iter().collect();
        unmatched.sort_unstable();
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
        let mut out = [0u8; 4];
        out.copy_from_slice(&mixed.to_le_bytes()[..4]);
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

    struct Outcome {
        a_sends: Vec<String>,
        b_sends: Vec<String>,
        found: u64,
        messages: usize,
        bytes: usize,
    }

    /// Runs a whole audit between two sides, `a` opening.
    fn reconcile(
        a: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
        b: Vec<(Namespace, DocId, Vec<ChangeHash>)>,
    ) -> Outcome {
        let (mut a, mut b) = (Reconciler::new(a, 7), Reconciler::new(b, 7));
        let root = a.opening();
        let mut bytes = 4;
        let mut messages = 1;
        let mut step = Some(b.answer_opening(root));
        let mut a_turn = true;
        while let Some(s) = step.take() {
            bytes += postcard::to_stdvec(&s).expect("encode").len();
            messages += 1;
            let me = if a_turn { &mut a } else { &mut b };
            step = me.answer(&s).expect("answer");
            a_turn = !a_turn;
        }
        let names = |r: &mut Reconciler| {
            let mut v: Vec<String> = r.take_to_send().iter().map(|k| k.1.to_string()).collect();
            v.sort();
            v
        };
        let found = a.found() + b.found();
        Outcome {
            a_sends: names(&mut a),
            b_sends: names(&mut b),
            found,
            messages,
            bytes,
        }
    }

    #[test]
    fn identical_sides_agree_in_one_round_trip() {
        let docs: Vec<_> = (0..1000).map(|i| doc(i, 1)).collect();
        let o = reconcile(docs.clone(), docs);
        assert!(o.a_sends.is_empty() && o.b_sends.is_empty());
        assert_eq!(o.found, 0);
        assert_eq!(o.messages, 2, "the opening claim and an empty answer");
        assert!(o.bytes < 16, "{}", o.bytes);
    }

    #[test]
    fn every_kind_of_difference_is_found_once_by_exactly_one_side() {
        let mut a: Vec<_> = (0..5000).map(|i| doc(i, 1)).collect();
        let mut b = a.clone();
        a[10] = doc(10, 2); // other heads
        a.push(doc(9001, 1)); // only on a
        b.push(doc(9002, 1)); // only on b
        b.remove(77); // d77 only on a
        let o = reconcile(a, b);
        assert_eq!(o.found, 4);
        let mut all = o.a_sends.clone();
        all.extend(o.b_sends.clone());
        all.sort();
        assert_eq!(all, vec!["d10", "d77", "d9001", "d9002"]);
        assert!(
            o.b_sends.contains(&"d9002".to_string()),
            "only b holds d9002"
        );
        assert!(o.a_sends.contains(&"d9001".to_string()));
        assert!(o.a_sends.contains(&"d77".to_string()));
    }

    #[test]
    fn one_empty_side_gets_everything() {
        let docs: Vec<_> = (0..300).map(|i| doc(i, 1)).collect();
        let o = reconcile(Vec::new(), docs);
        assert!(o.a_sends.is_empty());
        assert_eq!(o.b_sends.len(), 300);
        assert_eq!(o.found, 300);
    }

    /// The cost grows with the differences: 1,000 of 100,000 cost less than twice the
    /// bytes of listing those documents' names and heads.
    #[test]
    fn a_thousand_differences_in_a_hundred_thousand_cost_little() {
        let docs: Vec<_> = (0..100_000).map(|i| doc(i, 1)).collect();
        let mut b = docs.clone();
        for i in 0..1000 {
            b[i * 100].2 = vec![ChangeHash([2; 32])];
        }
        let o = reconcile(docs, b);
        assert_eq!(o.found, 1000);
        let listed: usize = (0..1000).map(|i| format!("d{}", i * 100).len() + 32).sum();
        assert!(o.bytes < 2 * listed, "{} bytes against {listed}", o.bytes);
    }

    #[test]
    fn steps_that_do_not_fit_the_claims_are_refused() {
        let docs: Vec<_> = (0..100).map(|i| doc(i, 1)).collect();
        let mut a = Reconciler::new(docs, 7);
        let _ = a.opening();
        let wrong_bitmap = Step {
            differ: vec![1, 0],
            answers: vec![Answer::Items(Vec::new())],
            lacking: Vec::new(),
        };
        assert!(a.answer(&wrong_bitmap).is_err());
        let _ = a.opening();
        let missing = Step {
            differ: vec![1],
            answers: Vec::new(),
            lacking: Vec::new(),
        };
        assert!(a.answer(&missing).is_err());
        let _ = a.opening();
        let extra = Step {
            differ: vec![0],
            answers: vec![Answer::Split([[0; 4]; 4])],
            lacking: Vec::new(),
        };
        assert!(a.answer(&extra).is_err());
        let _ = a.opening();
        let too_many = Step {
            differ: vec![1],
            answers: vec![Answer::Items(vec![[0; 8]; MAX_LISTED + 1])],
            lacking: Vec::new(),
        };
        assert!(a.answer(&too_many).is_err());
    }

    /// More differences than one message can carry end the audit with a fault of its
    /// own, not a protocol error (which would cut off an honest peer).
    #[test]
    fn too_many_differences_stop_the_audit_without_blaming_the_peer() {
        let a: Vec<_> = (0..100_000).map(|i| doc(i, 1)).collect();
        let b: Vec<_> = (0..100_000).map(|i| doc(i, 2)).collect();
        let (mut a, mut b) = (Reconciler::new(a, 3), Reconciler::new(b, 3));
        let root = a.opening();
        let mut step = b.answer_opening(root);
        let mut a_turn = true;
        loop {
            let me = if a_turn { &mut a } else { &mut b };
            match me.answer(&step) {
                Ok(Some(next)) => step = next,
                Ok(None) => panic!("the comparison ended"),
                Err(AuditFault::TooManyDifferences) => break,
                Err(AuditFault::Peer(e)) => panic!("blamed the peer: {e}"),
            }
            a_turn = !a_turn;
        }
    }
}
