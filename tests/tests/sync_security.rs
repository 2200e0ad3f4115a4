//! Mutual TLS and grants: who may connect, read and write.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use serde_json::json;
use tidesync::model::{DocId, Namespace, NodeId};
use tidesync::net::pki::SERVER_NAME;
use tidesync::sync::warm_sync_state;
use tidesync::sync::{ErrorCode, Message, Role};
use tidesync_tests::cluster::{wait_until, Deployment};
use tidesync_tests::rogue::{hello, Rogue};

fn ns(s: &str) -> Namespace {
    Namespace::new(s).unwrap()
}

fn id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

/// Accepts any server certificate: lets a test client reach the hub's check of *its* side.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_certificate_is_refused() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![tidesync::sync::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let outcome = async {
        let conn = endpoint.connect(hub.addr(), SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"hello?").await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        anyhow::Ok(())
    }
    .await;
    assert!(
        outcome.is_err(),
        "the hub talked to a client without a certificate"
    );
    wait_until(Duration::from_secs(2), "a refused handshake", || {
        Ok(hub.node.handshake_failures() >= 1)
    })
    .await
    .unwrap();
    assert!(hub.node.peers().is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let d = Deployment::new().unwrap();
    let other = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let stranger = other.bundle("edge-x", Role::Edge, &["*=rw"]).unwrap();
    assert!(Rogue::connect(&stranger, hub.addr()).await.is_err());
    wait_until(Duration::from_secs(2), "a refused handshake", || {
        Ok(hub.node.handshake_failures() >= 1)
    })
    .await
    .unwrap();
    assert!(hub.node.peers().is_empty());
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_cannot_pose_as_a_hub() {
    let d = Deployment::new().unwrap();
    // An edge certificate on a listening node, where a dialing edge expects a hub.
    let mut cfg = d.config("fake-hub", Role::Edge, &["*=rw"]).unwrap();
    cfg.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let fake = d.start("fake-hub", cfg).unwrap();
    let edge = d.bundle("edge-1", Role::Edge, &["*=rw"]).unwrap();
    assert!(Rogue::connect(&edge, fake.addr()).await.is_err());
    let real_edge = d.edge("edge-2", &["*=rw"], &[fake.addr()]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(real_edge.node.peers().is_empty());
    assert!(fake.node.peers().is_empty());
    real_edge.stop().await;
    fake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_nodes_are_refused_and_cut_off_at_once() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let revocations = hub.cfg.revocations.clone();
    let edge = d.edge("edge-1", &["*=rw"], &[hub.addr()]).unwrap();
    let edge_id = NodeId::new("edge-1").unwrap();
    wait_until(Duration::from_secs(5), "edge connected", || {
        Ok(hub
            .node
            .peers()
            .iter()
            .any(|p| p.node_id == edge_id && p.connected))
    })
    .await
    .unwrap();

    let revoked_at = Instant::now();
    revocations.revoke(edge_id.clone());
    let took = wait_until(
        Duration::from_secs(1),
        "the live connection dropped",
        || {
            Ok(!hub
                .node
                .peers()
                .iter()
                .any(|p| p.node_id == edge_id && p.connected))
        },
    )
    .await
    .unwrap();
    println!(
        "revoked connection dropped in {:?}",
        revoked_at.elapsed().max(took)
    );
    let failures = hub.node.handshake_failures();

    // The edge keeps redialing, and every handshake is refused; its writes stay local.
    let w = edge
        .store
        .put(
            &ns("notes"),
            &id("n1"),
            json!({"after": "revocation"}),
            None,
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "refused redials", || {
        Ok(hub.node.handshake_failures() > failures)
    })
    .await
    .unwrap();
    assert!(!hub
        .node
        .peers()
        .iter()
        .any(|p| p.node_id == edge_id && p.connected));
    assert!(hub.store.get(&ns("notes"), &id("n1")).unwrap().is_none());
    assert!(!w.heads.is_empty());
    let again = d.bundle("edge-1", Role::Edge, &["*=rw"]).unwrap();
    assert!(
        Rogue::connect(&again, hub.addr()).await.is_err() || {
            // The client side may finish its half of the handshake before the refusal arrives.
            let r = Rogue::connect(&again, hub.addr()).await;
            match r {
                Ok(r) => r.closed_within(Duration::from_secs(2)).await,
                Err(_) => true,
            }
        }
    );
    edge.stop().await;
    hub.stop().await;
}

/// Handshake and hello as `name`, then drain the hub's hello.
async fn rogue_session(d: &Deployment, hub: SocketAddr, name: &str, grants: &[&str]) -> Rogue {
    let bundle = d.bundle(name, Role::Edge, grants).unwrap();
    let mut r = Rogue::connect(&bundle, hub).await.unwrap();
    r.send(&hello(name, Role::Edge)).await.unwrap();
    r.recv_until(Duration::from_secs(5), |m| matches!(m, Message::Hello(_)))
        .await
        .unwrap()
        .unwrap();
    r
}

/// A sync message that carries one fresh change to `field`.
fn sync_with_change(field: &str) -> Vec<u8> {
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, field, "from the edge").unwrap();
    tx.commit();
    let mut state = warm_sync_state(automerge::sync::State::new());
    doc.generate_sync_message(&mut state).unwrap().encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_ungranted_namespaces_refuse_writes() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let before = hub
        .store
        .put(&ns("models"), &id("resnet"), json!({"version": 1}), None)
        .await
        .unwrap();
    let mut r = rogue_session(&d, hub.addr(), "edge-ro", &["models=ro"]).await;
    for (n, doc) in [
        ("models", "resnet"),
        ("models", "new-doc"),
        ("secrets", "key"),
    ] {
        r.send(&Message::Sync {
            ns: n.into(),
            id: doc.into(),
            data: sync_with_change("hacked"),
        })
        .await
        .unwrap();
        let err = r
            .recv_until(Duration::from_secs(5), |m| {
                matches!(m, Message::Error { .. })
            })
            .await
            .unwrap();
        assert!(
            matches!(
                err,
                Some(Message::Error {
                    code: ErrorCode::Forbidden,
                    ..
                })
            ),
            "{n}/{doc}: {err:?}"
        );
    }
    // Nothing was stored, and the connection stays up for reading.
    let after = hub
        .store
        .get(&ns("models"), &id("resnet"))
        .unwrap()
        .unwrap();
    assert_eq!(after.heads, before.heads);
    assert!(hub
        .store
        .get(&ns("models"), &id("new-doc"))
        .unwrap()
        .is_none());
    assert!(hub.store.get(&ns("secrets"), &id("key")).unwrap().is_none());
    assert!(!r.closed_within(Duration::from_millis(200)).await);
    let rejected: u64 = hub.node.peers().iter().map(|p| p.counts.rejected).sum();
    assert!(rejected >= 3, "rejections counted: {rejected}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_receive_only_granted_namespaces() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    for n in ["models", "health.eu", "secrets"] {
        for i in 0..5 {
            hub.store
                .put(&ns(n), &id(&format!("d{i}")), json!({ "ns": n }), None)
                .await
                .unwrap();
        }
    }
    let edge = d
        .edge("edge-1", &["models=ro", "health.*=rw"], &[hub.addr()])
        .unwrap();
    wait_until(Duration::from_secs(10), "the edge caught up", || {
        Ok(edge.store.list(&ns("models"))?.len() == 5
            && edge.store.list(&ns("health.eu"))?.len() == 5
            && hub
                .node
                .peers()
                .iter()
                .any(|p| p.connected && p.counts.lag == 0))
    })
    .await
    .unwrap();
    // A write after catch-up, in the namespace it may not read, does not leak either.
    hub.store
        .put(&ns("secrets"), &id("late"), json!({"x": 1}), None)
        .await
        .unwrap();
    hub.store
        .put(&ns("models"), &id("late"), json!({"x": 1}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the late model", || {
        Ok(edge.store.get(&ns("models"), &id("late"))?.is_some())
    })
    .await
    .unwrap();
    assert!(edge.store.list(&ns("secrets")).unwrap().is_empty());
    // And the edge's own writes to a namespace it may write arrive.
    edge.store
        .put(&ns("health.eu"), &id("edge-1"), json!({"ok": true}), None)
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "the edge's health report", || {
        Ok(hub.store.get(&ns("health.eu"), &id("edge-1"))?.is_some())
    })
    .await
    .unwrap();
    edge.stop().await;
    hub.stop().await;
}

