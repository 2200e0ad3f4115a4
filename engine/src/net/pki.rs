//! The deployment PKI: a CA, node certificates that carry identity and grants, bundles.
//!
//! A node certificate names the node three ways: its subject common name is the node id;
//! its subject alternative names hold the DNS name [`SERVER_NAME`] (every node answers to
//! it, since peers dial addresses, not names) and URIs `tidesync:node:ID`,
//! `tidesync:role:edge|hub` and one `tidesync:grant:PATTERN=rw|ro` per grant. They are
//! plain X.509 fields, readable with `openssl x509 -text`, and signed by the CA, so a node
//! cannot widen its own grants.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::model::{Grant, Grants, Identity, NodeId, Role};

/// The DNS name in every node certificate; dialers verify it.
pub const SERVER_NAME: &str = "tidesync.node";

/// Largest bundle file read, in bytes: a bundle is a few KB, and the revocation list it
/// may carry at most `MAX_REVOCATION_LIST` (1 MiB) of DER, 1.4 MiB as PEM.
pub const MAX_BUNDLE_FILE: u64 = 4 << 20;

/// How long a node certificate is valid unless `enroll --days` says otherwise.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// A certificate is valid from this long before it was issued, so a peer whose clock is
/// a little behind does not refuse a fresh one.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(3600);

const URI_NODE: &str = "tidesync:node:";
const URI_ROLE: &str = "tidesync:role:";
const URI_GRANT: &str = "tidesync:grant:";

/// Certificate problems.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen could not make or sign a certificate.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate or key file could not be read.
    #[error("{0}")]
    Read(String),
    /// A PEM file is malformed or lacks a part.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// A certificate does not carry a valid Tidesync identity.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Reads the identity a DER certificate states (not verifying it: the TLS layer does).
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .ok_or_else(|| TlsError::Identity("no subject alternative names".into()))?;
    let (mut node, mut role, mut grants) = (None, None, Vec::new());
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        if let Some(id) = uri.strip_prefix(URI_NODE) {
            node = Some(NodeId::new(id).map_err(|e| TlsError::Identity(e.to_string()))?);
        } else if let Some(r) = uri.strip_prefix(URI_ROLE) {
            role = Some(match r {
                "edge" => Role::Edge,
                "hub" => Role::Hub,
                other => return Err(TlsError::Identity(format!("unknown role {other:?}"))),
            });
        } else if let Some(g) = uri.strip_prefix(URI_GRANT) {
            grants.push(
                g.parse::<Grant>()
                    .map_err(|e| TlsError::Identity(e.to_string()))?,
            );
        }
    }
    let node_id = node.ok_or_else(|| TlsError::Identity("no node id".into()))?;
    let role = role.ok_or_else(|| TlsError::Identity("no role".into()))?;
    let grants = match role {
        Role::Hub => Grants::everything(),
        Role::Edge => Grants::new(grants),
    };
    Ok(Identity {
        node_id,
        role,
        grants,
    })
}

/// A DER certificate's serial number: the bytes a revocation list names it by.
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    Ok(cert.raw_serial().to_vec())
}

/// A new certificate serial: 16 random bytes, positive and with no leading zero byte, so
/// its DER form is these very bytes (RFC 5280 asks for at most 20 octets, unpredictable).
fn new_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| TlsError::Identity(format!("no randomness for a serial: {e}")))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// When a DER certificate stops being valid.
pub fn not_after(der: &[u8]) -> Result<std::time::SystemTime, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    let since_epoch = std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok(std::time::UNIX_EPOCH + since_epoch)
}

/// `t` as a certificate date; X.509 dates end with the year 9999 (and `time` would panic
/// converting a later one).
fn x509_time(t: std::time::SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .filter(|d| d.year() <= 9999)
        .ok_or_else(|| TlsError::Identity("a validity date past the year 9999".into()))
}

