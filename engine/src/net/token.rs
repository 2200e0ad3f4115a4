//! Scoped API tokens: what a certificate is to a node, a token is to an app.
//!
//! A token is a JSON Web Token (compact JWS, ES256) signed with the deployment CA's key, so
//! every node of the deployment, hub or edge, verifies it offline with the CA certificate
//! it already holds. Its claims carry grants like a certificate (`repo=rw`, `models.*=ro`),
//! an expiry, and an id (`jti`, 16 random bytes in hex) that doubles as a serial number:
//! revoking a token puts that serial on the deployment's revocation list (the same X.509
//! CRL that revokes nodes), which reaches every node within a second.
//!
//! The format is standard so that tools can read a token's claims; only the CA can mint
//! one. The CA's key type is fixed by `tidesync-hub init` (ECDSA P-256), which is what
//! ES256 names.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;

use crate::model::{Grant, Grants};

/// Longest token accepted, in bytes: a token with a few dozen grants is well under 4 KiB;
/// anything longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Most grants one token carries.
pub const MAX_GRANTS: usize = 64;

/// Longest validity `token create` issues, in days.
pub const MAX_DAYS: u32 = 3650;

const HEADER: &str = r#"{"alg":"ES256","typ":"JWT"}"#;

/// A verified token: who it is for and what it allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Its id and revocation serial (16 bytes).
    pub serial: Vec<u8>,
    /// Who or what it was issued to (free text, for the operator).
    pub subject: String,
    /// What it may read and write.
    pub grants: Grants,
    /// When it stops being accepted.
    pub expires: SystemTime,
}

impl Token {
    /// The id `token revoke` takes: the serial in hex.
    pub fn id(&self) -> String {
        hex(&self.serial)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    jti: String,
    sub: String,
    iat: u64,
    exp: u64,
    grants: Vec<String>,
}

/// Why a token is not accepted. The messages never quote the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a token of this format, or damaged.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The signature is not the deployment CA's.
    #[error("the token is not signed by this deployment's CA")]
    BadSignature,
    /// Past its expiry.
    #[error("the token expired")]
    Expired,
    /// On the deployment's revocation list.
    #[error("the token was revoked")]
    Revoked,
    /// Could not be issued.
    #[error("cannot issue a token: {0}")]
    Issue(String),
}

/// Issues a token signed with the CA key (`ca_key_pem`, PKCS#8 PEM as `init` writes it).
pub fn issue(
    ca_key_pem: &str,
    subject: &str,
    grants: &[Grant],
    valid_for: Duration,
) -> Result<(String, Token), TokenError> {
    if grants.is_empty() || grants.len() > MAX_GRANTS {
        return Err(TokenError::Issue(format!(
            "a token carries 1 to {MAX_GRANTS} grants"
        )));
    }
    let key_der = pem::parse(ca_key_pem)
        .map_err(|e| TokenError::Issue(format!("the CA key: {e}")))?
        .into_contents();
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &key_der, &rng)
        .map_err(|_| TokenError::Issue("the CA key is not an ECDSA P-256 key".into()))?;
    let mut serial = vec![0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| TokenError::Issue(e.to_string()))?;
    // Positive, as X.509 wants of the list it may join, and with no leading zero byte,
    // which the list's DER encoding would drop (and the serial would then not match).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let now = SystemTime::now();
    let expires = now + valid_for;
    let claims = Claims {
        jti: hex(&serial),
        sub: subject.to_owned(),
        iat: unix(now),
        exp: unix(expires),
        grants: grants.iter().map(ToString::to_string).collect(),
    };
    let body = serde_json::to_vec(&claims).map_err(|e| TokenError::Issue(e.to_string()))?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(body)
    );
    let sig = key
        .sign(&rng, signing_input.as_bytes())
        .map_err(|_| TokenError::Issue("signing failed".into()))?;
    let text = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let token = Token {
        serial,
        subject: subject.to_owned(),
        grants: Grants::new(grants.to_vec()),
        expires: UNIX_EPOCH
            .checked_add(Duration::from_secs(unix(expires)))
            .ok_or_else(|| TokenError::Issue("an expiry past the clock's range".into()))?,
    };
    Ok((text, token))
}

/// Reads a token's claims and checks its signature against the CA certificate (`ca_der`)
/// and its expiry against `now`. Revocation is the caller's check (`Token::serial`).
pub fn verify(text: &str, ca_der: &[u8], now: SystemTime) -> Result<Token, TokenError> {
    if text.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = text.split('.');
    let (Some(header), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    let decode = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| TokenError::Malformed("not base64url"))
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(header)?)
        .map_err(|_| TokenError::Malformed("the header is not JSON"))?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("ES256") {
        return Err(TokenError::Malformed("not an ES256 token"));
    }
    let public = ca_public_key(ca_der).ok_or(TokenError::BadSignature)?;
    let signed = &text[..text.len() - sig.len() - 1];
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public)
        .verify(signed.as_bytes(), &decode(sig)?)
        .map_err(|_| TokenError::BadSignature)?;
    let claims: Claims = serde_json::from_slice(&decode(body)?)
        .map_err(|_| TokenError::Malformed("the claims are not a token's"))?;
    if unix(now) >= claims.exp {
        return Err(TokenError::Expired);
    }
    if claims.grants.len() > MAX_GRANTS {
        return Err(TokenError::Malformed("too many grants"));
    }
    let grants = claims
        .grants
        .iter()
        .map(|g| g.parse::<Grant>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TokenError::Malformed("a grant is not PATTERN=rw|ro"))?;
    let serial = unhex(&claims.jti).ok_or(TokenError::Malformed("the id is not hex"))?;
    Ok(Token {
        serial,
        subject: claims.sub,
        grants: Grants::new(grants),
        expires: UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or(TokenError::Malformed("an expiry past the clock's range"))?,
    })
}

