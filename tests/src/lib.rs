//! Shared helpers for cross-process tests, simulation and benchmarks.

pub mod audit_pair;
pub mod bench;
pub mod blob_files;
pub mod brokers;
pub mod chaos;
pub mod cluster;
pub mod procs;
pub mod rogue;
pub mod sim;
pub mod traffic;

use std::time::{SystemTime, UNIX_EPOCH};

/// A small seeded PRNG (xorshift64*), so every randomized test can print and replay its seed.
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            state: seed ^ 0x9E37_79B9_7F4A_7C15 | 1,
        }
    }

    /// Seeded from `TIDESYNC_SEED` if set (to replay a failure), else from the clock.
    pub fn from_env_or_time() -> Self {
        let seed = std::env::var("TIDESYNC_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        Self::new(seed)
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }
}