/// A deployment's certificate authority.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new CA named `name`.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} Tidesync CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))
    }

    /// Signs a revocation list (an X.509 CRL, DER) numbered `number`, listing `revoked`.
    /// Numbers must grow from one list to the next: nodes keep the highest they have seen.
    pub fn revocation_list(
        &self,
        number: u64,
        revoked: &[super::crl::Revoked],
    ) -> Result<Vec<u8>, TlsError> {
        let now = std::time::SystemTime::now();
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: x509_time(r.at)?,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, TlsError>>()?;
        let params = CertificateRevocationListParams {
            this_update: x509_time(now)?,
            // X.509 requires a next update; nodes do not expire a list (a newer number
            // replaces it), so it is set far out.
            next_update: x509_time(now + std::time::Duration::from_secs(100 * 365 * 86_400))?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }

    /// The CA private key, PEM. Keep it off the nodes.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a node certificate and key, valid for [`DEFAULT_VALIDITY_DAYS`]. Grants
    /// matter only for edges.
    pub fn issue(&self, node: &NodeId, role: Role, grants: &[Grant]) -> Result<Bundle, TlsError> {
        self.issue_for_days(node, role, grants, DEFAULT_VALIDITY_DAYS)
    }

    /// Issues a node certificate valid for `days` from now.
    pub fn issue_for_days(
        &self,
        node: &NodeId,
        role: Role,
        grants: &[Grant],
        days: u32,
    ) -> Result<Bundle, TlsError> {
        let now = std::time::SystemTime::now();
        let not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
        self.issue_valid(node, role, grants, now - CLOCK_SKEW, not_after)
    }

    /// Issues a node certificate valid from `not_before` to `not_after` (both inclusive,
    /// as X.509 has it).
    pub fn issue_valid(
        &self,
        node: &NodeId,
        role: Role,
        grants: &[Grant],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<Bundle, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node.as_str());
        params.distinguished_name = dn;
        let uri = |s: String| -> Result<SanType, TlsError> {
            Ok(SanType::URI(s.try_into().map_err(|e: rcgen::Error| {
                TlsError::Identity(e.to_string())
            })?))
        };
        params
            .subject_alt_names
            .push(uri(format!("{URI_NODE}{node}"))?);
        params
            .subject_alt_names
            .push(uri(format!("{URI_ROLE}{}", role.as_str()))?);
        if role == Role::Edge {
            for g in grants {
                params
                    .subject_alt_names
                    .push(uri(format!("{URI_GRANT}{g}"))?);
            }
        }
        params.serial_number = Some(new_serial()?);
        params.not_before = x509_time(not_before)?;
        params.not_after = x509_time(not_after)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Bundle::from_issued(&self.cert_pem, cert.der().clone(), &key)
    }
}

/// What a node needs to join a deployment: the CA certificate, its own certificate and key,
/// and the deployment's revocation list as it was when the bundle was written, if any.
/// Stored as one PEM file in that order.
pub struct Bundle {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    crl: Option<CertificateRevocationListDer<'static>>,
}

impl Clone for Bundle {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            crl: self.crl.clone(),
        }
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

impl Bundle {
    /// The bundle file's text.
    pub fn to_pem(&self) -> String {
        let mut blocks = vec![
            pem::Pem::new("CERTIFICATE", self.ca.to_vec()),
            pem::Pem::new("CERTIFICATE", self.cert.to_vec()),
            pem::Pem::new("PRIVATE KEY", self.key.secret_der().to_vec()),
        ];
        if let Some(crl) = &self.crl {
            blocks.push(pem::Pem::new("X509 CRL", crl.to_vec()));
        }
        pem::encode_many(&blocks)
    }