/// The claims of a token, unverified: for `token revoke --token`, which needs its id.
pub fn read_id(text: &str) -> Result<Vec<u8>, TokenError> {
    if text.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("too long"));
    }
    let body = text
        .split('.')
        .nth(1)
        .ok_or(TokenError::Malformed("not three dot-separated parts"))?;
    let body = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed("not base64url"))?;
    let claims: Claims = serde_json::from_slice(&body)
        .map_err(|_| TokenError::Malformed("the claims are not a token's"))?;
    unhex(&claims.jti).ok_or(TokenError::Malformed("the id is not hex"))
}

/// The uncompressed EC point of the CA certificate's key.
fn ca_public_key(ca_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(ca_der).ok()?;
    Some(
        cert.tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .to_vec(),
    )
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex digits in pairs (at most 64 bytes: serials and token ids); `None`
/// otherwise.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Namespace;
    use crate::net::pki::Ca;

    fn grants(list: &[&str]) -> Vec<Grant> {
        list.iter()
            .map(|g| g.parse::<Grant>().expect("grant"))
            .collect()
    }

    #[test]
    fn a_token_carries_its_grants_and_only_its_ca_accepts_it() {
        let ca = Ca::generate("t").expect("ca");
        let other = Ca::generate("u").expect("ca");
        let (text, issued) = issue(
            ca.key_pem(),
            "app",
            &grants(&["repo=rw", "models.*=ro"]),
            Duration::from_secs(3600),
        )
        .expect("issue");
        let der = ca.cert_der().expect("der");
        let t = verify(&text, der.as_ref(), SystemTime::now()).expect("verifies");
        assert_eq!(t, issued);
        let repo = Namespace::new("repo").expect("ns");
        let models = Namespace::new("models.llm").expect("ns");
        assert!(t.grants.can_write(&repo));
        assert!(t.grants.can_read(&models) && !t.grants.can_write(&models));
        assert_eq!(read_id(&text).expect("id"), t.serial);
        let foreign = other.cert_der().expect("der");
        assert_eq!(
            verify(&text, foreign.as_ref(), SystemTime::now()),
            Err(TokenError::BadSignature)
        );
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert_eq!(verify(&text, der.as_ref(), later), Err(TokenError::Expired));
    }

    /// A revoked token is refused whatever its serial: the revocation list's DER drops a
    /// leading zero byte, so a serial that began with one would never match.
    #[test]
    fn every_token_serial_survives_the_revocation_list() {
        use crate::net::crl::{Crl, Revoked};
        let ca = Ca::generate("t").expect("ca");
        let der = ca.cert_der().expect("der");
        let mut serials = Vec::new();
        for _ in 0..64 {
            let (_, t) = issue(
                ca.key_pem(),
                "app",
                &grants(&["repo=rw"]),
                Duration::from_secs(60),
            )
            .expect("issue");
            assert!(t.serial[0] != 0 && t.serial[0] < 0x80, "{:?}", t.serial);
            serials.push(t.serial);
        }
        let revoked: Vec<Revoked> = serials
            .iter()
            .map(|s| Revoked {
                serial: s.clone(),
                at: SystemTime::now(),
            })
            .collect();
        let list = ca.revocation_list(1, &revoked).expect("list");
        let crl = Crl::verify(&list, der.as_ref()).expect("verifies");
        for s in &serials {
            assert!(crl.revokes(s), "{s:?} is not revoked");
        }
    }

    #[test]
    fn a_token_with_widened_grants_fails_its_signature() {
        let ca = Ca::generate("t").expect("ca");
        let (text, _) = issue(
            ca.key_pem(),
            "app",
            &grants(&["repo=ro"]),
            Duration::from_secs(3600),
        )
        .expect("issue");
        let parts: Vec<&str> = text.split('.').collect();
        let body = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("utf8");
        let widened = body.replace("repo=ro", "*=rw");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(widened),
            parts[2]
        );
        let der = ca.cert_der().expect("der");
        assert_eq!(
            verify(&forged, der.as_ref(), SystemTime::now()),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "a.b", "a.b.c.d", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(matches!(
                verify(junk, der.as_ref(), SystemTime::now()),
                Err(TokenError::Malformed(_))
            ));
        }
    }
}
