//! A per-peer budget for warning lines: a peer that misbehaves on every frame must not be
//! able to fill the node's log (or its disk) at network speed.

use std::time::{Duration, Instant};

/// Lines a peer may cause at once.
const BURST: u32 = 10;
/// One more line allowed per this much time.
const REFILL: Duration = Duration::from_secs(1);

/// Token bucket of log lines for one connection; time comes from the caller.
#[derive(Debug)]
pub struct LogLimit {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

impl LogLimit {
    /// A full bucket at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`; `Some(n)` if so, `n` being how many were
    /// suppressed since the last one written (to say so in it).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let earned = now.saturating_duration_since(self.refilled).as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled = now;
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_second_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(t0);
        for _ in 0..BURST {
            assert_eq!(l.allow(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow(t0), None, "a flood in the same instant is dropped");
        }
        assert_eq!(
            l.allow(t0 + REFILL),
            Some(1000),
            "the next line says how many"
        );
        assert_eq!(l.allow(t0 + REFILL), None);
        assert_eq!(l.allow(t0 + REFILL * 100), Some(1));
    }
}
