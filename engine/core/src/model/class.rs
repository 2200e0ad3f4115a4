//! Namespace classes: what an operator says matters on a thin link. A class names
//! namespaces (patterns), how urgently their documents go out (`priority`), and whether
//! they go out as they change or in batches (`mode`), perhaps only inside a time window.
//!
//! The session schedules by priority and holds batch documents back; the node's driver
//! carries each priority on its own stream and runs the batch clocks. Namespaces no class
//! names are `normal` and `live`.

use std::time::Duration;

use super::grants::NsPattern;
use super::ids::Namespace;

/// How urgently a class's documents go out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Sent before anything else queued on the link (alerts, safety flags, rollbacks).
    Critical,
    /// Everything not named otherwise.
    #[default]
    Normal,
    /// Sent when nothing critical or normal waits (telemetry, datasets).
    Bulk,
}

impl Priority {
    /// Every priority, most urgent first: the order the scheduler serves them in.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Bulk];

    /// Its position in [`Priority::ALL`], for per-priority arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name configuration files and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }

    /// Parses [`Priority::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// A span of local time of day, such as `01:00-05:00`; one whose end is before its start
/// runs past midnight (`22:00-06:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight the window opens.
    pub start: u16,
    /// Minutes after midnight the window closes.
    pub end: u16,
}

/// Minutes in a day.
const DAY: u16 = 24 * 60;

impl Window {
    /// Parses `HH:MM-HH:MM` (24-hour clock, local time).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("window {s:?}: expected HH:MM-HH:MM, such as 01:00-05:00");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && t.trim().len() == 5).then_some(h * 60 + m)
        };
        let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!(
                "window {s:?} is empty: leave the window out to send at any time"
            ));
        }
        Ok(Self { start, end })
    }

    /// Whether the window is open at this minute of the local day.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        let m = minute_of_day % DAY;
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }

    /// Minutes from `minute_of_day` until the window opens (0 when it is open).
    pub fn minutes_until_open(&self, minute_of_day: u16) -> u16 {
        let m = minute_of_day % DAY;
        if self.contains(m) {
            0
        } else {
            (self.start + DAY - m) % DAY
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// When a class's documents go out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// As soon as they change.
    #[default]
    Live,
    /// Changes are coalesced and go out together at most once per `every`, and only while
    /// `window` (if any) is open. A peer's own message about a document is still answered
    /// at once, so a hub can pull on demand.
    Batch {
        /// Shortest time between two sends to a peer.
        every: Duration,
        /// Local time of day outside which nothing is sent.
        window: Option<Window>,
    },
}

/// One class of namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    /// How status and metrics name it: given, or its patterns joined by commas.
    pub name: String,
    /// The namespaces it covers.
    pub namespaces: Vec<NsPattern>,
    /// How urgently its documents go out.
    pub priority: Priority,
    /// When they go out.
    pub mode: Mode,
    /// Bytes per second its documents may take of each link; `None` for no cap of its own
    /// (the link's cap still holds). Critical classes have none: they may exceed any class
    /// cap, never the link's.
    pub max_rate: Option<u64>,
}

/// Most classes a node may have: each is matched against every namespace sent.
pub const MAX_CLASSES: usize = 64;

/// A node's classes, in the order written: the first whose patterns match a namespace is
/// its class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    list: Vec<Class>,
}

/// Which class a namespace falls in: an index into [`Classes::list`], or the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClassId {
    /// No class names the namespace: normal and live.
    Default,
    /// The class at this index.
    Named(u16),
}

/// The name of the class of namespaces no class names.
pub const DEFAULT_CLASS: &str = "default";

