//! What an export sends where: `--export URL` or a `[[export]]` table.

use tidesync::model::{Namespace, NsPattern};

/// How a change travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The document as JSON, with its namespace, id, heads and feed position.
    Json,
    /// The Automerge changes since the last message of the document (what a consumer
    /// merges into its own copy), with the same fields in headers.
    Automerge,
}

impl Format {
    /// `json` or `automerge`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "json" => Ok(Self::Json),
            "automerge" => Ok(Self::Automerge),
            other => Err(ConfigError(format!(
                "format {other:?} is not json or automerge"
            ))),
        }
    }

    /// The name [`Format::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Automerge => "automerge",
        }
    }
}

/// The subject changes go to unless the export says: one subject per document.
pub const DEFAULT_SUBJECT: &str = "tidesync.{ns}.{id}";

/// One export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// The broker: `nats://host:port` (JetStream).
    pub url: String,
    /// Namespaces exported; all when empty.
    pub namespaces: Vec<NsPattern>,
    /// Subject template: `{ns}` and `{id}` are replaced.
    pub subject: String,
    /// How changes travel.
    pub format: Format,
}

/// An export that cannot work, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("export: {0}")]
pub struct ConfigError(pub String);

impl ExportConfig {
    /// Checks an export's settings: the URL's scheme, the subject template.
    pub fn new(
        url: &str,
        namespaces: &[String],
        subject: Option<&str>,
        format: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let err = |s: String| ConfigError(s);
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            return Err(err(format!(
                "{url}: RabbitMQ exports are not built yet; use a nats:// JetStream URL"
            )));
        }
        if !url.starts_with("nats://") {
            return Err(err(format!("{url} is not a nats:// URL")));
        }
        let namespaces = namespaces
            .iter()
            .map(|p| NsPattern::new(p.as_str()).map_err(|e| err(format!("{p:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let subject = subject.unwrap_or(DEFAULT_SUBJECT).to_owned();
        let bare = subject.replace("{ns}", "").replace("{id}", "");
        let tokens_ok = !subject.is_empty()
            && subject.len() <= 256
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !subject.starts_with('.')
            && !subject.ends_with('.')
            && !subject.contains("..");
        if !tokens_ok {
            return Err(err(format!(
                "subject {subject:?}: letters, digits, . _ - and {{ns}} {{id}} only, no empty token"
            )));
        }
        let format = format.map_or(Ok(Format::Json), Format::parse)?;
        Ok(Self {
            url: url.to_owned(),
            namespaces,
            subject,
            format,
        })
    }

    /// Whether documents of `ns` are exported.
    pub fn exports(&self, ns: &Namespace) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|p| p.matches(ns))
    }

    /// The subject of a change to `ns`/`id`.
    pub fn subject_of(&self, ns: &str, id: &str) -> String {
        self.subject.replace("{ns}", ns).replace("{id}", id)
    }

    /// What names this export's position in the store: the same settings resume from
    /// the same position after a restart; changed ones start a new export.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [
            self.url.as_str(),
            self.subject.as_str(),
            self.format.as_str(),
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        for p in &self.namespaces {
            h.update(p.to_string().as_bytes());
            h.update(&[0]);
        }
        format!("export/{}", &h.finalize().to_hex()[..16])
    }

    /// The URL without credentials, for status and logs.
    pub fn shown_url(&self) -> String {
        match (self.url.split_once("://"), self.url.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://…@{}", &self.url[at + 1..]),
            _ => self.url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_checked_and_named_by_their_settings() {
        let e = ExportConfig::new("nats://127.0.0.1:4222", &["orders.*".into()], None, None)
            .expect("valid");
        assert_eq!(e.subject_of("orders.eu", "o-1"), "tidesync.orders.eu.o-1");
        assert!(e.exports(&Namespace::new("orders.eu").expect("ns")));
        assert!(!e.exports(&Namespace::new("models").expect("ns")));
        let other = ExportConfig::new("nats://127.0.0.1:4222", &[], None, Some("automerge"))
            .expect("valid");
        assert_ne!(e.key(), other.key());
        assert!(ExportConfig::new("amqp://h", &[], None, None).is_err());
        assert!(ExportConfig::new("nats://h", &[], Some("a.>"), None).is_err());
        assert!(ExportConfig::new("nats://h", &[], Some("a..{id}"), None).is_err());
        assert!(ExportConfig::new("nats://h", &[], None, Some("xml")).is_err());
        let secret = ExportConfig::new("nats://u:p@h:1", &[], None, None).expect("valid");
        assert_eq!(secret.shown_url(), "nats://…@h:1");
    }
}
