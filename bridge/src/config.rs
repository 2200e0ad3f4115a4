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
        broker_url(url, "exports")?;
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
        shown_url(&self.url)
    }
}

/// `url` without credentials.
fn shown_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Checks a broker URL: JetStream only for now.
fn broker_url(url: &str, what: &str) -> Result<(), ConfigError> {
    if url.starts_with("amqp://") || url.starts_with("amqps://") {
        return Err(ConfigError(format!(
            "{url}: RabbitMQ {what} are not built yet; use a nats:// JetStream URL"
        )));
    }
    if !url.starts_with("nats://") {
        return Err(ConfigError(format!("{url} is not a nats:// URL")));
    }
    Ok(())
}

/// Whether `s` is a NATS subject a bridge may use: dot-separated tokens of letters,
/// digits, `_` and `-`, `*` or a final `>` where `wildcards` allows them.
fn valid_subject(s: &str, wildcards: bool) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    !s.is_empty()
        && s.len() <= 256
        && tokens.iter().enumerate().all(|(i, t)| {
            (wildcards && (*t == "*" || (*t == ">" && i == tokens.len() - 1)))
                || (!t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')))
        })
}

/// The subject imports read unless told: `tidesync.import.` and anything after.
pub const DEFAULT_IMPORT_SUBJECT: &str = "tidesync.import.>";

/// Where refused messages go unless told.
pub const DEFAULT_DEAD_LETTER: &str = "tidesync.dead";

/// One import: merge patches from the bus into documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportConfig {
    /// The broker: `nats://host:port` (JetStream).
    pub url: String,
    /// The subject (wildcards allowed) a stream covers, whose messages are patches.
    pub subject: String,
    /// The only namespace its messages may write; any when `None`.
    pub namespace: Option<Namespace>,
    /// Where messages that are not valid patches go, with the reason.
    pub dead_letter: String,
}

impl ImportConfig {
    /// Checks an import's settings.
    pub fn new(
        url: &str,
        subject: Option<&str>,
        namespace: Option<&str>,
        dead_letter: Option<&str>,
    ) -> Result<Self, ConfigError> {
        broker_url(url, "imports")?;
        let subject = subject.unwrap_or(DEFAULT_IMPORT_SUBJECT).to_owned();
        if !valid_subject(&subject, true) {
            return Err(ConfigError(format!(
                "import subject {subject:?} is not a NATS subject"
            )));
        }
        let dead_letter = dead_letter.unwrap_or(DEFAULT_DEAD_LETTER).to_owned();
        if !valid_subject(&dead_letter, false) {
            return Err(ConfigError(format!(
                "dead-letter subject {dead_letter:?} is not a NATS subject without wildcards"
            )));
        }
        let namespace = namespace
            .map(|n| Namespace::new(n).map_err(|e| ConfigError(format!("{n:?}: {e}"))))
            .transpose()?;
        Ok(Self {
            url: url.to_owned(),
            subject,
            namespace,
            dead_letter,
        })
    }

    /// What names this import's durable consumer.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [self.url.as_str(), self.subject.as_str()] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        if let Some(ns) = &self.namespace {
            h.update(ns.as_str().as_bytes());
        }
        format!("import/{}", &h.finalize().to_hex()[..16])
    }

    /// The URL without credentials, for status and logs.
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
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

    #[test]
    fn imports_are_checked() {
        let i = ImportConfig::new("nats://h:1", None, Some("orders"), None).expect("valid");
        assert_eq!(i.subject, DEFAULT_IMPORT_SUBJECT);
        assert!(ImportConfig::new("nats://h:1", Some("a.*.b"), None, None).is_ok());
        for bad in ["a.>.b", "a..b", "", "a b"] {
            assert!(
                ImportConfig::new("nats://h:1", Some(bad), None, None).is_err(),
                "{bad}"
            );
        }
        assert!(ImportConfig::new("nats://h:1", None, None, Some("dead.>")).is_err());
        assert!(ImportConfig::new("nats://h:1", None, Some("Bad!"), None).is_err());
        assert!(ImportConfig::new("amqp://h", None, None, None).is_err());
    }
}
