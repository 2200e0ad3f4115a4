//! The deployment's revocation list: an X.509 certificate revocation list (CRL) signed by
//! the deployment CA, listing revoked certificates by serial number.
//!
//! `tidesync-hub revoke` issues it where the CA key is; every node keeps the newest one it
//! has seen (by CRL number) and passes it on to its peers in the sync session. A list is
//! taken up only when its signature verifies against the CA certificate in the node's own
//! bundle, so a peer can neither forge an entry nor drop one: the worst it can offer is an
//! older list, which is ignored. A list never expires; a newer number replaces it.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;

use crate::sync::validate::MAX_REVOCATION_LIST;

/// Why a revocation list is not taken up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// Over [`MAX_REVOCATION_LIST`] bytes.
    #[error("a revocation list of {0} bytes (at most {MAX_REVOCATION_LIST})")]
    TooLarge(usize),
    /// Not a DER (or PEM) X.509 CRL.
    #[error("not an X.509 CRL: {0}")]
    Malformed(String),
    /// Issued by another CA than this deployment's, or not signed by its key.
    #[error("not signed by this deployment's CA: {0}")]
    NotOurs(String),
    /// Without a CRL number there is no telling which of two lists is newer.
    #[error("the list has no CRL number (or one over 64 bits)")]
    NoNumber,
}

/// A revoked certificate: its serial number (the DER integer's bytes) and when it was
/// revoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number.
    pub serial: Vec<u8>,
    /// When the CA revoked it.
    pub at: SystemTime,
}

/// A revocation list whose signature has been checked against the deployment CA.
#[derive(Clone, Debug)]
pub struct Crl {
    der: Vec<u8>,
    number: u64,
    issued: SystemTime,
    entries: Vec<Revoked>,
    serials: HashSet<Vec<u8>>,
}

impl Crl {
    /// Checks `der` against the CA certificate `ca` (DER): its size, its form, its issuer
    /// and signature, and that it has a number.
    pub fn verify(der: &[u8], ca: &[u8]) -> Result<Self, CrlError> {
        if der.len() > MAX_REVOCATION_LIST {
            return Err(CrlError::TooLarge(der.len()));
        }
        let (rest, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| CrlError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CrlError::Malformed(format!(
                "{} bytes after the list",
                rest.len()
            )));
        }
        let (_, ca) = x509_parser::certificate::X509Certificate::from_der(ca)
            .map_err(|e| CrlError::NotOurs(format!("the CA certificate: {e}")))?;
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(CrlError::NotOurs(format!(
                "issued by {}, the CA is {}",
                crl.issuer(),
                ca.subject()
            )));
        }
        crl.verify_signature(ca.public_key())
            .map_err(|e| CrlError::NotOurs(format!("bad signature ({e})")))?;
        let number = crl
            .crl_number()
            .map(|n| n.to_u64_digits())
            .and_then(|digits| match digits[..] {
                [] => Some(0),
                [n] => Some(n),
                _ => None,
            })
            .ok_or(CrlError::NoNumber)?;
        let entries: Vec<Revoked> = crl
            .iter_revoked_certificates()
            .map(|r| Revoked {
                serial: r.raw_serial().to_vec(),
                at: system_time(r.revocation_date.timestamp()),
            })
            .collect();
        Ok(Self {
            der: der.to_vec(),
            number,
            issued: system_time(crl.last_update().timestamp()),
            serials: entries.iter().map(|r| r.serial.clone()).collect(),
            entries,
        })
    }

    /// Reads a PEM file's text (an `X509 CRL` block) and checks it as [`Crl::verify`] does.
    pub fn from_pem(text: &str, ca: &[u8]) -> Result<Self, CrlError> {
        let der = CertificateRevocationListDer::from_pem_slice(text.as_bytes())
            .map_err(|e| CrlError::Malformed(e.to_string()))?;
        Self::verify(&der, ca)
    }

    /// The list as a PEM file's text.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("X509 CRL", self.der.clone()))
    }

    /// The list, DER, as signed.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The CRL number: a newer list has a larger one.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// When the CA issued this list.
    pub fn issued(&self) -> SystemTime {
        self.issued
    }

    /// The revoked certificates.
    pub fn entries(&self) -> &[Revoked] {
        &self.entries
    }

    /// Whether the certificate with this serial number is revoked.
    pub fn revokes(&self, serial: &[u8]) -> bool {
        self.serials.contains(serial)
    }
}

fn system_time(unix_secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeId, Role};
    use crate::net::pki::{serial_of, Ca};

    #[test]
    fn lists_are_checked_against_the_deployment_ca() {
        let ca = Ca::generate("t").expect("ca");
        let edge = ca
            .issue(&NodeId::new("edge-1").expect("id"), Role::Edge, &[])
            .expect("issue");
        let serial = serial_of(edge.cert_der()).expect("serial");
        let revoked = [Revoked {
            serial: serial.clone(),
            at: SystemTime::now(),
        }];
        let der = ca.revocation_list(7, &revoked).expect("crl");
        let crl = Crl::verify(&der, ca.cert_der().expect("ca der").as_ref()).expect("valid");
        assert_eq!(crl.number(), 7);
        assert!(crl.revokes(&serial));
        let again = Crl::from_pem(&crl.to_pem(), ca.cert_der().expect("der").as_ref())
            .expect("pem round trip");
        assert_eq!(again.der(), crl.der());

        // Another deployment's CA, even with the same name, signs nothing for this one.
        let other = Ca::generate("t").expect("other ca");
        let forged = other.revocation_list(8, &revoked).expect("crl");
        assert!(matches!(
            Crl::verify(&forged, ca.cert_der().expect("der").as_ref()),
            Err(CrlError::NotOurs(_))
        ));
        // One flipped bit anywhere breaks it.
        for i in [10, der.len() / 2, der.len() - 3] {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            assert!(Crl::verify(&bad, ca.cert_der().expect("der").as_ref()).is_err());
        }
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(Crl::verify(&trailing, ca.cert_der().expect("der").as_ref()).is_err());
        let huge = vec![0x30; MAX_REVOCATION_LIST + 1];
        assert!(matches!(
            Crl::verify(&huge, ca.cert_der().expect("der").as_ref()),
            Err(CrlError::TooLarge(_))
        ));
    }
}
