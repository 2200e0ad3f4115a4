//! What an export sends where (`--export URL` or a `[[export]]` table), and what an import
//! reads (`--import URL` or a `[[import]]` table).

use tidesync::model::{DocId, Namespace, NsPattern};

/// Which broker a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// NATS JetStream: `nats://`.
    Nats,
    /// RabbitMQ (AMQP 0-9-1): `amqp://` or `amqps://`.
    Amqp,
}

impl Broker {
    /// The broker of `url`, by its scheme.
    pub fn of(url: &str) -> Result<Self, ConfigError> {
        if url.starts_with("nats://") {
            Ok(Self::Nats)
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Self::Amqp)
        } else {
            Err(ConfigError(format!(
                "{} is not a nats:// (JetStream) or amqp:// (RabbitMQ) URL",
                shown_url(url)
            )))
        }
    }

    /// `nats` or `amqp`, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Amqp => "amqp",
        }
    }

    /// What a message's destination is called on this broker.
    pub fn destination(self) -> &'static str {
        match self {
            Self::Nats => "subject",
            Self::Amqp => "routing key",
        }
    }
}

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

/// The topic exchange AMQP exports publish to unless told.
pub const DEFAULT_EXCHANGE: &str = "tidesync";

/// One export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// The broker: `nats://host:port` (JetStream) or `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Which broker `url` names.
    pub broker: Broker,
    /// Namespaces exported; all when empty.
    pub namespaces: Vec<NsPattern>,
    /// Subject (NATS) or routing key (AMQP) template: `{ns}` and `{id}` are replaced.
    pub subject: String,
    /// How changes travel.
    pub format: Format,
    /// AMQP: the durable topic exchange messages are published to.
    pub exchange: String,
}

/// An export that cannot work, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("export: {0}")]
pub struct ConfigError(pub String);

impl ExportConfig {
    /// Checks an export's settings: the URL's scheme, the subject (routing key) template.
    pub fn new(
        url: &str,
        namespaces: &[String],
        subject: Option<&str>,
        format: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let err = |s: String| ConfigError(s);
        let broker = Broker::of(url)?;
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
        let what = broker.destination();
        if !tokens_ok {
            return Err(err(format!(
                "{what} {subject:?}: letters, digits, . _ - and {{ns}} {{id}} only, no empty token"
            )));
        }
        // An AMQP routing key is at most 255 bytes, whatever document fills the template.
        let longest = bare.len()
            + subject.matches("{ns}").count() * Namespace::MAX_LEN
            + subject.matches("{id}").count() * DocId::MAX_LEN;
        if broker == Broker::Amqp && longest > AMQP_MAX_NAME {
            return Err(err(format!(
                "{what} {subject:?} may reach {longest} bytes with the longest namespace and id; AMQP allows {AMQP_MAX_NAME}"
            )));
        }
        let format = format.map_or(Ok(Format::Json), Format::parse)?;
        Ok(Self {
            url: url.to_owned(),
            broker,
            namespaces,
            subject,
            format,
            exchange: DEFAULT_EXCHANGE.to_owned(),
        })
    }