/// Regression: the hub checked the revocation list, then waited for the peer to open its
/// stream (the peer chooses when), and only then started watching the list, taking the
/// current list as already seen. A stolen edge that finished its handshake, idled while
/// the operator revoked it, and then sent its first frame got a full session, until the
/// list changed again. Now every wait of a connection is raced against the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_revoked_before_its_first_frame_is_cut_off() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let thief = NodeId::new("stolen-edge").unwrap();
    let bundle = d.bundle("stolen-edge", Role::Edge, &["*=rw"]).unwrap();
    // The handshake completes; no stream is open yet (quinn opens it with the first byte).
    let mut r = Rogue::connect(&bundle, hub.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.cfg.revocations.revoke(thief.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_at = Instant::now();
    // Its first frames, sent after the revocation: a hello and a write.
    let _ = r.send(&hello("stolen-edge", Role::Edge)).await;
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, "stolen", true)?;
        Ok(())
    })
    .unwrap();
    let msg = doc
        .generate_sync_message(&mut warm_sync_state(Default::default()))
        .unwrap();
    let _ = r
        .send(&Message::Sync {
            ns: "notes".into(),
            id: "loot".into(),
            data: msg.encode(),
        })
        .await;
    assert!(
        r.closed_within(Duration::from_secs(1)).await,
        "a revoked peer kept its session"
    );
    println!("cut off {:?} after its first frame", sent_at.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hub.store.get(&ns("notes"), &id("loot")).unwrap().is_none());
    assert!(!hub
        .node
        .peers()
        .iter()
        .any(|p| p.node_id == thief && p.connected));
}

