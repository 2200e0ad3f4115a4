//! automerge-repo apps on Tidesync, with the real binaries and the real npm packages:
//! clients of two nodes create, find and edit documents that sync through the deployment,
//! a JSON patch reaches them as a change with plain strings, a read-only token changes
//! nothing, ephemeral messages pass between clients, and tokens stay out of the logs.
//! The JS side is `tests/js/repo_clients.mjs`; `scripts/test` installs its packages.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tidesync_tests::procs::{binary, run, wait_for, Binaries, Proc};

const ADMIN: &str = "operator-secret-token";

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// `node`, with the test packages installed; fails with what to run when they are not.
fn node() -> Command {
    let modules = js_dir().join("node_modules/@automerge/automerge-repo");
    assert!(
        modules.exists(),
        "the npm packages of tests/js are not installed: run scripts/test (or `npm ci` in tests/js)"
    );
    let found = Command::new("node").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "node is not installed: run scripts/test, which installs it"
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(js_dir());
    cmd
}

/// Whether `p` has a live connection to `peer` (asked with the operator token).
fn connected(p: &Proc, peer: &str) -> bool {
    let status: serde_json::Value = ureq::get(&p.url("/v1/status"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["node_id"] == peer && s["connected"] == true)
}

/// Issues a scoped token at the deployment's CA.
fn token(d: &Binaries, grant: &str) -> String {
    run(
        "tidesync-hub",
        &[
            "token",
            "create",
            "--data",
            &d.path("hub"),
            "--grant",
            grant,
            "--days",
            "1",
            "--name",
            "js-test",
        ],
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// Edge `name` with its log (at debug level) written to `log`.
fn edge_logging(d: &Binaries, name: &str, hub: &Proc, log: &str) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "exec \"$0\" \"$@\" 2>\"$LOG\"",
        binary("tidesync-edge").unwrap().to_str().unwrap(),
        "run",
        "--data",
        &d.path(name),
        "--bundle",
        &d.path(&format!("{name}.pem")),
        "--api",
        "127.0.0.1:0",
        "--hub",
        &hub.quic.to_string(),
        "--token",
        ADMIN,
    ])
    .env("LOG", log)
    .env("TIDESYNC_LOG", "debug");
    Proc::spawn(cmd, "tidesync-edge").unwrap()
}

/// A hub and edges A and B granted `repo=rw`, all with the operator token; edge A logs at
/// debug level to `edge-a.log`; and two scoped tokens, `repo=rw` and `repo=ro`.
struct Setup {
    d: Binaries,
    hub: Proc,
    a: Proc,
    b: Proc,
    rw: String,
    ro: String,
}

impl Setup {
    fn start() -> Self {
        let d = Binaries::init().unwrap();
        let hub = d.hub(&["--token", ADMIN]).unwrap();
        for e in ["edge-a", "edge-b"] {
            d.enroll(e, "edge", &["repo=rw"]).unwrap();
        }
        let a = edge_logging(&d, "edge-a", &hub, &d.path("edge-a.log"));
        let b = d.edge("edge-b", &[&hub], &["--token", ADMIN]).unwrap();
        for e in ["edge-a", "edge-b"] {
            wait_for(e, Duration::from_secs(10), || connected(&hub, e));
        }
        let (rw, ro) = (token(&d, "repo=rw"), token(&d, "repo=ro"));
        Self {
            d,
            hub,
            a,
            b,
            rw,
            ro,
        }
    }

    /// Runs `script` of tests/js against the deployment; panics with its output unless it
    /// passes.
    fn run_js(&self, script: &str, extra: &[(&str, &str)]) {
        let mut cmd = node();
        cmd.arg(script)
            .env("EDGE_A", self.a.url(""))
            .env("HUB", self.hub.url(""))
            .env("EDGE_B", self.b.url(""))
            .env("TOKEN_RW", &self.rw)
            .env("TOKEN_RO", &self.ro);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("OK"),
            "{script} failed:\n{stdout}\n{stderr}"
        );
    }

    /// Neither token appears in edge A's log.
    fn assert_tokens_not_logged(&self) {
        let logged = std::fs::read_to_string(self.d.path("edge-a.log")).unwrap();
        assert!(!logged.is_empty(), "the edge logged nothing at debug level");
        for t in [&self.rw, &self.ro] {
            let signature = t.rsplit('.').next().unwrap();
            assert!(!logged.contains(signature), "a token is in the log");
        }
    }
}

#[test]
fn automerge_repo_clients_sync_through_the_deployment() {
    let s = Setup::start();
    s.run_js("repo_clients.mjs", &[]);
    s.assert_tokens_not_logged();
}

