//! The local API against a browser on the same machine and against slow clients: DNS
//! rebinding (a foreign `Host`), cross-site requests (a form or `text/plain` POST, another
//! `Origin`), clients that never finish their headers, more connections than allowed.
//! Raw HTTP/1.1 over TCP, so every header is what the attacker chose.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use tidesync::api::serve::ServeLimits;
use tidesync::daemon::{Daemon, DaemonConfig};
use tidesync::model::{NodeId, NsPattern, Role};
use tidesync::net::Ca;
use tidesync::store::StoreConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn node(token: Option<&str>, limits: ServeLimits) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("api").unwrap();
    let daemon = Daemon::start(DaemonConfig {
        db_path: dir.path().join("node.redb"),
        bundle: ca
            .issue(&NodeId::new("hub-1").unwrap(), Role::Hub, &[])
            .unwrap(),
        listen: None,
        api: ([127, 0, 0, 1], 0).into(),
        dial: Vec::new(),
        failover: false,
        subscriptions: vec![NsPattern::all()],
        token: token.map(str::to_owned),
        api_hosts: vec!["hub-1.internal".into()],
        bundle_file: None,
        api_limits: limits,
        revocation_file: None,
        crl_file: None,
        max_body: tidesync::daemon::DEFAULT_MAX_BODY,
        store: StoreConfig::default(),
        timers: Default::default(),
        forget_peers_after: None,
        audit_every: None,
        replica_defaults: Vec::new(),
        blobs: Default::default(),
        traffic: Default::default(),
        repo_namespace: tidesync::api::repo::default_namespace(),
        extensions: Vec::new(),
    })
    .await
    .unwrap();
    (daemon, dir)
}

/// Sends `head` (request line and headers, without the blank line) and `body`; returns the
/// status and the body of the answer.
async fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn automerge_doc() -> Vec<u8> {
    let mut doc = automerge::Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(automerge::ROOT, "forged", true)?;
        Ok(())
    })
    .unwrap();
    doc.save()
}

/// Regression: the API answered whatever `Host` a request named, so a page on a name
/// re-pointed at 127.0.0.1 (DNS rebinding) could read and write every document.
#[tokio::test]
async fn a_foreign_host_is_refused() {
    let (d, _dir) = node(None, ServeLimits::default()).await;
    let api = d.api_addr;
    let (code, body) = http(
        api,
        "GET /v1/docs/app HTTP/1.1\r\nHost: evil.example:7790",
        b"",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--api-host"), "{body}");
    let (code, _) = http(
        api,
        "PUT /v1/docs/app/x HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json",
        b"{\"a\":1}",
    )
    .await;
    assert_eq!(code, 403);
    for host in [
        api.to_string(),
        "localhost".into(),
        "hub-1.internal:7790".into(),
    ] {
        let (code, body) = http(
            api,
            &format!("GET /v1/docs/app HTTP/1.1\r\nHost: {host}"),
            b"",
        )
        .await;
        assert_eq!(code, 200, "{host}: {body}");
    }
    let (code, _) = http(api, "GET /v1/health HTTP/1.0", b"").await;
    assert_eq!(code, 400, "no Host at all");
    assert!(d
        .store
        .get(&"app".parse().unwrap(), &"x".parse().unwrap())
        .unwrap()
        .is_none());
    d.shutdown().await;
}

/// Regression: a page on any site could POST Automerge bytes as `text/plain` (a request
/// browsers send without asking the server first) and the node merged them.
#[tokio::test]
async fn a_browser_simple_post_from_another_site_is_refused() {
    let (d, _dir) = node(None, ServeLimits::default()).await;
    let api = d.api_addr;
    let host = format!("Host: {api}");
    let bytes = automerge_doc();
    let path = "POST /v1/docs/app/forged/automerge HTTP/1.1";
    for (what, headers) in [
        (
            "text/plain from another origin",
            "Content-Type: text/plain\r\nOrigin: https://evil.example",
        ),
        ("text/plain, no origin", "Content-Type: text/plain"),
        ("a form", "Content-Type: application/x-www-form-urlencoded"),
        ("no type", "Accept: */*"),
        (
            "JSON from another origin",
            "Content-Type: application/octet-stream\r\nOrigin: https://evil.example",
        ),
        (
            "fetch metadata says cross-site",
            "Content-Type: application/octet-stream\r\nSec-Fetch-Site: cross-site",
        ),
    ] {
        let (code, body) = http(api, &format!("{path}\r\n{host}\r\n{headers}"), &bytes).await;
        assert_eq!(code, 403, "{what}: {body}");
    }
    let id = "forged".parse().unwrap();
    assert!(d.store.get(&"app".parse().unwrap(), &id).unwrap().is_none());
    // A client that says what it sends is served.
    let (code, body) = http(
        api,
        &format!("{path}\r\n{host}\r\nContent-Type: application/octet-stream"),
        &bytes,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // curl's default type on a PUT is fine: browsers always ask before a PUT.
    let (code, body) = http(
        api,
        &format!(
            "PUT /v1/docs/app/curl HTTP/1.1\r\n{host}\r\nContent-Type: application/x-www-form-urlencoded"
        ),
        b"{\"a\":1}",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    d.shutdown().await;
}

/// Regression: a client that opened connections and never finished its headers held them
/// open for ever, and there was no cap on how many it held.
#[tokio::test]
async fn slow_clients_are_dropped_and_connections_capped() {
    let limits = ServeLimits {
        header_timeout: Duration::from_secs(1),
        max_connections: 4,
        drain: Duration::from_secs(1),
    };
    let (d, _dir) = node(None, limits).await;
    let api = d.api_addr;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(api).await.unwrap();
        s.write_all(format!("GET /v1/health HTTP/1.1\r\nHost: {api}\r\nX-Slow: ").as_bytes())
            .await
            .unwrap();
        slow.push(s);
    }
    // All four slots are held: a fifth client waits (in the listen backlog) ...
    let started = Instant::now();
    let (code, _) = http(api, &format!("GET /v1/health HTTP/1.1\r\nHost: {api}"), b"").await;
    assert_eq!(code, 200);
    let waited = started.elapsed();
    println!("the fifth client was served after {waited:?}");
    assert!(
        waited >= Duration::from_millis(500),
        "no cap: served at once"
    );
    // ... until the slow ones are dropped at the header deadline.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("the slow client was never dropped")
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    d.shutdown().await;
}

/// The token is checked whole (compared as SHA-256 digests with `subtle`, in constant time).
#[tokio::test]
async fn the_token_is_required_and_compared_whole() {
    let (d, _dir) = node(Some("s3cret-token"), ServeLimits::default()).await;
    let api = d.api_addr;
    let host = format!("Host: {api}");
    for auth in [
        "",
        "Authorization: Bearer s3cret",
        "Authorization: Bearer s3cret-token0",
    ] {
        let (code, _) = http(
            api,
            &format!("GET /v1/docs/app HTTP/1.1\r\n{host}\r\n{auth}"),
            b"",
        )
        .await;
        assert_eq!(code, 401, "{auth}");
    }
    let (code, _) = http(
        api,
        &format!("GET /v1/docs/app HTTP/1.1\r\n{host}\r\nAuthorization: Bearer s3cret-token"),
        b"",
    )
    .await;
    assert_eq!(code, 200);
    d.shutdown().await;
}