/// Regression: node certificates were issued valid until the year 4096, so a stolen
/// bundle never stopped working by itself. Now they expire (a year by default, `enroll
/// --days`), and a certificate past its end is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    let grants = ["*=rw".parse().unwrap()];
    let expired =
        d.ca.issue_valid(
            &NodeId::new("old-edge").unwrap(),
            Role::Edge,
            &grants,
            now - 30 * day,
            now - day,
        )
        .unwrap();
    let failures = hub.node.handshake_failures();
    let refused = match Rogue::connect(&expired, hub.addr()).await {
        Err(_) => true,
        Ok(mut r) => {
            let _ = r.send(&hello("old-edge", Role::Edge)).await;
            r.closed_within(Duration::from_secs(2)).await
        }
    };
    assert!(refused, "an expired certificate got a session");
    wait_until(Duration::from_secs(2), "the refusal counted", || {
        Ok(hub.node.handshake_failures() > failures)
    })
    .await
    .unwrap();
    // The same node with a current certificate is served; a fresh one runs a year.
    let fresh = d.bundle("old-edge", Role::Edge, &["*=rw"]).unwrap();
    let left = fresh
        .not_after()
        .unwrap()
        .duration_since(now)
        .unwrap()
        .as_secs()
        / 86_400;
    assert!((364..=365).contains(&left), "{left} days");
    let mut r = Rogue::connect(&fresh, hub.addr()).await.unwrap();
    r.send(&hello("old-edge", Role::Edge)).await.unwrap();
    assert!(r.recv(Duration::from_secs(2)).await.unwrap().is_some());
}

/// A peer cannot forge a revocation list (to cut honest nodes off) nor roll one back (to
/// readmit a revoked node): a list not signed by the deployment CA is a protocol error and
/// changes nothing; an older one is ignored; a newer signed one is taken up and revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_lists_from_peers_must_be_signed_and_newer() {
    use tidesync::net::crl::Revoked;
    let d = Deployment::new().unwrap();
    let hub = d.hub("hub", &[]).unwrap();
    let victim = d.bundle("victim", Role::Edge, &["*=rw"]).unwrap();
    let entry = |b: &tidesync::net::Bundle| Revoked {
        serial: b.serial().unwrap(),
        at: std::time::SystemTime::now(),
    };

    // Forged: another CA (same name) revokes an honest edge.
    let other = tidesync::net::Ca::generate("test").unwrap();
    let forged = other.revocation_list(1_000, &[entry(&victim)]).unwrap();
    let mut r = rogue_session(&d, hub.addr(), "liar", &["*=rw"]).await;
    r.send(&Message::Revocations { crl: forged }).await.unwrap();
    let refused = r
        .recv_until(Duration::from_secs(5), |m| {
            matches!(m, Message::Error { .. })
        })
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            Some(Message::Error {
                code: ErrorCode::Protocol,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(r.closed_within(Duration::from_secs(2)).await);
    assert!(
        hub.cfg.revocations.crl().is_none(),
        "a forged list was taken up"
    );

    // Signed lists: number 2 revokes the victim; number 1 (older, empty) cannot undo it.
    let newer = d.ca.revocation_list(2, &[entry(&victim)]).unwrap();
    let older = d.ca.revocation_list(1, &[]).unwrap();
    let mut r = rogue_session(&d, hub.addr(), "messenger", &["*=rw"]).await;
    r.send(&Message::Revocations { crl: newer }).await.unwrap();
    wait_until(Duration::from_secs(2), "the newer list in force", || {
        Ok(hub.cfg.revocations.crl().map(|c| c.number()) == Some(2))
    })
    .await
    .unwrap();
    r.send(&Message::Revocations { crl: older }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.cfg.revocations.crl().map(|c| c.number()), Some(2));
    assert!(
        !r.closed_within(Duration::from_millis(100)).await,
        "an honest older list is no offence"
    );
    let failures = hub.node.handshake_failures();
    // The client may finish its half of the handshake before the refusal arrives.
    if let Ok(mut v) = Rogue::connect(&victim, hub.addr()).await {
        let _ = v.send(&hello("victim", Role::Edge)).await;
        assert!(
            v.closed_within(Duration::from_secs(2)).await,
            "the revoked edge got in"
        );
    }
    wait_until(Duration::from_secs(2), "the refused handshake", || {
        Ok(hub.node.handshake_failures() > failures)
    })
    .await
    .unwrap();
}
