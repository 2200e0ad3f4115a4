//! Bandwidth budgets: token buckets that cap the bytes per second a node sends on a link
//! (`--max-rate`) and per class (`[[class]] max_rate`).
//!
//! A bucket may run into debt: a writer waits until the bucket is above its floor, writes
//! a slice, and pays for it after. Everything but critical traffic waits for a full
//! bucket (floor 0); critical traffic may go a burst into debt, so it never waits behind a
//! backlog that the link's cap holds back, and the others pay the debt back: over any
//! stretch longer than a burst, the link cap holds for all of it together.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::{ClassId, Classes, Priority};

/// Bytes per second, with a burst of 20 ms (at least 16 KiB): a capped link stays just
/// under its cap, so a longer burst would only fill the modem's queue, which everything
/// after it (a critical document) then waits behind.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens (bytes) and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A bucket of `rate` bytes per second (at least 1 KiB/s), full.
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1024) as f64;
        let burst = (rate / 50.0).max(16.0 * 1024.0);
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Tokens now (negative in debt).
    fn level(&self, s: &mut (f64, Instant)) -> f64 {
        let now = Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
        s.1 = now;
        s.0
    }

    /// How long until the bucket is above `floor` bytes of debt (`None`: it is now).
    pub fn wait(&self, floor_debt: f64) -> Option<Duration> {
        let Ok(mut s) = self.state.lock() else {
            return None;
        };
        let level = self.level(&mut s);
        (level <= -floor_debt)
            .then(|| Duration::from_secs_f64((-floor_debt - level) / self.rate + 0.0005))
    }

    /// Pays for `n` bytes sent.
    pub fn debit(&self, n: usize) {
        if let Ok(mut s) = self.state.lock() {
            self.level(&mut s);
            s.0 -= n as f64;
        }
    }

    /// Waits (blocking the thread) until the bucket is half full, then pays for `n`
    /// bytes: for the threads that encode blob streams. Documents go once it is not in
    /// debt, so when both wait, documents go first.
    pub fn take_blocking(&self, n: usize) {
        while let Some(w) = self.wait(-self.burst / 2.0) {
            std::thread::sleep(w);
        }
        self.debit(n);
    }

    /// The burst: how far critical traffic may run the bucket into debt.
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// The budgets of one link: the link's cap and each class's, as the node's settings say.
#[derive(Debug, Default)]
pub struct LinkPacing {
    link: Option<Arc<Bucket>>,
    /// By class index; `None` for classes without a cap.
    classes: Vec<Option<Bucket>>,
}

/// Largest slice a paced stream writes at once: the granularity of the caps.
pub const PACED_SLICE: usize = 16 * 1024;

impl LinkPacing {
    /// The buckets for one new link.
    pub fn new(link_rate: Option<u64>, classes: &Classes) -> Self {
        Self {
            link: link_rate.map(|r| Arc::new(Bucket::new(r))),
            classes: classes
                .list()
                .iter()
                .map(|c| c.max_rate.map(Bucket::new))
                .collect(),
        }
    }

    /// The link's bucket, shared with the link's blob streams.
    pub fn link(&self) -> Option<Arc<Bucket>> {
        self.link.clone()
    }

    /// Whether anything on this link is capped.
    pub fn is_paced(&self) -> bool {
        self.link.is_some() || self.classes.iter().any(Option::is_some)
    }

    fn class(&self, class: ClassId) -> Option<&Bucket> {
        match class {
            ClassId::Default => None,
            ClassId::Named(i) => self.classes.get(usize::from(i))?.as_ref(),
        }
    }

    /// How long a frame of `class`, sent at `priority`, must wait before its next slice
    /// (`None`: it may go now).
    pub fn wait(&self, priority: Priority, class: ClassId) -> Option<Duration> {
        let critical = priority == Priority::Critical;
        let link = self
            .link
            .as_ref()
            .and_then(|b| b.wait(if critical { b.burst() } else { 0.0 }));
        // Critical traffic may exceed any class cap; critical classes have none anyway.
        let class = (!critical)
            .then(|| self.class(class).and_then(|b| b.wait(0.0)))
            .flatten();
        link.max(class)
    }

    /// Whether a frame of `class`, sent at `priority`, waits for its class's own cap
    /// (not the link's).
    pub fn class_waits(&self, priority: Priority, class: ClassId) -> bool {
        priority != Priority::Critical && self.class(class).is_some_and(|b| b.wait(0.0).is_some())
    }

    /// Pays for `n` bytes of a frame of `class`.
    pub fn debit(&self, class: ClassId, n: usize) {
        if let Some(b) = &self.link {
            b.debit(n);
        }
        if let Some(b) = self.class(class) {
            b.debit(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_rate_and_critical_may_borrow_a_burst() {
        let b = Bucket::new(1_000_000);
        assert_eq!(b.wait(0.0), None, "starts full");
        b.debit(20_000 + 100_000);
        let w = b.wait(0.0).expect("in debt");
        assert!(
            w >= Duration::from_millis(90) && w <= Duration::from_millis(110),
            "{w:?}"
        );
        assert_eq!(b.wait(b.burst() * 6.0), None, "critical goes deeper");
        assert!(b.wait(b.burst()).is_some());
    }
}
