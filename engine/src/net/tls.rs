//! TLS for QUIC: TLS 1.3 only, the ring provider, mutual authentication against the
//! deployment CA, and Tidesync's own checks inside the handshake.
//!
//! Both verifiers first run webpki's chain verification against the CA, then read the
//! Tidesync identity from the certificate and refuse revoked node ids; the dialer also
//! refuses any peer that is not a hub. A refused certificate fails the handshake itself,
//! so nothing of the connection is ever handed to the sync layer.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use super::pki::{identity_from_cert, serial_of, Bundle, TlsError};
pub use super::revocations::Revocations;
use crate::blobs::serve::MAX_STREAMS_PER_PEER;
use crate::model::{Identity, Role};

/// How long a connection lives without hearing from the peer: how fast a dead peer (a
/// crash, a cut cable) is noticed when nothing tells us.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a quiet connection sends a keep-alive. It bounds how long an idle edge takes
/// to notice a restarted hub (the keep-alive draws the hub's stateless reset), and each
/// one costs the hub a wake-up: 1.5 s keeps a hub restart under 2 s for every edge.
pub const KEEP_ALIVE: Duration = Duration::from_millis(1500);

/// Connection timers, settable per node for long or lossy links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// How often the dialing side pings a quiet connection.
    pub keep_alive: Duration,
    /// How long a connection lives without hearing from the peer (QUIC takes the smaller
    /// of both sides' values).
    pub idle_timeout: Duration,
    /// How this node's sending reacts to loss and delay.
    pub congestion: Congestion,
}

/// The congestion controller of a node's connections (each side runs its own for what it
/// sends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (QUIC's usual): backs off on every loss, so a link that drops packets at
    /// random (radio, satellite) runs far below its bandwidth.
    #[default]
    Cubic,
    /// BBR: paces at the bandwidth and round trip it measures and takes random loss for
    /// what it is, for long, lossy links.
    Bbr,
}

impl Congestion {
    /// Parses `cubic` or `bbr`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Self::Cubic),
            "bbr" => Ok(Self::Bbr),
            other => Err(format!("congestion {other:?} is not cubic or bbr")),
        }
    }
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            keep_alive: KEEP_ALIVE,
            idle_timeout: IDLE_TIMEOUT,
            congestion: Congestion::default(),
        }
    }
}

impl Timers {
    /// Refuses timers that would drop healthy idle connections (the idle timeout must
    /// outlast two keep-alives, so one lost ping is not fatal) or that QUIC cannot carry.
    pub fn check(&self) -> Result<(), String> {
        if self.keep_alive < Duration::from_millis(100) {
            return Err("the keep-alive must be at least 100 ms".into());
        }
        if self.idle_timeout < self.keep_alive * 3 {
            return Err(format!(
                "the idle timeout ({:?}) must be at least three keep-alives ({:?})",
                self.idle_timeout,
                self.keep_alive * 3
            ));
        }
        if self.idle_timeout > Duration::from_secs(600) {
            return Err("the idle timeout can be at most 10 min".into());
        }
        Ok(())
    }
}

/// The endpoint config, with a stateless-reset key derived from the node's private key.
///
/// A node restarted on the same address then answers packets of its old connections with
/// a valid stateless reset, so peers learn at once that those connections are gone instead
/// of waiting for the idle timeout. The key never leaves the node.
///
/// The connection-id generator's key comes from the node key too: quinn sends a reset
/// only for connection ids its generator recognizes as its own, and with a random key
/// (quinn's default) a restarted node recognizes none of its old ones.
pub fn endpoint_config(bundle: &Bundle) -> quinn::EndpointConfig {
    let derive = |label: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(label);
        ctx.update(bundle.key_der().secret_der());
        ctx.finish()
    };
    let seed = derive(b"tidesync quic stateless reset v1\0");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    let cid = derive(b"tidesync quic connection ids v1\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(bundle: &Bundle) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(bundle.ca_der().clone())?;
    Ok(Arc::new(roots))
}

