//! The clocks of batch classes on one link: when each may send what it holds.
//!
//! A batch class sends at most once per `every`, and only while its window (local time of
//! day) is open. The first send on a new connection may go at once: nothing of the class
//! went to the peer on it yet. The local time comes from a [`LocalClock`], so tests can
//! move it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ClassId, Classes, Mode, Window};

/// Where a node reads the local time of day: minutes after local midnight.
#[derive(Clone)]
pub struct LocalClock(pub Arc<dyn Fn() -> u16 + Send + Sync>);

impl LocalClock {
    /// The system's local time (the `TZ` variable, else `/etc/localtime`).
    pub fn system() -> Self {
        Self(Arc::new(|| {
            use chrono::Timelike;
            let now = chrono::Local::now();
            (now.hour() * 60 + now.minute()) as u16
        }))
    }

    /// Minutes after local midnight, now.
    pub fn minute(&self) -> u16 {
        (self.0)()
    }
}

impl Default for LocalClock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for LocalClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LocalClock({:02}:{:02})",
            self.minute() / 60,
            self.minute() % 60
        )
    }
}

/// How often a closed window is looked at again.
const WINDOW_RECHECK: Duration = Duration::from_secs(1);

/// One link's batch clocks.
pub struct BatchClock {
    classes: Vec<(ClassId, Duration, Option<Window>)>,
    last: HashMap<ClassId, Instant>,
    clock: LocalClock,
}

impl std::fmt::Debug for BatchClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchClock")
            .field("classes", &self.classes)
            .finish()
    }
}

impl BatchClock {
    /// The clocks of every batch class.
    pub fn new(classes: &Classes, clock: LocalClock) -> Self {
        let classes = classes
            .ids()
            .filter_map(|id| match classes.get(id)?.mode {
                Mode::Batch { every, window } => Some((id, every, window)),
                Mode::Live => None,
            })
            .collect();
        Self {
            classes,
            last: HashMap::new(),
            clock,
        }
    }

    /// The classes that hold documents (`holds`) and may send them now; each is taken as
    /// sent.
    pub fn due(&mut self, now: Instant, holds: impl Fn(ClassId) -> bool) -> Vec<ClassId> {
        if self.classes.is_empty() {
            return Vec::new();
        }
        let minute = self.clock.minute();
        let mut due = Vec::new();
        for &(id, every, window) in &self.classes {
            let open = window.is_none_or(|w| w.contains(minute));
            let rested = self.last.get(&id).is_none_or(|t| now >= *t + every);
            if open && rested && holds(id) {
                self.last.insert(id, now);
                due.push(id);
            }
        }
        due
    }

    /// When to look again, if any class holds documents.
    pub fn next_wake(&self, now: Instant, holds: impl Fn(ClassId) -> bool) -> Option<Instant> {
        if self.classes.is_empty() {
            return None;
        }
        let minute = self.clock.minute();
        self.classes
            .iter()
            .filter(|(id, ..)| holds(*id))
            .map(|&(id, every, window)| {
                if window.is_some_and(|w| !w.contains(minute)) {
                    return now + WINDOW_RECHECK;
                }
                self.last.get(&id).map_or(now, |t| (*t + every).max(now))
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Class, NsPattern, Priority};
    use std::sync::atomic::{AtomicU16, Ordering};

    #[test]
    fn a_batch_class_sends_once_per_period_and_only_inside_its_window() {
        let batch = |name: &str, window| Class {
            name: name.into(),
            namespaces: vec![NsPattern::new(format!("{name}.*")).expect("pattern")],
            priority: Priority::Bulk,
            mode: Mode::Batch {
                every: Duration::from_secs(5),
                window,
            },
            max_rate: None,
        };
        let classes = Classes::new(vec![
            batch("telemetry", None),
            batch("night", Some(Window::parse("01:00-05:00").expect("window"))),
        ])
        .expect("classes");
        let minute = Arc::new(AtomicU16::new(12 * 60));
        let m = minute.clone();
        let mut clock = BatchClock::new(
            &classes,
            LocalClock(Arc::new(move || m.load(Ordering::Relaxed))),
        );
        let t0 = Instant::now();
        let all = |_| true;
        assert_eq!(
            clock.due(t0, all),
            vec![ClassId::Named(0)],
            "night is closed at noon"
        );
        assert!(clock.due(t0 + Duration::from_secs(4), all).is_empty());
        assert_eq!(
            clock.next_wake(t0 + Duration::from_secs(4), |c| c == ClassId::Named(0)),
            Some(t0 + Duration::from_secs(5))
        );
        assert_eq!(
            clock.due(t0 + Duration::from_secs(5), all),
            vec![ClassId::Named(0)]
        );
        minute.store(60, Ordering::Relaxed);
        assert_eq!(
            clock.due(t0 + Duration::from_secs(6), all),
            vec![ClassId::Named(1)],
            "the window opened"
        );
        assert!(
            clock
                .due(t0 + Duration::from_secs(20), |_| false)
                .is_empty(),
            "nothing held, nothing sent"
        );
    }
}