    /// Publishes to `exchange` (AMQP) instead of the default one.
    pub fn with_exchange(mut self, exchange: Option<&str>) -> Result<Self, ConfigError> {
        let Some(exchange) = exchange else {
            return Ok(self);
        };
        if self.broker != Broker::Amqp {
            return Err(ConfigError(format!(
                "{}: exchange is for amqp:// exports",
                self.shown_url()
            )));
        }
        if !valid_amqp_name(exchange) {
            return Err(ConfigError(format!(
                "exchange {exchange:?}: letters, digits, . _ - only, at most {AMQP_MAX_NAME} bytes, not amq.*"
            )));
        }
        self.exchange = exchange.to_owned();
        Ok(self)
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
        if self.broker == Broker::Amqp {
            h.update(self.exchange.as_bytes());
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

/// The longest AMQP short string: routing keys, queue and exchange names.
const AMQP_MAX_NAME: usize = 255;

/// Whether `s` may name an AMQP queue or exchange of the bridge: letters, digits, `.`,
/// `_` and `-`, not the broker's reserved `amq.` names.
fn valid_amqp_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= AMQP_MAX_NAME
        && !s.starts_with("amq.")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

/// The queue AMQP imports read unless told.
pub const DEFAULT_IMPORT_QUEUE: &str = "tidesync.import";

/// Where refused messages go unless told: a subject (NATS) or a queue (AMQP).
pub const DEFAULT_DEAD_LETTER: &str = "tidesync.dead";

/// One import: merge patches from the bus into documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportConfig {
    /// The broker: `nats://host:port` (JetStream) or `amqp://…` (RabbitMQ).
    pub url: String,
    /// Which broker `url` names.
    pub broker: Broker,
    /// NATS: the subject (wildcards allowed) a stream covers, whose messages are patches.
    /// AMQP: the durable queue they are read from.
    pub subject: String,
    /// The only namespace its messages may write; any when `None`.
    pub namespace: Option<Namespace>,
    /// Where messages that are not valid patches go, with the reason: a subject (NATS)
    /// or a durable queue (AMQP).
    pub dead_letter: String,
}

impl ImportConfig {
    /// Checks an import's settings. `source` is the subject (NATS) or queue (AMQP).
    pub fn new(
        url: &str,
        source: Option<&str>,
        namespace: Option<&str>,
        dead_letter: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let broker = Broker::of(url)?;
        let dead_letter = dead_letter.unwrap_or(DEFAULT_DEAD_LETTER).to_owned();
        let subject = match broker {
            Broker::Nats => {
                let subject = source.unwrap_or(DEFAULT_IMPORT_SUBJECT).to_owned();
                if !valid_subject(&subject, true) {
                    return Err(ConfigError(format!(
                        "import subject {subject:?} is not a NATS subject"
                    )));
                }
                if !valid_subject(&dead_letter, false) {
                    return Err(ConfigError(format!(
                        "dead-letter subject {dead_letter:?} is not a NATS subject without wildcards"
                    )));
                }
                subject
            }
            Broker::Amqp => {
                let queue = source.unwrap_or(DEFAULT_IMPORT_QUEUE).to_owned();
                for (what, name) in [("queue", &queue), ("dead-letter queue", &dead_letter)] {
                    if !valid_amqp_name(name) {
                        return Err(ConfigError(format!(
                            "{what} {name:?}: letters, digits, . _ - only, at most {AMQP_MAX_NAME} bytes, not amq.*"
                        )));
                    }
                }
                if queue == dead_letter {
                    return Err(ConfigError(format!(
                        "queue {queue:?} cannot be its own dead-letter queue"
                    )));
                }
                queue
            }
        };
        let namespace = namespace
            .map(|n| Namespace::new(n).map_err(|e| ConfigError(format!("{n:?}: {e}"))))
            .transpose()?;
        Ok(Self {
            url: url.to_owned(),
            broker,
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
        assert!(ExportConfig::new("http://h", &[], None, None).is_err());
        let amqp = ExportConfig::new("amqp://h", &[], Some("t.{ns}.{id}"), None)
            .expect("valid")
            .with_exchange(Some("feeds"))
            .expect("valid");
        assert_eq!(
            (amqp.broker, amqp.exchange.as_str()),
            (Broker::Amqp, "feeds")
        );
        assert_ne!(
            amqp.key(),
            amqp.clone().with_exchange(Some("x")).expect("x").key()
        );
        // A routing key longer than AMQP allows for the longest ids is refused up front.
        assert!(ExportConfig::new("amqp://h", &[], Some("{id}.{id}"), None).is_err());
        assert!(e.clone().with_exchange(Some("feeds")).is_err());
        assert!(amqp.clone().with_exchange(Some("amq.topic")).is_err());
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
        let q = ImportConfig::new("amqp://h", None, None, None).expect("valid");
        assert_eq!(
            (q.subject.as_str(), q.dead_letter.as_str()),
            (DEFAULT_IMPORT_QUEUE, DEFAULT_DEAD_LETTER)
        );
        assert!(ImportConfig::new("amqp://h", Some("a.>"), None, None).is_err());
        assert!(ImportConfig::new("amqp://h", Some("q"), None, Some("q")).is_err());
        assert!(ImportConfig::new("kafka://h", None, None, None).is_err());
    }
}