    /// Reads a bundle file's text: the CA certificate, the node certificate, the node key,
    /// and at most one revocation list (checked when a node takes it up).
    pub fn from_pem(text: &str) -> Result<Self, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let [ca, cert] = <[CertificateDer<'static>; 2]>::try_from(certs).map_err(|certs| {
            TlsError::Pem(format!(
                "expected 2 certificates (CA, node), found {}",
                certs.len()
            ))
        })?;
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| TlsError::Pem(format!("node key: {e}")))?;
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Pem(format!("revocation list: {e}")))?;
        if crls.len() > 1 {
            return Err(TlsError::Pem(format!(
                "{} revocation lists; a bundle carries at most one",
                crls.len()
            )));
        }
        let bundle = Self {
            ca,
            cert,
            key,
            crl: crls.into_iter().next(),
        };
        bundle.identity()?;
        Ok(bundle)
    }

    fn from_issued(
        ca_pem: &str,
        cert: CertificateDer<'static>,
        key: &KeyPair,
    ) -> Result<Self, TlsError> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::Pem(e.to_owned()))?;
        Ok(Self {
            ca,
            cert,
            key,
            crl: None,
        })
    }

    /// The same bundle carrying `crl` (DER), so that a node started from it refuses what
    /// was revoked before it ever met a peer.
    pub fn with_revocations(mut self, crl: &[u8]) -> Self {
        self.crl = Some(CertificateRevocationListDer::from(crl.to_vec()));
        self
    }

    /// The revocation list the bundle carries, unchecked (DER).
    pub fn revocations_der(&self) -> Option<&[u8]> {
        self.crl.as_deref()
    }

    /// The node certificate's serial number.
    pub fn serial(&self) -> Result<Vec<u8>, TlsError> {
        serial_of(&self.cert)
    }

    /// Reads a bundle file (at most [`MAX_BUNDLE_FILE`] bytes: it is re-read while a node
    /// runs).
    pub fn read(path: &std::path::Path) -> Result<Self, TlsError> {
        use std::io::Read;
        let cannot =
            |e: std::io::Error| TlsError::Read(format!("cannot read {}: {e}", path.display()));
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_BUNDLE_FILE + 1).read_to_string(&mut text))
            .map_err(cannot)?;
        if text.len() as u64 > MAX_BUNDLE_FILE {
            return Err(TlsError::Read(format!(
                "{} is over {MAX_BUNDLE_FILE} bytes; not a bundle",
                path.display()
            )));
        }
        Self::from_pem(&text)
            .map_err(|e| TlsError::Pem(format!("{} is not a valid bundle ({e})", path.display())))
    }

    /// The identity in the node certificate.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        identity_from_cert(&self.cert)
    }

    /// Whether both bundles trust the same CA certificate.
    pub fn same_ca(&self, other: &Bundle) -> bool {
        self.ca == other.ca
    }

    /// When the node certificate stops being valid.
    pub fn not_after(&self) -> Result<std::time::SystemTime, TlsError> {
        not_after(&self.cert)
    }

    pub(crate) fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_identity_and_grants() {
        let ca = Ca::generate("test").expect("ca");
        let grants: Vec<Grant> = vec![
            "models=ro".parse().expect("g"),
            "health.*=rw".parse().expect("g"),
        ];
        let bundle = ca
            .issue(&NodeId::new("edge-1").expect("id"), Role::Edge, &grants)
            .expect("issue");
        let again = Bundle::from_pem(&bundle.to_pem()).expect("parse");
        let id = again.identity().expect("identity");
        assert_eq!(id.node_id.as_str(), "edge-1");
        assert_eq!(id.role, Role::Edge);
        assert_eq!(id.grants, Grants::new(grants));
        let hub = ca
            .issue(&NodeId::new("hub-1").expect("id"), Role::Hub, &[])
            .expect("issue");
        assert_eq!(
            hub.identity().expect("identity").grants,
            Grants::everything()
        );

        let reloaded = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let b = reloaded
            .issue(&NodeId::new("edge-2").expect("id"), Role::Edge, &[])
            .expect("issue");
        assert_eq!(b.ca_der(), bundle.ca_der());
    }

    #[test]
    fn validity_past_the_year_9999_is_an_error_not_a_panic() {
        let ca = Ca::generate("t").expect("ca");
        let id = NodeId::new("n").expect("id");
        assert!(ca.issue_for_days(&id, Role::Edge, &[], u32::MAX).is_err());
        let b = ca
            .issue_for_days(&id, Role::Edge, &[], 36_500)
            .expect("a century");
        assert!(b.not_after().is_ok());
    }

    #[test]
    fn broken_bundles_are_refused() {
        assert!(matches!(Bundle::from_pem(""), Err(TlsError::Pem(_))));
        let ca = Ca::generate("t").expect("ca");
        let b = ca
            .issue(&NodeId::new("n").expect("id"), Role::Hub, &[])
            .expect("issue");
        let no_key: String = b
            .to_pem()
            .split("-----BEGIN PRIVATE KEY")
            .next()
            .unwrap_or("")
            .to_owned();
        assert!(Bundle::from_pem(&no_key).is_err());
    }
}
