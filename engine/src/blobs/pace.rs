//! A token bucket that caps the bytes per second of a link's blob streams. Blocking: it
//! runs on the threads that encode blob streams.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes per second, with a burst of a quarter second.
#[derive(Debug)]
pub struct Pace {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Pace {
    /// A bucket of `rate` bytes per second (at least 1 KiB/s).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1024);
        Self {
            rate,
            state: Mutex::new((rate as f64 / 4.0, Instant::now())),
        }
    }

    /// Waits until `n` bytes may go.
    pub fn take(&self, n: usize) {
        let wait = {
            let Ok(mut s) = self.state.lock() else {
                return;
            };
            let now = Instant::now();
            let burst = self.rate as f64 / 4.0;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate as f64).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.rate as f64))
        };
        if let Some(w) = wait {
            std::thread::sleep(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_the_rate_after_its_burst() {
        let pace = Pace::new(400_000);
        let start = Instant::now();
        for _ in 0..20 {
            pace.take(10_000);
        }
        // 200 KB at 400 KB/s with a 100 KB burst: at least a quarter second.
        assert!(
            start.elapsed() >= Duration::from_millis(240),
            "{:?}",
            start.elapsed()
        );
    }
}
