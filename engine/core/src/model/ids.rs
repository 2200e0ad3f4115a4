//! Validated names: the namespace and document id every API call is addressed by.

use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

/// A namespace: `[a-z0-9][a-z0-9._-]{0,63}`.
///
/// The unit of subscription, priority and access control, so it is kept short and
/// lowercase to make grant patterns unambiguous.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// Longest namespace accepted, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates `s` as a namespace.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        let bytes = s.as_bytes();
        let first_ok =
            matches!(bytes.first(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
        if first_ok && rest_ok && bytes.len() <= Self::MAX_LEN {
            Ok(Self(s))
        } else {
            Err(ModelError::InvalidNamespace(s))
        }
    }

    /// The namespace as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A document id chosen by the application: `[A-Za-z0-9._~-]{1,128}`.
///
/// The alphabet is URL-safe so ids travel in paths without escaping.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(String);

impl DocId {
    /// Longest document id accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates `s` as a document id.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(ModelError::InvalidDocId(s))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A node's name in the deployment: `[A-Za-z0-9._-]{1,64}`, as written in its certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    /// Longest node id accepted, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates `s` as a node id.
    pub fn new(s: impl Into<String>) -> Result<Self, ModelError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(ModelError::InvalidNodeId(s))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! text_newtype_impls {
    ($t:ty) => {
        impl FromStr for $t {
            type Err = ModelError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
text_newtype_impls!(Namespace);
text_newtype_impls!(DocId);
text_newtype_impls!(NodeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["models", "flags.eu-west", "a", "0_x", &"a".repeat(64)] {
            assert!(Namespace::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Models", ".x", "-x", "a b", "a/b", "ü", &"a".repeat(65)] {
            assert!(
                matches!(Namespace::new(bad), Err(ModelError::InvalidNamespace(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn doc_ids() {
        for ok in ["a", "Doc-1", "x.y_z~w", &"A".repeat(128)] {
            assert!(DocId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", "a?b", &"A".repeat(129)] {
            assert!(
                matches!(DocId::new(bad), Err(ModelError::InvalidDocId(_))),
                "{bad}"
            );
        }
    }
}
