//! Benchmark scenarios of `tidesync-bench`. Each measures Tidesync and, in the same run,
//! the raw limit of the same work, and returns its figures as JSON.

pub mod artifact;
pub mod audit;
pub mod bridge;
pub mod constrained;
pub mod hostile;
pub mod live;
pub mod priority;
pub mod raw_path;
pub mod scale;
pub mod sync;
pub mod write;

use std::time::Duration;

use tidesync::model::Namespace;
use tidesync::store::Store;

/// The `p`-th percentile (0..=100) of `samples`, which it sorts. Zero when empty.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// Whether `b` holds exactly `a`'s `expect` documents of `ns`, at the same heads.
pub fn same_docs(a: &Store, b: &Store, ns: &Namespace, expect: usize) -> anyhow::Result<bool> {
    let la: Vec<_> = a.list(ns)?.into_iter().map(|d| (d.id, d.heads)).collect();
    if la.len() != expect {
        return Ok(false);
    }
    let lb: Vec<_> = b.list(ns)?.into_iter().map(|d| (d.id, d.heads)).collect();
    Ok(la == lb)
}

/// Microseconds as a float with one decimal, for tables and JSON.
pub fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// Rounds to two decimals for printing.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut v, 50.0), Duration::from_micros(51));
        assert_eq!(percentile(&mut v, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&mut [], 50.0), Duration::ZERO);
    }
}