fn check_identity(
    cert: &CertificateDer<'_>,
    revocations: &Revocations,
    required_role: Option<Role>,
) -> Result<Identity, rustls::Error> {
    let identity = identity_from_cert(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let serial = serial_of(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if revocations.refuses(&identity.node_id, &serial) {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
    }
    if required_role.is_some_and(|r| r != identity.role) {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    Ok(identity)
}

/// Unidirectional streams a peer may open: its critical and bulk class streams.
const CLASS_STREAMS: u32 = 2;

/// Bytes a peer may send on the sync stream before this node reads them: quinn's default
/// stream window, sized for 100 Mbit/s at 100 ms.
pub const STREAM_WINDOW: u32 = 1_250_000;

/// Transport settings. Only the dialing side sends keep-alives: its pings (and their
/// acknowledgements) keep both ends' idle timers fresh, so a hub with many edges spends
/// nothing on timers of its own while they are idle.
///
/// The protocol uses one bidirectional sync stream, opened by the dialer, and up to
/// [`MAX_STREAMS_PER_PEER`] blob streams opened by either side, so that is all a peer may
/// open: the acceptor allows one more than the dialer, and no unidirectional stream either
/// way (quinn allows 100 of each, and streams nobody reads would buffer data). The
/// connection's receive window is the sum of its streams' windows, so full blob streams
/// never take the sync stream's room, and a peer can never have more than that in flight
/// that this node has not read.
fn transport(
    keep_alive: Option<Duration>,
    idle_timeout: Duration,
    congestion: Congestion,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if congestion == Congestion::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    let dialer = keep_alive.is_some();
    t.max_concurrent_bidi_streams((MAX_STREAMS_PER_PEER + u32::from(!dialer)).into());
    t.max_concurrent_uni_streams(CLASS_STREAMS.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(
        (u64::from(STREAM_WINDOW) * u64::from(MAX_STREAMS_PER_PEER + 1 + CLASS_STREAMS))
            .try_into()
            .unwrap_or(quinn::VarInt::MAX),
    );
    t.keep_alive_interval(keep_alive);
    if keep_alive.is_some() {
        // Ask the peer to acknowledge at once rather than on a delayed-ACK timer: one
        // wake-up per keep-alive at the hub instead of two.
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(0u32.into());
        t.ack_frequency_config(Some(ack));
    }
    // `Timers::check` keeps it well inside quinn's VarInt; the fallback is never taken.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    Arc::new(t)
}

/// The accepting side: verifies client certificates (edges and hubs).
pub fn server_config(
    bundle: &Bundle,
    revocations: &Revocations,
    timers: Timers,
    max_protocol: u16,
) -> Result<quinn::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(bundle)?, provider())
        .build()
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        revocations: revocations.clone(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![bundle.cert_der().clone()], bundle.key_der())?;
    cfg.alpn_protocols = alpn_protocols(max_protocol);
    // No resumption: a resumed session skips client certificate verification, and with it
    // the revocation check. Every connection proves its certificate afresh.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(None, timers.idle_timeout, timers.congestion));
    Ok(server)
}

/// The dialing side: presents this node's certificate and accepts only hubs.
pub fn client_config(
    bundle: &Bundle,
    revocations: &Revocations,
    timers: Timers,
    max_protocol: u16,
) -> Result<quinn::ClientConfig, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(bundle)?, provider())
        .build()
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let verifier = Arc::new(HubVerifier {
        inner,
        revocations: revocations.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![bundle.cert_der().clone()], bundle.key_der())?;
    cfg.alpn_protocols = alpn_protocols(max_protocol);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(
        Some(timers.keep_alive),
        timers.idle_timeout,
        timers.congestion,
    ));
    Ok(client)
}

/// The ALPN protocols a node offers, the newest first (a server picks the first of its own
/// that the client offers): every version up to the one it is held back to.
fn alpn_protocols(max_protocol: u16) -> Vec<Vec<u8>> {
    crate::sync::alpn_protocols(max_protocol)
}

/// The ALPN protocol the connection's handshake chose.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The verified identity of a connection's peer.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    identity_from_cert(first)
}

/// The serial number of the certificate the peer presented.
pub fn peer_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())?;
    serial_of(certs.first()?).ok()
}

/// When the certificate the peer presented expires.
pub fn peer_cert_not_after(conn: &quinn::Connection) -> Option<std::time::SystemTime> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())?;
    super::pki::not_after(certs.first()?).ok()
}

/// Handshake signatures are checked by the wrapped webpki verifier, unchanged.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.revocations, None)?;
        Ok(verified)
    }

    delegate_signature_checks!();
}

#[derive(Debug)]
struct HubVerifier {
    inner: Arc<WebPkiServerVerifier>,
    revocations: Revocations,
}

impl ServerCertVerifier for HubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_identity(end_entity, &self.revocations, Some(Role::Hub))?;
        Ok(verified)
    }

    delegate_signature_checks!();
}