/// The same in a web page in headless Chromium, served from another origin.
#[test]
fn automerge_repo_clients_in_a_browser_page() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test, which installs Debian's chromium"
    );
    let s = Setup::start();
    s.run_js("browser_clients.mjs", &[("CHROMIUM", &chromium)]);
    s.assert_tokens_not_logged();
}

/// What a client without the right token gets, before any WebSocket is opened.
#[test]
fn the_endpoint_refuses_missing_wrong_and_revoked_tokens() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&["--token", ADMIN]).unwrap();
    let url = hub.url("/v1/automerge-repo");
    fn status(r: Result<ureq::Response, ureq::Error>) -> u16 {
        match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        }
    }
    let upgrade = |url: &str| {
        status(
            ureq::get(url)
                .set("connection", "Upgrade")
                .set("upgrade", "websocket")
                .set("sec-websocket-version", "13")
                .set("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .call(),
        )
    };
    assert_eq!(upgrade(&url), 401, "no token");
    assert_eq!(upgrade(&format!("{url}?token=wrong")), 401);
    let other = token(&d, "models=rw");
    assert_eq!(
        upgrade(&format!("{url}?token={other}")),
        403,
        "a token without the repo namespace"
    );
    let rw = token(&d, "repo=rw");
    assert_eq!(upgrade(&format!("{url}?token={rw}")), 101);
    // A scoped token reaches documents only.
    let status_page = ureq::get(&hub.url("/v1/status"))
        .set("authorization", &format!("Bearer {rw}"))
        .call();
    assert_eq!(status(status_page), 403);
    // Revoked at the CA, it is refused within a second or so.
    run(
        "tidesync-hub",
        &["token", "revoke", "--data", &d.path("hub"), "--token", &rw],
    )
    .unwrap();
    wait_for("the revocation", Duration::from_secs(10), || {
        upgrade(&format!("{url}?token={rw}")) == 401
    });
    let doc = ureq::get(&hub.url("/v1/docs/repo/x"))
        .set("authorization", &format!("Bearer {rw}"))
        .call();
    assert_eq!(status(doc), 401);
}

/// A raw WebSocket to `/v1/automerge-repo`, for what no automerge-repo client sends.
mod raw {
    use ciborium::value::Value;
    use std::net::TcpStream;
    use tungstenite::stream::MaybeTlsStream;
    use tungstenite::{Message, WebSocket};

    pub type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

    pub fn connect(api: std::net::SocketAddr, token: &str) -> Socket {
        let url = format!("ws://{api}/v1/automerge-repo?token={token}");
        let (socket, _) = tungstenite::connect(url).unwrap();
        match socket.get_ref() {
            MaybeTlsStream::Plain(s) => s
                .set_read_timeout(Some(std::time::Duration::from_secs(15)))
                .unwrap(),
            _ => unreachable!("a plain ws:// connection"),
        }
        socket
    }

    pub fn cbor(fields: &[(&str, Value)]) -> Vec<u8> {
        let map = Value::Map(
            fields
                .iter()
                .map(|(k, v)| (Value::Text((*k).to_owned()), v.clone()))
                .collect(),
        );
        let mut out = Vec::new();
        ciborium::ser::into_writer(&map, &mut out).unwrap();
        out
    }

    pub fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    pub fn join(socket: &mut Socket, versions: &[&str]) {
        let versions = Value::Array(versions.iter().map(|v| text(v)).collect());
        let m = cbor(&[
            ("type", text("join")),
            ("senderId", text("raw-client")),
            ("peerMetadata", Value::Map(vec![])),
            ("supportedProtocolVersions", versions),
        ]);
        socket.send(Message::binary(m)).unwrap();
    }

