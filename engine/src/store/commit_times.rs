//! How long durable commits take: a fixed-bucket histogram the writer fills and metrics
//! read. Plain atomics, so the store depends on no metrics library.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 50 µs doubling to about 1.6 s.
const BOUNDS: [f64; 16] = {
    let mut b = [0.0; 16];
    let mut i = 0;
    let mut v = 50e-6;
    while i < 16 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

/// Durations of the store's durable commits.
#[derive(Debug, Default)]
pub struct CommitTimes {
    /// Commits per bucket of [`BOUNDS`], then one for longer ones.
    counts: [AtomicU64; BOUNDS.len() + 1],
    /// Total of all durations, in nanoseconds.
    sum_nanos: AtomicU64,
}

/// A reading of [`CommitTimes`].
#[derive(Clone, Debug, PartialEq)]
pub struct CommitTimesSnapshot {
    /// Total seconds.
    pub sum_seconds: f64,
    /// Commits.
    pub count: u64,
    /// Per bucket, its upper bound in seconds (the last is infinite) and the commits that
    /// fell in it (not cumulative).
    pub buckets: Vec<(f64, u64)>,
}

impl CommitTimes {
    /// No commits yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one commit.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> CommitTimesSnapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let bounds = BOUNDS.iter().copied().chain([f64::INFINITY]);
        CommitTimesSnapshot {
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: counts.iter().sum(),
            buckets: bounds.zip(counts).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_land_in_their_bucket() {
        let t = CommitTimes::new();
        t.observe(Duration::from_micros(40));
        t.observe(Duration::from_micros(120));
        t.observe(Duration::from_secs(5));
        let s = t.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (50e-6, 1));
        assert_eq!(s.buckets[2].1, 1, "120 µs is in (100 µs, 200 µs]");
        assert_eq!(s.buckets.last().map(|b| b.1), Some(1));
        assert!((s.sum_seconds - 5.00016).abs() < 1e-9);
    }
}