impl Classes {
    /// Checks and takes a list of classes.
    pub fn new(list: Vec<Class>) -> Result<Self, String> {
        if list.len() > MAX_CLASSES {
            return Err(format!("{} classes (at most {MAX_CLASSES})", list.len()));
        }
        for c in &list {
            if c.namespaces.is_empty() {
                return Err(format!("class {:?} names no namespaces", c.name));
            }
            if c.name == DEFAULT_CLASS {
                return Err(format!(
                    "class name {DEFAULT_CLASS:?} is taken by the namespaces no class names"
                ));
            }
            if c.priority == Priority::Critical && c.max_rate.is_some() {
                return Err(format!(
                    "class {:?} is critical and has a max_rate: critical traffic is capped \
                     only by the link's max_rate",
                    c.name
                ));
            }
            if c.max_rate == Some(0) {
                return Err(format!("class {:?}: max_rate must be above 0", c.name));
            }
            if let Mode::Batch { every, .. } = c.mode {
                if every.is_zero() {
                    return Err(format!("class {:?}: every must be above 0", c.name));
                }
            }
        }
        let mut names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("two classes are named {:?}", w[0]));
        }
        Ok(Self { list })
    }

    /// The classes, as configured.
    pub fn list(&self) -> &[Class] {
        &self.list
    }

    /// The class of a namespace.
    pub fn of(&self, ns: &Namespace) -> ClassId {
        self.list
            .iter()
            .position(|c| c.namespaces.iter().any(|p| p.matches(ns)))
            .map_or(ClassId::Default, |i| ClassId::Named(i as u16))
    }

    /// A class by id; `None` for the default class.
    pub fn get(&self, id: ClassId) -> Option<&Class> {
        match id {
            ClassId::Default => None,
            ClassId::Named(i) => self.list.get(usize::from(i)),
        }
    }

    /// The priority of a class.
    pub fn priority(&self, id: ClassId) -> Priority {
        self.get(id).map_or(Priority::Normal, |c| c.priority)
    }

    /// The priority of a namespace's class.
    pub fn priority_of(&self, ns: &Namespace) -> Priority {
        self.priority(self.of(ns))
    }

    /// Whether a class sends in batches.
    pub fn is_batch(&self, id: ClassId) -> bool {
        self.get(id)
            .is_some_and(|c| matches!(c.mode, Mode::Batch { .. }))
    }

    /// A class's name, as status and metrics show it.
    pub fn name(&self, id: ClassId) -> &str {
        self.get(id).map_or(DEFAULT_CLASS, |c| c.name.as_str())
    }

    /// Every class id, the default last.
    pub fn ids(&self) -> impl Iterator<Item = ClassId> + '_ {
        (0..self.list.len() as u16)
            .map(ClassId::Named)
            .chain(std::iter::once(ClassId::Default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, patterns: &[&str], priority: Priority, mode: Mode) -> Class {
        Class {
            name: name.into(),
            namespaces: patterns
                .iter()
                .map(|p| NsPattern::new(*p).expect("pattern"))
                .collect(),
            priority,
            mode,
            max_rate: None,
        }
    }

    #[test]
    fn the_first_matching_class_wins_and_the_rest_is_default() {
        let classes = Classes::new(vec![
            class(
                "alerts",
                &["alerts.*", "flags"],
                Priority::Critical,
                Mode::Live,
            ),
            class("everything-a", &["a*"], Priority::Bulk, Mode::Live),
        ])
        .expect("valid");
        let ns = |s: &str| Namespace::new(s).expect("ns");
        assert_eq!(classes.of(&ns("alerts.fire")), ClassId::Named(0));
        assert_eq!(classes.priority_of(&ns("flags")), Priority::Critical);
        assert_eq!(classes.priority_of(&ns("apples")), Priority::Bulk);
        assert_eq!(classes.of(&ns("models")), ClassId::Default);
        assert_eq!(classes.priority_of(&ns("models")), Priority::Normal);
        assert_eq!(classes.name(ClassId::Default), DEFAULT_CLASS);
    }

    #[test]
    fn classes_that_cannot_work_are_refused_with_the_reason() {
        let mut critical = class("c", &["x"], Priority::Critical, Mode::Live);
        critical.max_rate = Some(1000);
        let err = Classes::new(vec![critical]).expect_err("refused");
        assert!(err.contains("critical"), "{err}");
        let twice = vec![
            class("t", &["x"], Priority::Bulk, Mode::Live),
            class("t", &["y"], Priority::Bulk, Mode::Live),
        ];
        assert!(Classes::new(twice)
            .expect_err("refused")
            .contains("two classes"));
        let zero = Mode::Batch {
            every: Duration::ZERO,
            window: None,
        };
        assert!(Classes::new(vec![class("z", &["x"], Priority::Bulk, zero)]).is_err());
    }

    #[test]
    fn windows_parse_and_wrap_past_midnight() {
        let night = Window::parse("01:00-05:00").expect("valid");
        assert!(night.contains(60) && night.contains(299));
        assert!(!night.contains(300) && !night.contains(59));
        assert_eq!(night.minutes_until_open(0), 60);
        assert_eq!(night.minutes_until_open(300), 20 * 60);
        assert_eq!(night.minutes_until_open(120), 0);
        let late = Window::parse("22:00-06:00").expect("valid");
        assert!(late.contains(23 * 60) && late.contains(0) && late.contains(359));
        assert!(!late.contains(360) && !late.contains(12 * 60));
        assert_eq!(late.to_string(), "22:00-06:00");
        for bad in [
            "1:00-5:00",
            "01:00",
            "25:00-01:00",
            "01:60-02:00",
            "03:00-03:00",
            "x",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }
}