    /// The next message as a CBOR map's `type` and `message` fields; `None` once closed.
    pub fn next(socket: &mut Socket) -> Option<(String, String)> {
        loop {
            match socket.read() {
                Ok(Message::Binary(b)) => {
                    let v: Value = ciborium::de::from_reader(&b[..]).unwrap();
                    let field = |k: &str| {
                        v.as_map()
                            .and_then(|m| m.iter().find(|(key, _)| key.as_text() == Some(k)))
                            .and_then(|(_, v)| v.as_text())
                            .unwrap_or("")
                            .to_owned()
                    };
                    return Some((field("type"), field("message")));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the node closes, returning the error messages it sent on the way.
    pub fn errors_until_closed(socket: &mut Socket) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((kind, message)) = next(socket) {
            if kind == "error" {
                out.push(message);
            }
        }
        out
    }
}

/// What a hostile or broken client sends is refused with a reason and costs only its own
/// connection: the node goes on serving others, and nothing of it is stored.
#[test]
fn hostile_websocket_clients_are_refused_and_store_nothing() {
    use ciborium::value::Value;
    use raw::{cbor, text};
    use tungstenite::Message;

    let d = Binaries::init().unwrap();
    let hub = d.hub(&["--max-body", "65536"]).unwrap();
    let rw = token(&d, "repo=rw");
    let expect_refusal = |send: &dyn Fn(&mut raw::Socket), join_first: bool, why: &str| {
        let mut s = raw::connect(hub.api, &rw);
        if join_first {
            raw::join(&mut s, &["1"]);
            assert_eq!(raw::next(&mut s).unwrap().0, "peer");
        }
        send(&mut s);
        let errors = raw::errors_until_closed(&mut s);
        assert!(
            errors.iter().any(|e| e.contains(why)),
            "expected a refusal naming {why:?}, got {errors:?}"
        );
    };
    // A client that speaks only a later version.
    expect_refusal(&|s| raw::join(s, &["2"]), false, "unsupported protocol");
    let sync = |id: &str, data: Vec<u8>| {
        cbor(&[
            ("type", text("sync")),
            ("senderId", text("raw-client")),
            ("targetId", text("x")),
            ("documentId", text(id)),
            ("data", Value::Bytes(data)),
        ])
    };
    // Anything before the join.
    expect_refusal(
        &|s| {
            s.send(Message::binary(sync(
                "4BEeJ61G9gH9yHNnTJTeBuxh3khX",
                vec![0x42],
            )))
            .unwrap()
        },
        false,
        "must be a join",
    );
    // Text frames, garbage, deep nesting.
    expect_refusal(&|s| s.send(Message::text("{}")).unwrap(), true, "binary");
    expect_refusal(
        &|s| s.send(Message::binary(vec![0xff; 8])).unwrap(),
        true,
        "CBOR",
    );
    let deep = {
        let mut v = Value::Null;
        for _ in 0..1000 {
            v = Value::Array(vec![v]);
        }
        let mut out = Vec::new();
        ciborium::ser::into_writer(&v, &mut out).unwrap();
        out
    };
    expect_refusal(
        &|s| s.send(Message::binary(deep.clone())).unwrap(),
        true,
        "CBOR",
    );
    // A document id that is not one, and a sync message that is not Automerge's.
    expect_refusal(
        &|s| s.send(Message::binary(sync("../etc", vec![0x42]))).unwrap(),
        true,
        "not a document id",
    );
    let id = "4BEeJ61G9gH9yHNnTJTeBuxh3khX";
    expect_refusal(
        &|s| {
            s.send(Message::binary(sync(id, vec![0x42, 0xff, 0xff])))
                .unwrap()
        },
        true,
        "bad sync message",
    );
    // A Bloom filter that would make Automerge divide by zero, or allocate 2^32 probes,
    // while it answers: refused before the store or Automerge sees it.
    ureq::put(&hub.url(&format!("/v1/docs/repo/{id}")))
        .send_string(r#"{"v":1}"#)
        .unwrap();
    for bloom in [
        vec![1u8, 0, 7],
        vec![1, 10, 0x80, 0x80, 0x80, 0x80, 0x04, 0xff, 0xff],
    ] {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "x", 1).unwrap();
        tx.commit();
        let mut m = automerge::sync::SyncDoc::generate_sync_message(
            &doc,
            &mut automerge::sync::State::new(),
        )
        .unwrap();
        m.have = vec![automerge::sync::Have {
            last_sync: Vec::new(),
            bloom: automerge::sync::BloomFilter::try_from(bloom.as_slice()).unwrap(),
        }];
        let bytes = m.encode();
        expect_refusal(
            &|s| s.send(Message::binary(sync(id, bytes.clone()))).unwrap(),
            true,
            "Bloom",
        );
    }
    ureq::get(&hub.url("/v1/health")).call().unwrap();
    ureq::delete(&hub.url(&format!("/v1/docs/repo/{id}")))
        .call()
        .unwrap();

    // A message over --max-body ends the connection.
    let mut s = raw::connect(hub.api, &rw);
    raw::join(&mut s, &["1"]);
    assert_eq!(raw::next(&mut s).unwrap().0, "peer");
    let _ = s.send(Message::binary(sync(id, vec![0x42; 100_000])));
    assert!(
        raw::next(&mut s).is_none(),
        "the oversized message was taken"
    );

    // The node is fine, and stored nothing of it.
    let listed: serde_json::Value = ureq::get(&hub.url("/v1/docs/repo"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let docs = listed["docs"].as_array().unwrap();
    assert!(
        docs.iter().all(|d| d["deleted"] == true),
        "a hostile client stored something: {listed}"
    );
    let mut fine = raw::connect(hub.api, &rw);
    raw::join(&mut fine, &["1"]);
    assert_eq!(raw::next(&mut fine).unwrap().0, "peer");
}
