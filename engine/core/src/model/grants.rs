//! Namespace patterns and grants: what a node may read and write.
//!
//! A pattern is a namespace, or a prefix ending in `*` (`flags.*`, `*`). A grant pairs a
//! pattern with `ro` or `rw`. Grants travel in node certificates; subscriptions are plain
//! patterns.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

use super::Namespace;

/// A namespace pattern: an exact namespace or a prefix followed by `*`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NsPattern(String);

impl NsPattern {
    /// The pattern that matches every namespace.
    pub fn all() -> Self {
        Self("*".into())
    }

    /// Validates a pattern.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        let ok = match s.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => {
                prefix.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                }) && prefix.len() < Namespace::MAX_LEN
            }
            None => Namespace::new(s.as_str()).is_ok(),
        };
        if ok {
            Ok(Self(s))
        } else {
            Err(ModelError::InvalidPattern(s))
        }
    }

    /// Whether `ns` falls under this pattern.
    pub fn matches(&self, ns: &Namespace) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => ns.as_str().starts_with(prefix),
            None => self.0 == ns.as_str(),
        }
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NsPattern {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<NsPattern> for String {
    fn from(p: NsPattern) -> Self {
        p.0
    }
}

impl FromStr for NsPattern {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for NsPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Read-only or read-write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Access {
    /// May receive documents, not change them.
    #[serde(rename = "ro")]
    ReadOnly,
    /// May receive and change documents.
    #[serde(rename = "rw")]
    ReadWrite,
}

/// One grant: `PATTERN=rw` or `PATTERN=ro`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The namespaces it covers.
    pub pattern: NsPattern,
    /// What it allows there.
    pub access: Access,
}

impl FromStr for Grant {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pattern, access) = s
            .rsplit_once('=')
            .ok_or_else(|| ModelError::InvalidGrant(s.to_owned()))?;
        let access = match access {
            "rw" => Access::ReadWrite,
            "ro" => Access::ReadOnly,
            _ => return Err(ModelError::InvalidGrant(s.to_owned())),
        };
        Ok(Self {
            pattern: NsPattern::new(pattern).map_err(|_| ModelError::InvalidGrant(s.to_owned()))?,
            access,
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Access::ReadOnly => "ro",
            Access::ReadWrite => "rw",
        };
        write!(f, "{}={access}", self.pattern)
    }
}

/// What a peer may do, namespace by namespace. The most generous matching grant applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants(Vec<Grant>);

impl Grants {
    /// Grants as listed.
    pub fn new(grants: Vec<Grant>) -> Self {
        Self(grants)
    }

    /// Read-write on every namespace: what hubs hold.
    pub fn everything() -> Self {
        Self(vec![Grant {
            pattern: NsPattern::all(),
            access: Access::ReadWrite,
        }])
    }

    /// The access granted on `ns`, if any.
    pub fn access(&self, ns: &Namespace) -> Option<Access> {
        self.0
            .iter()
            .filter(|g| g.pattern.matches(ns))
            .map(|g| g.access)
            .max()
    }

    /// Whether documents of `ns` may be sent to the holder.
    pub fn can_read(&self, ns: &Namespace) -> bool {
        self.access(ns).is_some()
    }

    /// Whether changes to `ns` from the holder may be stored.
    pub fn can_write(&self, ns: &Namespace) -> bool {
        self.access(ns) == Some(Access::ReadWrite)
    }

    /// The grants as listed.
    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        Namespace::new(s).expect("namespace")
    }

    #[test]
    fn patterns() {
        let p = NsPattern::new("flags.*").expect("pattern");
        assert!(p.matches(&ns("flags.eu")) && !p.matches(&ns("flag")));
        assert!(NsPattern::all().matches(&ns("anything")));
        assert!(NsPattern::new("models")
            .expect("exact")
            .matches(&ns("models")));
        assert!(!NsPattern::new("models")
            .expect("exact")
            .matches(&ns("models2")));
        for bad in ["", "Flags", "a*b", "**", "a b*"] {
            assert!(NsPattern::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_take_the_most_generous_match() {
        let g = Grants::new(vec![
            "models=ro".parse().expect("grant"),
            "health.*=rw".parse().expect("grant"),
            "*=ro".parse().expect("grant"),
        ]);
        assert!(g.can_read(&ns("models")) && !g.can_write(&ns("models")));
        assert!(g.can_write(&ns("health.eu")));
        assert!(g.can_read(&ns("other")) && !g.can_write(&ns("other")));
        let none = Grants::new(vec!["models=rw".parse().expect("grant")]);
        assert!(!none.can_read(&ns("secrets")));
        assert!("models=rx".parse::<Grant>().is_err());
        assert_eq!(
            "a.*=rw".parse::<Grant>().expect("grant").to_string(),
            "a.*=rw"
        );
    }
}
