//! Time out for peers that broke the protocol.
//!
//! A peer dropped for a protocol error (a hostile Bloom filter, a document nested past the
//! limit, an undecodable frame) could otherwise reconnect at once and send the same thing
//! again, as often as it can finish a handshake, from as many connections as it likes:
//! each attempt costs the node a connection's worth of parsing and memory. So its node id
//! is refused for a while after each such error: one second after the first, twice as long
//! after each further one, at most [`MAX_PENALTY`]. The count is forgotten after
//! [`FORGIVE_AFTER`] without an error. A refused connection costs only the handshake.
//!
//! Honest nodes do not break the protocol; one that does (an incompatible version, a bug)
//! retries with its own backoff anyway, so the penalty costs it little.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::NodeId;

/// The penalty after the first protocol error.
pub const FIRST_PENALTY: Duration = Duration::from_secs(1);
/// The longest penalty.
pub const MAX_PENALTY: Duration = Duration::from_secs(300);
/// A peer without a protocol error for this long starts again from [`FIRST_PENALTY`].
pub const FORGIVE_AFTER: Duration = Duration::from_secs(600);
/// Peers remembered at most; node ids come from certificates the CA signed, so this is
/// only reached by a very large fleet misbehaving at once. The oldest are forgotten first.
const MAX_REMEMBERED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Record {
    strikes: u32,
    last: Instant,
    until: Instant,
}

/// Who is refused until when. Shared by every connection of a node.
#[derive(Debug, Default)]
pub struct Penalties {
    records: Mutex<HashMap<NodeId, Record>>,
}

impl Penalties {
    /// Records a protocol error of `peer` at `now`; returns how long it is refused.
    pub fn strike(&self, peer: &NodeId, now: Instant) -> Duration {
        let Ok(mut records) = self.records.lock() else {
            return Duration::ZERO;
        };
        if records.len() >= MAX_REMEMBERED && !records.contains_key(peer) {
            records.retain(|_, r| now.saturating_duration_since(r.last) < FORGIVE_AFTER);
            if records.len() >= MAX_REMEMBERED {
                if let Some(oldest) = records
                    .iter()
                    .min_by_key(|(_, r)| r.last)
                    .map(|(k, _)| k.clone())
                {
                    records.remove(&oldest);
                }
            }
        }
        let strikes = match records.get(peer) {
            Some(r) if now.saturating_duration_since(r.last) < FORGIVE_AFTER => r.strikes + 1,
            _ => 1,
        };
        let penalty = FIRST_PENALTY
            .saturating_mul(1u32 << (strikes - 1).min(16))
            .min(MAX_PENALTY);
        records.insert(
            peer.clone(),
            Record {
                strikes,
                last: now,
                until: now + penalty,
            },
        );
        penalty
    }

    /// How much longer `peer` is refused at `now`, if it is.
    pub fn refused_for(&self, peer: &NodeId, now: Instant) -> Option<Duration> {
        let records = self.records.lock().ok()?;
        let r = records.get(peer)?;
        (r.until > now).then(|| r.until - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).expect("id")
    }

    #[test]
    fn penalties_double_up_to_the_cap_and_are_forgiven() {
        let p = Penalties::default();
        let t0 = Instant::now();
        let a = id("a");
        assert_eq!(p.refused_for(&a, t0), None);
        assert_eq!(p.strike(&a, t0), FIRST_PENALTY);
        assert!(p.refused_for(&a, t0).is_some());
        assert_eq!(p.refused_for(&id("b"), t0), None, "only the offender");
        assert_eq!(p.refused_for(&a, t0 + FIRST_PENALTY), None, "served");
        let mut t = t0;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            t += Duration::from_secs(2);
            last = p.strike(&a, t);
        }
        assert_eq!(last, MAX_PENALTY);
        let later = t + FORGIVE_AFTER;
        assert_eq!(p.refused_for(&a, later), None);
        assert_eq!(p.strike(&a, later), FIRST_PENALTY, "forgiven");
    }

    #[test]
    fn memory_is_bounded() {
        let p = Penalties::default();
        let t0 = Instant::now();
        for i in 0..MAX_REMEMBERED + 10 {
            p.strike(&id(&format!("n{i}")), t0 + Duration::from_millis(i as u64));
        }
        let n = p.records.lock().expect("lock").len();
        assert_eq!(n, MAX_REMEMBERED);
        assert!(
            p.refused_for(&id("n0"), t0).is_none(),
            "the oldest forgotten"
        );
    }
}
